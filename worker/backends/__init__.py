"""Model backends behind one interface, chosen by the model's form.

Heavy imports (TensorFlow, LiteRT) happen inside each backend module, so choosing a backend costs
only what that backend needs.
"""

from __future__ import annotations

from typing import Any, Literal

from worker.backends.base import Backend, ClipModel, ModelLoadError, State

BackendName = Literal["auto", "tfhub", "litert"]
BACKENDS = ("tfhub", "litert")


def backend_for(model: str, backend: BackendName = "auto") -> str:
    if backend != "auto":
        return backend
    return "litert" if model.lower().endswith(".tflite") else "tfhub"


def load_model(model: str, backend: BackendName = "auto", **options: Any) -> Backend | ClipModel:
    """Load a stream model as a Backend, or a base model as a ClipModel (TF Hub only)."""
    name = backend_for(model, backend)
    if name == "litert":
        from worker.backends.litert import LiteRTBackend

        options.pop("batch_sizes", None)
        return LiteRTBackend(model, **options)
    from worker.backends.tfhub import load_tfhub

    options.pop("interpreters", None)
    options.pop("threads", None)
    return load_tfhub(model, **options)


def load_stream_model(model: str, backend: BackendName = "auto", **options: Any) -> Backend:
    loaded = load_model(model, backend, **options)
    if not isinstance(loaded, Backend):
        raise ModelLoadError(f"{model!r} is a base model; the worker needs a stream model")
    return loaded


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendName",
    "ClipModel",
    "ModelLoadError",
    "State",
    "backend_for",
    "load_model",
    "load_stream_model",
]
