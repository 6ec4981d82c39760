"""Bake a model and the label file into an image's /opt/movinet (the Dockerfile's `bake` stage).

    python deploy/docker/bake.py --out /opt/movinet [--models-dir deploy/models]
        [--model-file NAME | --model-handle HANDLE] [--labels-file NAME]

Layout written under --out (the runtime image's environment points at it):

    models/NAME                  --model-file: a .tflite file or SavedModel folder from --models-dir
    tfhub/<hash>/                --model-handle: the TF Hub cache (TFHUB_CACHE_DIR) holding HANDLE
    cache/kinetics_600_labels.txt   the labels (MOVINET_CACHE_DIR): --labels-file, else fetched once

The model is loaded once, as the worker will load it, so a wrong file or handle fails the build
rather than the first pod. Empty arguments mean "not given" (Docker passes unset build args as "").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the image's /opt/movinet")
    p.add_argument("--models-dir", type=Path, default=Path("deploy/models"), help="where --model-file is")
    p.add_argument("--model-file", default="", help="a .tflite file or SavedModel folder in --models-dir")
    p.add_argument("--model-handle", default="", help="a TF Hub handle of a MoViNet stream SavedModel")
    p.add_argument("--labels-file", default="", help="a label file in --models-dir (default: fetched)")
    return p.parse_args(argv)


def _local(models_dir: Path, name: str, what: str) -> Path:
    if not NAME.fullmatch(name):
        raise SystemExit(f"bake: {what} {name!r}: give a bare name of something in {models_dir}")
    path = models_dir / name
    if not path.exists():
        raise SystemExit(f"bake: {what} {name!r}: no such file or folder in {models_dir}")
    return path


def bake(args: argparse.Namespace) -> str | None:
    """Lay out --out; returns the MOVINET_MODEL the image will use (None: mounted at run time)."""
    if args.model_file and args.model_handle:
        raise SystemExit("bake: pass MODEL_FILE or MODEL_HANDLE, not both")
    model_source = _local(args.models_dir, args.model_file, "MODEL_FILE") if args.model_file else None
    labels_source = _local(args.models_dir, args.labels_file, "LABELS_FILE") if args.labels_file else None
    out: Path = args.out
    cache, models, tfhub = out / "cache", out / "models", out / "tfhub"
    for folder in (cache, models, tfhub):
        folder.mkdir(parents=True, exist_ok=True)
    # The worker reads these at run time; set them before importing it.
    os.environ["MOVINET_CACHE_DIR"] = str(cache)
    os.environ["TFHUB_CACHE_DIR"] = str(tfhub)

    from worker.constants import LABELS_CACHE_NAME
    from worker.model.backends import LiteRTOptions, backend_for, load_stream_model
    from worker.model.backends.base import ModelLoadError
    from worker.model.labels import check_labels, load_labels

    if labels_source is not None:
        shutil.copyfile(labels_source, cache / LABELS_CACHE_NAME)
    try:
        labels = load_labels()  # from the cache just written, else fetched into it
    except ModelLoadError as exc:
        hint = "in a build: put the file in deploy/models/ and pass LABELS_FILE"
        raise SystemExit(f"bake: {exc} ({hint})") from exc

    model: str | None = None
    if model_source is not None:
        target = models / args.model_file
        if model_source.is_dir():
            shutil.copytree(model_source, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(model_source, target)
        model = str(target)
    elif args.model_handle:
        try:
            import tensorflow_hub as hub
        except ImportError as exc:
            need = "build with --build-arg EXTRAS=litert,tfhub"
            raise SystemExit(f"bake: MODEL_HANDLE needs TensorFlow: {need} ({exc})") from exc

        hub.resolve(args.model_handle)  # downloads into TFHUB_CACHE_DIR
        model = args.model_handle
    if model is not None:
        one = LiteRTOptions(interpreters=1) if backend_for(model) == "litert" else None
        backend = load_stream_model(model, "auto", one)
        try:
            check_labels(labels, backend.info.num_classes, backend.info.source)
            print(f"bake: {backend.info.describe()}", file=sys.stderr)
        finally:
            backend.close()
    print(f"bake: MOVINET_MODEL={model or '(none: mount one)'}; {len(labels)} labels", file=sys.stderr)
    return model


def main(argv: list[str] | None = None) -> int:
    from worker.model.backends.base import ModelLoadError

    try:
        bake(parse_args(argv))
    except ModelLoadError as exc:
        print(f"bake: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
