"""`movinet-worker`: one command, a subcommand per job.

The parser is built lazily: every subcommand is listed, but only the one being run gets its options
(and imports what they need), so `--help` and `check` load neither the bench, the worker, PyAV nor
TensorFlow. Flags share one vocabulary (worker/options.py): `--redis-url`, `--model`/`--backend`/
`--labels`, `--frames-key`, `--predictions-key`, `--alerts-key`, `--top-k`, sizes as HxW; each reads
its environment variable the same way, and renamed flags are kept as hidden aliases.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worker import keys
from worker.constants import DEFAULT_REDIS_URL
from worker.options import (
    HelpFormatter,
    Parser,
    alias,
    env_option,
    model_options,
    non_negative_float,
    positive_int,
    redis_url,
    redis_url_option,
    require,
    top_k_option,
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _key_option(p: Parser, flag: str, env: str, default: str, help: str, *, old: str | None = None) -> None:
    from worker.keys import to_format

    env_option(p, flag, env=env, default=default, type=to_format, metavar="TEMPLATE", help=help)
    if old:
        alias(p, flag[2:].replace("-", "_"), old, type=to_format)


def _follow_args(p: Parser, what: str) -> None:
    """The options `tail` and `alerts` share."""
    redis_url_option(p, "Redis to read from")
    p.add_argument("--from-start", action="store_true", help="print the retained history first")
    p.add_argument("--count", type=positive_int, default=None, help=f"exit after this many {what}")
    p.add_argument("--timeout", type=non_negative_float, default=None, help="exit after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _classify(p: Parser) -> None:
    p.add_argument("source", help="video file, GIF, or rtsp:// / http:// URL")
    model_options(p)
    p.add_argument(
        "--fps",
        type=non_negative_float,
        default=None,
        help="frames per second fed to the model (default: the rate it was trained at, "
        "5 for A0-A2; 0 feeds every decoded frame)",
    )
    top_k_option(p, "labels to print")
    p.add_argument("--every-frame", action="store_true", help="also print the top-1 after each frame")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _export(p: Parser) -> None:
    p.add_argument("--id", dest="model_id", default="a0", choices=["a0", "a1", "a2", "a3", "a4", "a5"])
    p.add_argument("--mode", choices=("stream", "base"), default="stream")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--random-weights", action="store_true", help="random initial weights (tests, benchmarks)"
    )
    weights.add_argument("--checkpoint", help="TF checkpoint prefix to load (a fine-tuned model)")
    p.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="input height and width (default: the size's own)",
    )
    p.add_argument("--num-classes", type=positive_int, default=600, help="classes of the classifier head")
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


def _bench_model(p: Parser) -> None:
    p.add_argument(
        "--tf-model",
        action="append",
        default=[],
        help="stream SavedModel folder or handle (repeatable; the first is the baseline)",
    )
    p.add_argument("--tflite", action="append", default=[], help="TFLite stream model (repeatable)")
    p.add_argument("--batch", type=_int_list, default=[1, 8, 32], help="cameras per step, e.g. 1,8,32")
    p.add_argument(
        "--layouts", default="1x1,1x2,2x1", help="LiteRT interpreters x threads each, e.g. 1x1,2x1"
    )
    p.add_argument("--steps", type=positive_int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    p.add_argument("--baseline-cameras", type=positive_int, default=4, help="cameras in the tutorial's loop")
    p.add_argument(
        "--json-out", dest="json_path", metavar="FILE", help="also write the figures to this JSON file"
    )
    alias(p, "json_path", "--json")


def _bench(p: Parser) -> None:
    from worker.bench.main import add_bench_arguments

    add_bench_arguments(p)


def _settings_options(p: Parser) -> None:
    from worker.config import add_settings_arguments
    from worker.options import latency_budget_option

    add_settings_arguments(p)
    latency_budget_option(p)


def _check(p: Parser) -> None:
    p.add_argument(
        "--url",
        default=None,
        help="/readyz or /metrics URL (default: http://127.0.0.1:<metrics port>/readyz)",
    )
    p.add_argument("--redis", action="store_true", help="also PING Redis (REDIS_URL)")
    p.add_argument("--timeout", type=non_negative_float, default=3.0, help="seconds per probe")
    _settings_options(p)


def _tail(p: Parser) -> None:
    p.add_argument("--camera", help="one camera (default: every predictions stream found)")
    _key_option(
        p,
        "--predictions-key",
        "MOVINET_PREDICTIONS_KEY",
        keys.PREDICTIONS_KEY,
        "predictions stream of a camera, <camera> standing for its ID",
        old="--key-template",
    )
    _follow_args(p, "predictions")


def _alerts(p: Parser) -> None:
    p.add_argument("--camera", help="only this camera")
    _key_option(
        p,
        "--alerts-key",
        "MOVINET_ALERTS_KEY",
        keys.ALERTS_STREAM,
        "alerts stream, or one per camera, e.g. 'alerts:{<camera>}'",
        old="--key",
    )
    _follow_args(p, "events")


def _explain(p: Parser) -> None:
    from worker.tools.explain import add_explain_arguments

    add_explain_arguments(p)
    _key_option(
        p,
        "--evidence-key",
        "MOVINET_EVIDENCE_KEY",
        keys.EVIDENCE_KEY,
        "evidence index of a camera, <camera> standing for its ID (as the worker's --evidence-key)",
    )


def _plot(p: Parser) -> None:
    from worker.tools.plot import add_plot_arguments

    add_plot_arguments(p)


def _render(p: Parser) -> None:
    from worker.tools.render import add_render_arguments

    add_render_arguments(p)


def _publish(p: Parser) -> None:
    from worker.tools.publish import add_publish_arguments

    add_publish_arguments(p)


def _ingest(p: Parser) -> None:
    from worker.ingest.settings import add_ingest_arguments

    add_ingest_arguments(p)


def _demo(p: Parser) -> None:
    p.add_argument(
        "--source",
        default=None,
        help="clip to publish (default: the tutorial's jumping-jacks GIF, downloaded)",
    )
    p.add_argument("--camera", default="demo", help="camera ID the clip is published as")
    p.add_argument(
        "--loops", type=positive_int, default=1, help="publish the clip this many times back to back"
    )
    p.add_argument(
        "--timeout", type=non_negative_float, default=120.0, help="give up waiting for predictions after this"
    )
    _settings_options(p)


# name: (one-line help, description, the function adding its options)
SUBCOMMANDS: dict[str, tuple[str, str, Callable[[Parser], None]]] = {
    "classify": (
        "classify a video file, GIF or stream URL (no Redis)",
        "Decode SOURCE with PyAV, resample it to the model's frame rate by timestamps, resize to the "
        "model's resolution and run the model: a stream model frame by frame with its state, a base "
        "model on the whole clip. Prints the final top-K labels.",
        _classify,
    ),
    "export-model": (
        "export a MoViNet in the TF Hub format (needs the [export] extra)",
        "Build MoViNet with tf-models-official and save it as TF Hub publishes it: stream models with "
        "init_states and the state-passing call, base models with serving_default. Weights are random "
        "(--random-weights) or a checkpoint (--checkpoint); the weights used are also written to "
        "OUT/checkpoint.",
        _export,
    ),
    "bench-model": (
        "model-only speed per backend and batch vs the tutorial's loop",
        "Times each backend stepping N cameras by one frame (median ms per frame, frames/s) next to the "
        "tutorial's way (the TF Hub object, batch 1, camera after camera), all in one process.",
        _bench_model,
    ),
    "bench": (
        "measure the whole worker: baseline, model-only, end to end, live, where time goes",
        "One run on this machine: the tutorial's loop as baseline, each backend model-only, a worker "
        "draining N cameras preloaded in a private local Redis, the most live 5 fps cameras held with "
        "p99 under each latency budget (200 ms, 1 s) and the live efficiency, and the time per stage, "
        "in each temporal mode (windows, ema); prints a table, --json-out writes it; --sizing plans "
        "workers and Redis shards from such a JSON.",
        _bench,
    ),
    "run": (
        "serve cameras: frames from Redis in, predictions out",
        "Read every camera's frame stream (frames:{camera}) with a consumer group, keep two staggered "
        "MoViNet windows per camera on the model's slot clock, publish one prediction per camera per "
        "slot to predictions:{camera}, export Prometheus metrics. SIGTERM drains and exits 0.",
        _settings_options,
    ),
    "config": (
        "validate the configuration and print it (exit 2 naming a bad field)",
        "Merge defaults, environment and flags exactly as `run` does and print the result.",
        _settings_options,
    ),
    "check": (
        "health check: exit 0 when the local worker is ready",
        "Exit 0 when the worker's metrics endpoint reports it ready (model loaded, serving) and, with "
        "--redis, Redis answers a PING; else print why and exit 1. For liveness and readiness probes.",
        _check,
    ),
    "tail": (
        "print predictions as they arrive",
        "Follow predictions:{camera} streams (one camera, or all found) and print each prediction: "
        "time, slot, frames of context and the top labels.",
        _tail,
    ),
    "alerts": (
        "print action alert events as they arrive",
        "Follow the alerts stream and print open / update / close events: camera, rule, label, "
        "interval and peak score.",
        _alerts,
    ),
    "explain": (
        "replay the model on an alert's evidence: published vs replayed scores, and a picture",
        "Read the evidence the worker kept for ALERT_ID (its frames as received and its predictions), "
        "step the same model over the same windows and print, slot by slot, the published score next "
        "to the replayed one and the largest difference; --out draws the frames with their top-K bars "
        "above the score curve, the alert shaded (.png, or .gif for every slot).",
        _explain,
    ),
    "plot": (
        "plot a camera's label probabilities over time, alerts shaded (PNG; needs the [plot] extra)",
        "Read a camera's predictions (and its alert events) from Redis and draw the top labels' "
        "probabilities over time, alert intervals shaded: the tutorial's picture, live.",
        _plot,
    ),
    "render": (
        "render a clip beside its live top-K bar chart (GIF or MP4; needs the [plot] extra)",
        "Run the model over SOURCE frame by frame and write a video with each frame next to the current "
        "top-K probabilities: the tutorial's animation.",
        _render,
    ),
    "publish": (
        "publish a video file, GIF or stream as a camera's frames",
        "Decode SOURCE with PyAV, resize and JPEG-encode frames and XADD them to the camera's frame "
        "stream. Recorded files are stamped with their media time (entry IDs), so they can be published "
        "faster than real time and still land on the right slots; live sources use arrival time.",
        _publish,
    ),
    "ingest": (
        "publish many network cameras' frames, reconnecting through drops",
        "Read every camera of --config (YAML) with PyAV in a thread each, sample to --fps, resize, "
        "JPEG-encode and XADD to its frame stream (trimmed by retention); reconnect with jittered "
        "backoff after errors, ends and stalls. Metrics, /healthz and /readyz on --metrics-port. "
        "SIGHUP re-reads the camera list; SIGTERM stops.",
        _ingest,
    ),
    "demo": (
        "run it all locally: Redis, a worker, a published clip, predictions",
        "Start a local redis-server when REDIS_URL is unset, run a worker with --model, publish a clip "
        "as a camera and print the predictions, then stop everything it started.",
        _demo,
    ),
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given `argv`, only the subcommand it names gets its options (and imports)."""
    parser = Parser(
        prog="movinet-worker",
        description="Action recognition on live camera streams with MoViNet stream models.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, (short, description, add_options) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=short, description=description, formatter_class=HelpFormatter)
        if chosen is None or chosen == name:
            add_options(p)
    return parser


def _settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """`run`'s settings from env and flags; a mistake (a bad field, a URL that is not Redis) exits 2."""
    from worker.config import settings_from_args

    settings = settings_from_args(args, **overrides)
    if settings.redis_url:
        try:
            redis_url(settings.redis_url)
        except argparse.ArgumentTypeError as exc:
            raise SystemExit(f"invalid configuration: redis_url (--redis-url / REDIS_URL): {exc}") from None
    return settings


def _require_model(args: argparse.Namespace) -> str:
    if not args.model:
        raise SystemExit(
            "no model: pass --model (TF Hub handle, SavedModel folder or .tflite file) or set MOVINET_MODEL"
        )
    return str(args.model)


def cmd_classify(args: argparse.Namespace) -> int:
    from worker.tools.classify import classify, print_frame, print_result

    model = _require_model(args)
    if "://" not in args.source and not os.path.exists(args.source):
        raise SystemExit(
            f"no such file {args.source!r}: pass a video file, a GIF, or an rtsp:// / http(s):// URL"
        )
    result = classify(
        args.source,
        model,
        labels=args.labels,
        fps=args.fps,
        top=args.top_k,
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
    from worker.model.export import ExportSpec, export_model

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
    from worker.bench import model as bench_model

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
    from worker.bench.main import cmd_bench as bench

    return bench(args)


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from worker.runner import configure_logging, serve

    settings = _settings(args)
    _preflight(settings)
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings))


