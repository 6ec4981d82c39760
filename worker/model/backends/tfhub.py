"""TF Hub backend: a MoViNet SavedModel loaded with `tensorflow_hub.load`.

Stream models are called the way the tutorial calls them, `model({**states, "image": frames})`:
the restored object's call batches well on CPU (DESIGN.md fact 5), while the exported `call`
signature is XLA-compiled and costs the same per camera whatever the batch. Cameras are batched
only with others whose frame count is equal, and batches are padded to a few fixed sizes so the
runtime sees few distinct shapes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from worker.constants import TF_BATCH_SIZES
from worker.model.backends.base import (
    FRAME_COUNT_SUFFIX,
    POOL_SUFFIX,
    Backend,
    ClipModel,
    ModelLoadError,
    State,
    hold_factor,
)
from worker.model.batching import bucket_size, group_by_count
from worker.model.info import resolve_info

HEAD_POOL = "state_head_pool_buffer"


def _is_remote(handle: str) -> bool:
    return "://" in handle or handle.startswith(("hub:", "gs:"))


def load_saved_model(handle: str) -> Any:
    """`tensorflow_hub.load` with errors that say what to do when offline."""
    if not _is_remote(handle) and os.path.isfile(handle):
        raise ModelLoadError(
            f"model {handle!r} is a file, not a SavedModel folder: pass a .tflite file (litert backend), "
            "a SavedModel folder (holding saved_model.pb) or a TF Hub handle"
        )
    if not _is_remote(handle) and not os.path.isdir(handle):
        raise ModelLoadError(f"model {handle!r}: no such SavedModel folder or TF Hub handle")
    try:
        import tensorflow_hub as hub
    except ImportError as exc:  # TensorFlow is the `tfhub` extra; LiteRT installs go without it
        raise ModelLoadError(
            f"model {handle!r} is a SavedModel or TF Hub handle, which needs TensorFlow: "
            f"pip install 'movinet-worker[tfhub]' (image: --build-arg EXTRAS=litert,tfhub) ({exc})"
        ) from exc

    try:
        return hub.load(handle)
    except Exception as exc:  # hub and TF raise many types; all mean "could not load"
        if _is_remote(handle):
            cache = os.environ.get("TFHUB_CACHE_DIR", "(TFHUB_CACHE_DIR not set)")
            raise ModelLoadError(
                f"could not fetch TF Hub model {handle!r} ({type(exc).__name__}: {exc}). "
                f"Without network access, download it elsewhere and pass the unpacked SavedModel "
                f"folder instead (--model /path/to/folder), or pre-fill the cache {cache}."
            ) from exc
        raise ModelLoadError(f"could not load SavedModel {handle!r}: {exc}") from exc


class TFState(State):
    __slots__ = ("count", "tensors")

    def __init__(self, tensors: dict[str, Any], count: int) -> None:
        self.tensors = tensors
        self.count = count

    @property
    def frames(self) -> int:
        return self.count


def _spec_shape(spec: Any) -> list[int | None]:
    return list(spec.shape.as_list()) if spec.shape.rank is not None else []


class TFHubBackend(Backend):
    """Many cameras per call through the restored object; states stay TF tensors."""

    name = "tfhub"

    def __init__(
        self,
        handle: str,
        *,
        model: Any = None,
        batch_sizes: Iterable[int] = TF_BATCH_SIZES,
        fps: float | None = None,
        clip_frames: int | None = None,
    ) -> None:
        import tensorflow as tf

        self._tf = tf
        self.model = model if model is not None else load_saved_model(handle)
        if "init_states" not in self.model.signatures:
            raise ModelLoadError(
                f"{handle!r} is not a MoViNet stream model (it has no init_states signature; "
                "signatures: " + ", ".join(self.model.signatures) + ")"
            )
        self.batch_sizes = sorted(set(batch_sizes))
        call = self.model.signatures["call"]
        image = call.structured_input_signature[1]["image"]
        _, _, height, width, _ = _spec_shape(image)
        outputs = call.structured_outputs
        self.info = resolve_info(
            source=handle,
            backend=self.name,
            kind="stream",
            num_classes=int(_spec_shape(outputs["logits"])[-1] or 0),
            head_filters=_spec_shape(outputs[HEAD_POOL])[-1] if HEAD_POOL in outputs else None,
            height=height,
            width=width,
            fps=fps,
            clip_frames=clip_frames,
        )
        template = self.model.init_states(tf.constant([1, 1, self.info.height, self.info.width, 3], tf.int32))
        self.state_names = sorted(template)
        self.count_names = [n for n in self.state_names if n.endswith(FRAME_COUNT_SUFFIX)]
        self.batched_names = [n for n in self.state_names if not n.endswith(FRAME_COUNT_SUFFIX)]
        self.pool_names = [n for n in self.state_names if n.endswith(POOL_SUFFIX)]
        self._zero = TFState(dict(template), 0)

    def init_state(self) -> TFState:
        return self._zero  # tensors are immutable; sharing the zero state is safe

    def export_state(self, state: State) -> dict[str, np.ndarray]:
        assert isinstance(state, TFState)
        return {name: np.asarray(t.numpy()) for name, t in state.tensors.items()}

    def import_state(self, arrays: dict[str, np.ndarray], frames: int) -> TFState:
        return TFState({name: self._tf.constant(a) for name, a in arrays.items()}, frames)

    def step(
        self, frames: np.ndarray, states: Sequence[State], hold: int | None = None
    ) -> tuple[np.ndarray, list[State]]:
        self.check_frames(frames, states)
        tf_states = [s for s in states if isinstance(s, TFState)]
        if len(tf_states) != len(states):
            raise TypeError("TFHubBackend.step takes states made by this backend")
        logits = np.empty((len(states), self.info.num_classes), np.float32)
        new: list[State] = list(states)
        for _, idxs in group_by_count(tf_states):
            for start in range(0, len(idxs), self.batch_sizes[-1]):
                chunk = idxs[start : start + self.batch_sizes[-1]]
                out_logits, out_states = self._call([tf_states[i] for i in chunk], frames[chunk], hold)
                logits[chunk] = out_logits
                for i, st in zip(chunk, out_states, strict=False):
                    new[i] = st
        return logits, new

    def _call(
        self, group: list[TFState], frames: np.ndarray, hold: int | None
    ) -> tuple[np.ndarray, list[TFState]]:
        tf = self._tf
        n = len(group)
        size = bucket_size(n, self.batch_sizes)
        padded = group + [group[0]] * (size - n)
        if size > n:
            frames = np.concatenate([frames, np.repeat(frames[:1], size - n, axis=0)])
        inputs = {
            name: (
                padded[0].tensors[name] if size == 1 else tf.concat([s.tensors[name] for s in padded], axis=0)
            )
            for name in self.batched_names
        }
        for name in self.count_names:  # shared by the batch: equal for all, by construction
            inputs[name] = group[0].tensors[name]
        inputs["image"] = tf.constant(frames)
        out_logits, out_states = self.model(inputs)
        count = int(out_states[self.count_names[0]].numpy()[0]) if self.count_names else group[0].count + 1
        factor = hold_factor(count, hold)
        if factor is not None and hold is not None:  # the whole batch shares the count, so one scale
            out_states = dict(out_states)
            for name in self.pool_names:
                out_states[name] = out_states[name] * tf.constant(factor, out_states[name].dtype)
            held = tf.constant([hold], tf.int32)
            for name in self.count_names:
                out_states[name] = held
            count = hold
        if size == 1:
            return out_logits.numpy(), [TFState(dict(out_states), count)]
        parts = {name: tf.split(out_states[name], size, axis=0) for name in self.batched_names}
        shared = {name: out_states[name] for name in self.count_names}
        states = [
            TFState({**{name: parts[name][i] for name in self.batched_names}, **shared}, count)
            for i in range(n)
        ]
        return out_logits.numpy()[:n], states


class TFHubClipModel(ClipModel):
    """A base MoViNet SavedModel (`serving_default(image) -> classifier_head`)."""

    def __init__(self, handle: str, *, model: Any = None, fps: float | None = None) -> None:
        self.model = model if model is not None else load_saved_model(handle)
        if "serving_default" not in self.model.signatures:
            raise ModelLoadError(f"{handle!r} has no serving_default signature")
        self._serve = self.model.signatures["serving_default"]
        image = next(iter(self._serve.structured_input_signature[1].values()))
        out = next(iter(self._serve.structured_outputs.values()))
        _, _, height, width, _ = _spec_shape(image)
        self.info = resolve_info(
            source=handle,
            backend="tfhub",
            kind="base",
            num_classes=int(_spec_shape(out)[-1] or 0),
            head_filters=None,
            height=height,
            width=width,
            fps=fps,
        )

    def classify_clip(self, clip: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        out = self._serve(tf.constant(clip[None], tf.float32))
        return np.asarray(next(iter(out.values())).numpy()[0])


def load_tfhub(handle: str, **kwargs: Any) -> TFHubBackend | TFHubClipModel:
    """Load a handle or folder as whichever kind of model it is."""
    model = load_saved_model(handle)
    if "init_states" in model.signatures:
        return TFHubBackend(handle, model=model, **kwargs)
    kwargs.pop("batch_sizes", None)
    kwargs.pop("clip_frames", None)
    return TFHubClipModel(handle, model=model, **kwargs)
