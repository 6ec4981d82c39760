"""LiteRT backend: a TFLite MoViNet stream model (TF Hub's lite-model variants) via ai-edge-litert.

TF Hub's lite stream models take batch 1, so cameras are stepped one by one; both cores are used by
running one interpreter per worker thread (the interpreter releases the GIL while it computes). The
state of a camera is the dict of numpy arrays the interpreter returned, paired with inputs by name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from worker.model.backends.base import (
    FRAME_COUNT_SUFFIX,
    POOL_SUFFIX,
    Backend,
    ModelLoadError,
    State,
    hold_factor,
)
from worker.model.info import resolve_info

HEAD_POOL = "state_head_pool_buffer"


class LiteState(State):
    __slots__ = ("arrays", "count")

    def __init__(self, arrays: dict[str, np.ndarray], count: int) -> None:
        self.arrays = arrays
        self.count = count

    @property
    def frames(self) -> int:
        return self.count


class _Runner:
    """One interpreter and the tensor indices of its signature; used by one thread at a time."""

    def __init__(self, path: str, threads: int, signature: str | None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=threads)
        runner = self.interpreter.get_signature_runner(signature)
        self.inputs = {n: (d["index"], d["shape"], d["dtype"]) for n, d in runner.get_input_details().items()}
        self.outputs = {n: d["index"] for n, d in runner.get_output_details().items()}
        del runner  # it would hold references into the interpreter's buffers
        self.interpreter.allocate_tensors()
        self.lock = threading.Lock()

    def run(self, image: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        it = self.interpreter
        with self.lock:
            for name, (index, _, _) in self.inputs.items():
                it.set_tensor(index, image if name == "image" else state[name])
            it.invoke()
            return {name: it.get_tensor(index) for name, index in self.outputs.items()}


class LiteRTBackend(Backend):
    name = "litert"

    def __init__(
        self,
        path: str,
        *,
        interpreters: int | None = None,
        threads: int = 1,
        signature: str | None = None,
        fps: float | None = None,
        clip_frames: int | None = None,
    ) -> None:
        if not os.path.isfile(path):
            raise ModelLoadError(f"model {path!r}: no such TFLite file")
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "TFLite models need ai-edge-litert: pip install 'movinet-worker[litert]'"
            ) from exc
        count = interpreters or os.cpu_count() or 1
        try:
            self._runners = [_Runner(path, threads, signature) for _ in range(count)]
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"could not load TFLite model {path!r}: {exc}") from exc
        first = self._runners[0]
        if "image" not in first.inputs or "logits" not in first.outputs:
            raise ModelLoadError(
                f"{path!r} is not a MoViNet stream model (inputs {sorted(first.inputs)[:5]}...)"
            )
        _, image_shape, _ = first.inputs["image"]
        if int(image_shape[0]) != 1 or int(image_shape[1]) != 1:
            raise ModelLoadError(
                f"{path!r}: expected an image input of batch 1, one frame; got {list(image_shape)}"
            )
        self.state_names = sorted(n for n in first.inputs if n != "image")
        missing = [n for n in self.state_names if n not in first.outputs]
        if missing:
            raise ModelLoadError(f"{path!r}: state inputs without a matching output: {missing[:3]}")
        self.count_names = [n for n in self.state_names if n.endswith(FRAME_COUNT_SUFFIX)]
        self.count_name = self.count_names[0] if self.count_names else None
        self.pool_names = [n for n in self.state_names if n.endswith(POOL_SUFFIX)]
        probe = first.interpreter.get_tensor(first.outputs["logits"])
        head = first.inputs.get(HEAD_POOL)
        self.info = resolve_info(
            source=path,
            backend=self.name,
            kind="stream",
            num_classes=int(probe.shape[-1]),
            head_filters=int(head[1][-1]) if head else None,
            height=int(image_shape[2]),
            width=int(image_shape[3]),
            fps=fps,
            clip_frames=clip_frames,
        )
        zeros = {n: np.zeros(shape, dtype) for n, (_, shape, dtype) in first.inputs.items() if n != "image"}
        self._zero = LiteState(zeros, 0)
        self._pool = ThreadPoolExecutor(len(self._runners), "litert") if len(self._runners) > 1 else None

    @property
    def interpreters(self) -> int:
        return len(self._runners)

    def init_state(self) -> LiteState:
        return self._zero  # never written to: each step returns fresh arrays

    def export_state(self, state: State) -> dict[str, np.ndarray]:
        assert isinstance(state, LiteState)
        return state.arrays

    def import_state(self, arrays: dict[str, np.ndarray], frames: int) -> LiteState:
        return LiteState(arrays, frames)

    def _run_chunk(
        self, runner: _Runner, frames: np.ndarray, states: Sequence[LiteState], hold: int | None
    ) -> tuple[np.ndarray, list[LiteState]]:
        logits = np.empty((len(states), self.info.num_classes), np.float32)
        held = np.array([hold or 0], np.int32)  # shared: set_tensor copies it, nothing writes it
        new = []
        for i, state in enumerate(states):
            out = runner.run(frames[i : i + 1], state.arrays)
            logits[i] = out.pop("logits")[0]
            count = int(out[self.count_name][0]) if self.count_name else state.count + 1
            factor = hold_factor(count, hold)
            if factor is not None and hold is not None:
                for name in self.pool_names:
                    out[name] *= np.float32(factor)  # get_tensor returned copies: ours to scale
                for name in self.count_names:
                    out[name] = held
                count = hold
            new.append(LiteState(out, count))
        return logits, new

    def step(
        self, frames: np.ndarray, states: Sequence[State], hold: int | None = None
    ) -> tuple[np.ndarray, list[State]]:
        self.check_frames(frames, states)
        lite = [s for s in states if isinstance(s, LiteState)]
        if len(lite) != len(states):
            raise TypeError("LiteRTBackend.step takes states made by this backend")
        if self._pool is None or len(lite) == 1:
            logits, new = self._run_chunk(self._runners[0], frames, lite, hold)
            return logits, list(new)
        bounds = np.linspace(0, len(lite), len(self._runners) + 1).astype(int)
        futures = [
            self._pool.submit(self._run_chunk, runner, frames[a:b], lite[a:b], hold)
            for runner, a, b in zip(self._runners, bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
        results = [f.result() for f in futures]
        return (
            np.concatenate([r[0] for r in results]),
            [s for r in results for s in r[1]],
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