def _preflight(settings: Any) -> None:
    """The mistakes a user makes most, found in a second rather than after the model has loaded:
    no model, a Redis that does not answer, a metrics port already taken."""
    import socket

    from worker.pipeline.clients import tool_client

    if not settings.model:
        return  # serve() says so, with the other settings it checks
    if settings.redis_url and not settings.redis_cluster:
        client = tool_client(settings.redis_url, timeout=min(settings.redis_timeout_seconds, 5.0))
        try:
            client.ping()
        finally:
            client.close()
    if settings.metrics_port:
        with socket.socket(socket.AF_INET6 if ":" in settings.metrics_host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.metrics_host, settings.metrics_port))  # EADDRINUSE: see _report


def cmd_config(args: argparse.Namespace) -> int:
    from worker.runner import print_config

    print_config(_settings(args))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from worker.probe import check

    settings = _settings(args)
    url = args.url or f"http://127.0.0.1:{settings.metrics_port}/readyz"
    ok, message = check(url, settings.redis_url if args.redis else None, args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_tail(args: argparse.Namespace) -> int:
    from worker.pipeline.clients import tool_client
    from worker.tools.tail import follow, prediction_streams

    client = tool_client(args.redis_url)
    try:
        follow(
            client,
            prediction_streams(client, args.predictions_key, args.camera),
            from_start=args.from_start,
            count=args.count,
            timeout=args.timeout,
            as_json=args.json,
        )
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from schemas.alerts import Alert
    from worker.pipeline.clients import tool_client
    from worker.tools.tail import follow, format_alert, prediction_streams

    client = tool_client(args.redis_url)
    streams = (
        prediction_streams(client, args.alerts_key, args.camera)
        if "{camera}" in args.alerts_key
        else (lambda: [args.alerts_key])
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


def cmd_explain(args: argparse.Namespace) -> int:
    from worker.tools.explain import cmd_explain as explain

    if args.out is not None:
        require("matplotlib", "plot", "explain --out")
    return explain(args, args.evidence_key)


def cmd_plot(args: argparse.Namespace) -> int:
    from worker.tools.plot import cmd_plot as plot

    require("matplotlib", "plot", "plot")
    return plot(args)


def cmd_render(args: argparse.Namespace) -> int:
    from worker.tools.render import cmd_render as render

    require("matplotlib", "plot", "render")
    return render(args)


def cmd_publish(args: argparse.Namespace) -> int:
    from worker.tools.publish import cmd_publish as publish

    return publish(args)


def cmd_ingest(args: argparse.Namespace) -> int:
    from worker.ingest.service import cmd_ingest as ingest

    return ingest(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.runner import configure_logging
    from worker.tools.demo import TUTORIAL_CLIP, run_demo
    from worker.tools.video import open_source

    if not args.model:
        raise SystemExit(
            "demo needs a model: --model PATH (e.g. ../shared/assets/movinet_int8.tflite, a SavedModel "
            "folder from export-model, or a TF Hub handle when online) or MOVINET_MODEL"
        )
    settings = _settings(args, metrics_port=args.metrics_port or 0)
    source = args.source or TUTORIAL_CLIP
    open_source(source, timeout=(10.0, 10.0)).close()  # a missing clip or no network: said before any start
    configure_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    return run_demo(settings, source, args.camera, args.loops, args.timeout)


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
    "explain": cmd_explain,
    "plot": cmd_plot,
    "render": cmd_render,
    "publish": cmd_publish,
    "ingest": cmd_ingest,
    "demo": cmd_demo,
}


def _one_line(text: str) -> str:
    """A multi-line message (e.g. one line per bad setting) as one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def _redis_url(args: argparse.Namespace) -> str:
    from worker.config import redact_url

    return redact_url(getattr(args, "redis_url", None) or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    # TensorFlow's C++ start-up chatter (CUDA probes, CPU flags) says nothing a user can act on.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    name = f"movinet-worker {args.command}"
    try:
        return COMMANDS[args.command](args)
    except SystemExit as exc:  # raised with a message for a user's mistake: one line, exit 2
        if not isinstance(exc.code, str):
            raise
        print(f"{name}: {_one_line(exc.code)}", file=sys.stderr)
        return 2
    except Exception as exc:
        return _report(name, args, exc)


def _report(name: str, args: argparse.Namespace, exc: Exception) -> int:
    """Known failures as one line: 2 for a user's mistake (with the fix), 1 for a failure at run time."""
    from redis import RedisError
    from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

    from worker.model.backends.base import ModelLoadError

    if isinstance(exc, ModelLoadError):
        print(f"{name}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    if isinstance(exc, (ConnectionError, TimeoutError)):  # includes refused, unknown host, no such socket
        print(
            f"{name}: cannot reach Redis at {_redis_url(args)} ({_one_line(str(exc))}): start redis-server "
            "there, or pass --redis-url / set REDIS_URL to where it runs",
            file=sys.stderr,
        )
        return 2
    if isinstance(exc, AuthenticationError):
        print(
            f"{name}: Redis at {_redis_url(args)} refused the credentials ({exc}): put the right user "
            "and password in --redis-url / REDIS_URL (redis://USER:PASSWORD@HOST:PORT/0)",
            file=sys.stderr,
        )
        return 2
    if isinstance(exc, RedisError):  # redis-py's messages carry no password; the URL is redacted
        print(f"{name}: Redis {_redis_url(args)} failed: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    from worker.tools.video import VideoError

    if isinstance(exc, VideoError):
        fix = "check the path or URL"
        if args.command == "demo" and not args.source:
            fix = (
                "the demo downloads the tutorial's clip when --source is not given; offline, pass --source "
                "with a local clip (e.g. ../shared/assets/videos/jumpingjack.gif)"
            )
        print(f"{name}: {_one_line(str(exc))}: {fix}", file=sys.stderr)
        return 2
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        port = getattr(args, "metrics_port", None) or os.environ.get("MOVINET_METRICS_PORT") or "9108"
        print(
            f"{name}: the metrics port {port} is in use ({exc.strerror}): stop what listens there, or pass "
            "--metrics-port / set MOVINET_METRICS_PORT to a free port (0: no metrics server)",
            file=sys.stderr,
        )
        return 2
    raise exc


if __name__ == "__main__":
    sys.exit(main())
