"""Model backends behind one interface, chosen by the model's form.

Heavy imports (TensorFlow, LiteRT) happen inside each backend module, so choosing a backend costs
only what that backend needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from worker.constants import TF_BATCH_SIZES
from worker.model.backends.base import Backend, ClipModel, ModelLoadError, State

BackendName = Literal["auto", "tfhub", "litert"]
BACKENDS = ("tfhub", "litert")


def backend_for(model: str, backend: BackendName = "auto") -> str:
    if backend != "auto":
        return backend
    return "litert" if model.lower().endswith(".tflite") else "tfhub"


@dataclasses.dataclass(frozen=True)
class LiteRTOptions:
    """LiteRT: interpreters run in parallel (None: one per core), threads in each."""

    interpreters: int | None = None
    threads: int = 1


@dataclasses.dataclass(frozen=True)
class TFHubOptions:
    """TF Hub: the sizes a batch is padded to (each costs a graph set-up on first use)."""

    batch_sizes: tuple[int, ...] = TF_BATCH_SIZES


BackendOptions = LiteRTOptions | TFHubOptions
# The registry: each backend and the options it takes.
OPTIONS: dict[str, type[BackendOptions]] = {"litert": LiteRTOptions, "tfhub": TFHubOptions}


def options_for(model: str, backend: BackendName, settings: Any) -> BackendOptions:
    """The options of the backend `model` loads with, read off `settings` (the worker's Settings):
    each backend takes its own fields and nothing else."""
    kind = OPTIONS[backend_for(model, backend)]
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(kind)}
    if "batch_sizes" in values:
        values["batch_sizes"] = tuple(values["batch_sizes"])
    return kind(**values)


def load_model(
    model: str, backend: BackendName = "auto", options: BackendOptions | None = None, fps: float | None = None
) -> Backend | ClipModel:
    """Load a stream model as a Backend, or a base model as a ClipModel (TF Hub only), with the
    options of its backend (its defaults when None)."""
    name = backend_for(model, backend)
    kind = OPTIONS[name]
    chosen = kind() if options is None else options
    if not isinstance(chosen, kind):
        raise TypeError(f"{type(chosen).__name__} given for the {name} backend, which takes {kind.__name__}")
    if isinstance(chosen, LiteRTOptions):
        from worker.model.backends.litert import LiteRTBackend

        return LiteRTBackend(model, interpreters=chosen.interpreters, threads=chosen.threads, fps=fps)
    from worker.model.backends.tfhub import load_tfhub

    return load_tfhub(model, batch_sizes=chosen.batch_sizes, fps=fps)


def load_stream_model(
    model: str, backend: BackendName = "auto", options: BackendOptions | None = None, fps: float | None = None
) -> Backend:
    loaded = load_model(model, backend, options, fps)
    if not isinstance(loaded, Backend):
        raise ModelLoadError(f"{model!r} is a base model; the worker needs a stream model")
    return loaded


__all__ = [
    "BACKENDS",
    "OPTIONS",
    "Backend",
    "BackendName",
    "BackendOptions",
    "ClipModel",
    "LiteRTOptions",
    "ModelLoadError",
    "State",
    "TFHubOptions",
    "backend_for",
    "load_model",
    "load_stream_model",
    "options_for",
]
