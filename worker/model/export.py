"""Export MoViNet models in the TF Hub format with tf-models-official (the `export` extra).

Stream models get the `init_states` and `call` signatures plus the restored object's state-passing
call, exactly as TF Hub publishes them (this reuses the Model Garden's own exporter); base models get
`serving_default`. Every export also writes the weights it used as a TF checkpoint, so a stream model
and its base twin (or a TFLite conversion) can share one set of random weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from worker.model.info import ARCHITECTURES, ModelKind

CHECKPOINT_DIR = "checkpoint"  # inside the export folder: the weights the export used
METADATA_FILE = "movinet_export.json"  # inside the export folder: how it was built


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    model_id: str = "a0"
    mode: ModelKind = "stream"
    resolution: int | None = None
    num_classes: int = 600
    checkpoint: str | None = None
    causal: bool | None = None  # stream models are always causal; base models default to TF Hub's (not)
    conv_type: str = "3d"
    se_type: str = "3d"
    activation: str = "swish"
    gating_activation: str = "sigmoid"
    seed: int = 0

    @property
    def is_causal(self) -> bool:
        return True if self.mode == "stream" else bool(self.causal)

    @property
    def image_size(self) -> int:
        return self.resolution or ARCHITECTURES[self.model_id].resolution


def _require_models() -> Any:
    try:
        import tf_keras
        from official.projects.movinet.modeling import movinet, movinet_model
        from official.projects.movinet.tools import export_saved_model
    except ImportError as exc:  # the extra is optional; say how to get it
        raise SystemExit(
            f"export-model needs tf-models-official: pip install 'movinet-worker[export]' ({exc})"
        ) from exc
    return tf_keras, movinet, movinet_model, export_saved_model


def _build(spec: ExportSpec, input_shape: tuple[int | None, ...], external_states: bool) -> Any:
    tf_keras, movinet, movinet_model, _ = _require_models()
    # The Model Garden exporter swaps swish for a version without custom gradients; do the same.
    act = "simple_swish" if spec.activation == "swish" else spec.activation
    input_specs = tf_keras.layers.InputSpec(shape=input_shape)
    backbone = movinet.Movinet(
        model_id=spec.model_id,
        causal=spec.is_causal,
        use_positional_encoding=False,
        conv_type=spec.conv_type,
        se_type=spec.se_type,
        input_specs=input_specs,
        activation=act,
        gating_activation=spec.gating_activation,
        use_sync_bn=False,
        use_external_states=external_states,
    )
    return movinet_model.MovinetClassifier(
        backbone,
        num_classes=spec.num_classes,
        output_states=external_states,
        input_specs={"image": input_specs},
        activation=act,
    )


def _save(
    spec: ExportSpec, out: Path, input_shape: tuple[int | None, ...], bundle: bool, checkpoint: str | None
) -> Any:
    import tensorflow as tf

    tf_keras, _, _, exporter = _require_models()
    model = _build(spec, input_shape, external_states=spec.mode == "stream")
    if spec.mode == "stream":
        exporter.export_saved_model(
            model=model,
            input_shape=input_shape,
            export_path=str(out),
            causal=True,  # the exporter's `causal` means "has external states"
            bundle_input_init_states_fn=bundle,
            checkpoint_path=checkpoint,
        )
        return model
    concrete = [1 if s is None else s for s in input_shape]
    model.build(concrete)
    if checkpoint:
        tf.train.Checkpoint(model=model).restore(checkpoint).assert_existing_objects_matched()
    model(tf.ones(concrete))

    # TF Hub's base signature: `serving_default(image) -> {"classifier_head": logits}`.
    def serve(image: Any) -> dict[str, Any]:
        return {"classifier_head": model(image, training=False)}

    signature = tf.function(serve, input_signature=[tf.TensorSpec(input_shape, tf.float32, name="image")])
    tf_keras.models.save_model(model, str(out), signatures={"serving_default": signature})
    return model


def export_model(spec: ExportSpec, out: Path, tflite: bool = False) -> dict[str, Any]:
    """Build and save a model; returns the metadata written next to it."""
    import tensorflow as tf
    import tf_keras

    if spec.model_id not in ARCHITECTURES:
        raise SystemExit(f"--id must be one of {', '.join(ARCHITECTURES)}, got {spec.model_id!r}")
    if tflite and spec.mode != "stream":
        raise SystemExit("--tflite converts stream models only (TF Hub publishes no base TFLite)")
    tf_keras.utils.set_random_seed(spec.seed)
    size = spec.image_size
    if out.exists():
        shutil.rmtree(out)
    model = _save(spec, out, (None, None, size, size, 3), bundle=True, checkpoint=spec.checkpoint)
    weights = tf.train.Checkpoint(model=model).save(str(out / CHECKPOINT_DIR / "ckpt"))

    meta: dict[str, Any] = {
        **dataclasses.asdict(spec),
        "image_size": size,
        "causal": spec.is_causal,
        "checkpoint_written": os.path.relpath(weights, out),
        "tensorflow": tf.__version__,
    }
    if tflite:
        meta["tflite"] = str(_convert_tflite(spec, out, weights))
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _convert_tflite(spec: ExportSpec, out: Path, weights: str) -> Path:
    """A float TFLite stream model with TF Hub's lite signature: batch 1, one frame, static size."""
    import tensorflow as tf

    size = spec.image_size
    with tempfile.TemporaryDirectory() as tmp:
        static = Path(tmp) / "static"
        _save(spec, static, (1, 1, size, size, 3), bundle=False, checkpoint=weights)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(static))
        data = converter.convert()
    target = out.parent / f"{out.name}.tflite"
    target.write_bytes(data)
    return target
