"""`movinet-worker`: one command, a subcommand per job."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from worker.backends.base import ModelLoadError
from worker.constants import DEFAULT_TOP_K, LABELS_URL


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        default=_env("MOVINET_MODEL"),
        help="TF Hub handle, SavedModel folder, or .tflite file [env: MOVINET_MODEL]",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "tfhub", "litert"),
        default=_env("MOVINET_BACKEND", "auto"),
        help="auto picks litert for .tflite files, tfhub otherwise [env: MOVINET_BACKEND]",
    )
    p.add_argument(
        "--labels",
        default=_env("MOVINET_LABELS"),
        help=f"label file, one per line; default: fetched once from the tutorial's URL "
        f"({LABELS_URL}) and cached [env: MOVINET_LABELS]",
    )


def _follow_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options `tail` and `alerts` share."""
    p.add_argument(
        "--redis-url", default=_env("REDIS_URL", "redis://127.0.0.1:6379/0"), help="[env: REDIS_URL]"
    )
    p.add_argument("--from-start", action="store_true", help="print the retained history first")
    p.add_argument("--count", type=int, default=None, help=f"exit after this many {what}")
    p.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="movinet-worker",
        description="Action recognition on live camera streams with MoViNet stream models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "classify",
        help="classify a video file, GIF or stream URL (no Redis)",
        description="Decode SOURCE with PyAV, resample it to the model's frame rate by timestamps, "
        "resize to the model's resolution and run the model: a stream model frame by frame with "
        "its state, a base model on the whole clip. Prints the final top-K labels.",
    )
    p.add_argument("source", help="video file, GIF, or rtsp:// / http:// URL")
    _model_args(p)
    p.add_argument(
        "--fps",
        type=_positive_float,
        default=None,
        help="frames per second fed to the model (default: the rate it was trained at, "
        "5 for A0-A2; 0 feeds every decoded frame)",
    )
    p.add_argument("--top", "-k", type=int, default=DEFAULT_TOP_K, help="labels to print (default 5)")
    p.add_argument("--every-frame", action="store_true", help="also print the top-1 after each frame")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    p = sub.add_parser(
        "export-model",
        help="export a MoViNet in the TF Hub format (needs the [export] extra)",
        description="Build MoViNet with tf-models-official and save it as TF Hub publishes it: "
        "stream models with init_states and the state-passing call, base models with "
        "serving_default. Weights are random (--random-weights) or a checkpoint (--checkpoint); "
        "the weights used are also written to OUT/checkpoint.",
    )
    p.add_argument("--id", dest="model_id", default="a0", choices=["a0", "a1", "a2", "a3", "a4", "a5"])
    p.add_argument("--mode", choices=("stream", "base"), default="stream")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--random-weights", action="store_true", help="random initial weights (tests, benchmarks)"
    )
    weights.add_argument("--checkpoint", help="TF checkpoint prefix to load (a fine-tuned model)")
    p.add_argument(
        "--resolution", type=int, default=None, help="input height and width (default: the size's own)"
    )
    p.add_argument("--num-classes", type=int, default=600)
    p.add_argument(
        "--causal",
        action="store_true",
        help="base mode: build the causal network (the stream model's exact twin)",
    )
    p.add_argument(
        "--conv-type",
        choices=("3d", "2plus1d", "3d_2plus1d"),
        default=None,
        help="default 3d; 2plus1d with --tflite (TFLite has no 3D conv or pool kernels)",
    )
    p.add_argument(
        "--se-type", choices=("3d", "2d", "2plus3d"), default=None, help="default 3d; 2plus3d with --tflite"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for --random-weights")
    p.add_argument("--out", required=True, type=Path, help="folder to write the SavedModel to")
    p.add_argument(
        "--tflite",
        action="store_true",
        help="also write OUT.tflite: a float TFLite stream model (batch 1, one frame)",
    )

    p = sub.add_parser(
        "bench-model",
        help="model-only speed per backend and batch vs the tutorial's loop",
        description="Times each backend stepping N cameras by one frame (median ms per frame, "
        "frames/s) next to the tutorial's way (the TF Hub object, batch 1, camera after camera), "
        "all in one process.",
    )
    p.add_argument(
        "--tf-model",
        action="append",
        default=[],
        help="stream SavedModel folder or handle (repeatable; the first is the baseline)",
    )
    p.add_argument("--tflite", action="append", default=[], help="TFLite stream model (repeatable)")
    p.add_argument("--batch", type=_int_list, default=[1, 8, 32], help="cameras per step, e.g. 1,8,32")
    p.add_argument(
        "--layouts",
        default="1x1,1x2,2x1",
        help="LiteRT interpreters x threads each, e.g. 1x1,2x1 (default 1x1,1x2,2x1)",
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    p.add_argument("--baseline-cameras", type=int, default=4)
    p.add_argument("--json", dest="json_path", help="also write the figures to this JSON file")

    from worker.bench import add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="measure the whole worker: baseline, model-only, end to end, live, where time goes",
        description="One run on this machine: the tutorial's loop as baseline, each backend model-only, "
        "a worker draining N cameras preloaded in a private local Redis, the most live 5 fps cameras "
        "held under a p99 of one slot, and the time per stage, in each temporal mode (windows, ema); "
        "prints a table, --json writes it.",
    )
    add_bench_arguments(p)

    from worker.config import add_settings_arguments

    p = sub.add_parser(
        "run",
        help="serve cameras: frames from Redis in, predictions out",
        description="Read every camera's frame stream (frames:{camera}) with a consumer group, keep two "
        "staggered MoViNet windows per camera on the model's slot clock, publish one prediction per "
        "camera per slot to predictions:{camera}, export Prometheus metrics. SIGTERM drains and exits 0.",
    )
    add_settings_arguments(p)
    p = sub.add_parser(
        "config",
        help="validate the configuration and print it (exit 2 naming a bad field)",
        description="Merge defaults, environment and flags exactly as `run` does and print the result.",
    )
    add_settings_arguments(p)
    p = sub.add_parser(
        "check",
        help="health check: exit 0 when the local worker is ready",
        description="Exit 0 when the worker's metrics endpoint reports it ready (model loaded, serving) "
        "and, with --redis, Redis answers a PING; else print why and exit 1. For liveness and "
        "readiness probes.",
    )
    p.add_argument(
        "--url", default=None, help="metrics URL (default: http://127.0.0.1:<metrics port>/metrics)"
    )
    p.add_argument("--redis", action="store_true", help="also PING Redis (REDIS_URL)")
    p.add_argument("--timeout", type=float, default=3.0)
    add_settings_arguments(p)

    p = sub.add_parser(
        "tail",
        help="print predictions as they arrive",
        description="Follow predictions:{camera} streams (one camera, or all found) and print each "
        "prediction: time, slot, frames of context and the top labels.",
    )
    p.add_argument("--camera", help="one camera (default: every predictions stream found)")
    p.add_argument(
        "--key-template",
        default=_env("MOVINET_PREDICTIONS_KEY", "predictions:{{{camera}}}"),
        help="[env: MOVINET_PREDICTIONS_KEY]",
    )
    _follow_args(p, "predictions")

    p = sub.add_parser(
        "alerts",
        help="print action alert events as they arrive",
        description="Follow the alerts stream and print open / update / close events: camera, rule, "
        "label, interval and peak score.",
    )
    p.add_argument("--camera", help="only this camera")
    p.add_argument(
        "--key",
        default=_env("MOVINET_ALERTS_KEY", "alerts"),
        help="alerts stream, or a template with {camera} [env: MOVINET_ALERTS_KEY]",
    )
    _follow_args(p, "events")

    from worker.plot import add_plot_arguments

    p = sub.add_parser(
        "plot",
        help="plot a camera's label probabilities over time, alerts shaded (PNG)",
        description="Read a camera's predictions (and its alert events) from Redis and draw the top "
        "labels' probabilities over time, alert intervals shaded: the tutorial's picture, live.",
    )
    add_plot_arguments(p)

    from worker.render import add_render_arguments

    p = sub.add_parser(
        "render",
        help="render a clip beside its live top-K bar chart (GIF or MP4)",
        description="Run the model over SOURCE frame by frame and write a video with each frame next to "
        "the current top-K probabilities: the tutorial's animation.",
    )
    add_render_arguments(p)

    from worker.publisher import add_publish_arguments

    p = sub.add_parser(
        "publish",
        help="publish a video file, GIF or stream as a camera's frames",
        description="Decode SOURCE with PyAV, resize and JPEG-encode frames and XADD them to the "
        "camera's frame stream. Recorded files are stamped with their media time (entry IDs), so "
        "they can be published faster than real time and still land on the right slots; live "
        "sources use arrival time.",
    )
    add_publish_arguments(p)

    p = sub.add_parser(
        "demo",
        help="run it all locally: Redis, a worker, a published clip, predictions",
        description="Start a local redis-server when REDIS_URL is unset, run a worker with --model, "
        "publish a clip as a camera and print the predictions, then stop everything it started.",
    )
    p.add_argument(
        "--source",
        default=None,
        help="clip to publish (default: the tutorial's jumping-jacks GIF, downloaded)",
    )
    p.add_argument("--camera", default="demo")
    p.add_argument("--loops", type=int, default=1, help="publish the clip this many times back to back")
    p.add_argument("--timeout", type=float, default=120.0, help="give up waiting for predictions after this")
    add_settings_arguments(p)
    return parser


def _require_model(args: argparse.Namespace) -> str:
    if not args.model:
        raise SystemExit(
            "no model: pass --model (TF Hub handle, SavedModel folder or .tflite file) or set MOVINET_MODEL"
        )
    return str(args.model)


def cmd_classify(args: argparse.Namespace) -> int:
    from worker.classify import classify, print_frame, print_result

    result = classify(
        args.source,
        _require_model(args),
        labels=args.labels,
        fps=args.fps,
        top=args.top,
        backend=args.backend,
        progress=False if args.no_progress else None,
        on_frame=print_frame if args.every_frame and not args.json else None,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print_result(result)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from worker.export import ExportSpec, export_model

    lite = args.tflite
    spec = ExportSpec(
        model_id=args.model_id,
        mode=args.mode,
        resolution=args.resolution,
        num_classes=args.num_classes,
        checkpoint=args.checkpoint,
        causal=args.causal,
        conv_type=args.conv_type or ("2plus1d" if lite else "3d"),
        se_type=args.se_type or ("2plus3d" if lite else "3d"),
        seed=args.seed,
    )
    meta = export_model(spec, args.out, tflite=lite)
    print(f"wrote {args.out}" + (f" and {meta['tflite']}" if lite else ""))
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from worker import bench_model

    if not args.tf_model and not args.tflite:
        raise SystemExit("bench-model needs --tf-model and/or --tflite")
    layouts = []
    for item in args.layouts.split(","):
        interp, _, threads = item.partition("x")
        layouts.append((int(interp), int(threads or 1)))
    rows = bench_model.run(
        tf_models=args.tf_model,
        tflite_models=args.tflite,
        batches=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        baseline_cameras=args.baseline_cameras,
        layouts=layouts,
    )
    m = bench_model.machine()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores; median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(bench_model.format_table(rows))
    if args.json_path:
        bench_model.write_json(args.json_path, rows, {k: v for k, v in vars(args).items() if k != "func"})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from worker.bench import cmd_bench as bench

    return bench(args)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from worker.config import settings_from_args
    from worker.runner import configure_logging, serve

    settings = settings_from_args(args)
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


def cmd_config(args: argparse.Namespace) -> int:
    from worker.config import settings_from_args
    from worker.runner import print_config

    print_config(settings_from_args(args))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from worker.config import settings_from_args
    from worker.runner import check

    settings = settings_from_args(args)
    url = args.url or f"http://127.0.0.1:{settings.metrics_port}/metrics"
    ok, message = check(url, settings.redis_url if args.redis else None, args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_tail(args: argparse.Namespace) -> int:
    import redis

    from worker.tail import follow, prediction_streams

    client = redis.Redis.from_url(args.redis_url)
    try:
        follow(
            client,
            prediction_streams(client, args.key_template, args.camera),
            from_start=args.from_start,
            count=args.count,
            timeout=args.timeout,
            as_json=args.json,
        )
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    import redis

    from schemas.alerts import Alert
    from worker.tail import follow, format_alert, prediction_streams

    client = redis.Redis.from_url(args.redis_url)
    streams = (
        prediction_streams(client, args.key, args.camera) if "{camera}" in args.key else (lambda: [args.key])
    )
    camera = args.camera
    try:
        follow(
            client,
            streams,
            from_start=args.from_start,
            count=args.count,
            timeout=args.timeout,
            as_json=args.json,
            message=Alert,
            fmt=format_alert,
            keep=(lambda a: a.camera == camera) if camera else None,
        )
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from worker.plot import cmd_plot as plot

    return plot(args)


def cmd_render(args: argparse.Namespace) -> int:
    from worker.render import cmd_render as render

    return render(args)


def cmd_publish(args: argparse.Namespace) -> int:
    from worker.publisher import cmd_publish as publish

    return publish(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.config import settings_from_args
    from worker.demo import TUTORIAL_CLIP, run_demo
    from worker.runner import configure_logging

    if not args.model:
        raise SystemExit(
            "demo needs a model: --model PATH (e.g. ../shared/assets/movinet_int8.tflite, a SavedModel "
            "folder from export-model, or a TF Hub handle when online) or MOVINET_MODEL"
        )
    settings = settings_from_args(args, metrics_port=args.metrics_port or 0)
    configure_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    return run_demo(settings, args.source or TUTORIAL_CLIP, args.camera, args.loops, args.timeout)


COMMANDS = {
    "classify": cmd_classify,
    "export-model": cmd_export,
    "bench-model": cmd_bench_model,
    "bench": cmd_bench,
    "run": cmd_run,
    "config": cmd_config,
    "check": cmd_check,
    "tail": cmd_tail,
    "alerts": cmd_alerts,
    "plot": cmd_plot,
    "render": cmd_render,
    "publish": cmd_publish,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ start-up chatter (CUDA probes, CPU flags) says nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return COMMANDS[args.command](args)
    except ModelLoadError as exc:
        print(f"movinet-worker: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
