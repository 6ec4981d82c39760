"""The command line's shared vocabulary: one flag name per concept, taken the same way by every command.

Every option a command reads from the environment is declared with `env_option` (the variable's value
is the default, the help says `[env: NAME]`); renamed flags stay as hidden aliases (`alias`) for a
release; `HelpFormatter` shows defaults and choices. Light on purpose: `movinet-worker --help` imports
this and nothing of the worker, the bench, PyAV or TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, NoReturn

from worker.constants import DEFAULT_REDIS_URL, DEFAULT_TOP_K

BACKENDS = ("auto", "tfhub", "litert")


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one line naming the problem and where the fix is, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(text: str) -> str:
    """A URL redis-py can connect to; an http:// or bare host:port is refused with the right spelling."""
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"{_redact(text)!r} is not a Redis URL: write redis://HOST:PORT/DB (rediss:// for TLS, "
            "unix:///path/to/socket)"
        )
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` when there is a default worth saying (not None, False or an empty list, and
    not already said in the help), with any password in a URL default hidden."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = _redact(default) if isinstance(default, str) else _show(default)
        said = f"(default: {shown.replace('%', '%%')})"
        head, env, tail = text.rpartition(" [env: ")
        return f"{head} {said} [env: {tail}" if env else f"{text} {said}"


def _show(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return str(value)


def _redact(text: str) -> str:
    if "://" not in text:
        return text
    from worker.config import redact_url

    return redact_url(text)


def require(module: str, extra: str, command: str) -> None:
    """Exit naming the extra to install when an optional dependency of `command` is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(
            f"{command} needs {module}, which is not installed: pip install 'movinet-worker[{extra}]'"
        )


def env_option(
    parser: argparse.ArgumentParser | Any, *flags: str, env: str, default: Any = None, help: str, **kw: Any
) -> argparse.Action:
    """An option whose default comes from the environment variable `env` (else `default`)."""
    return parser.add_argument(
        *flags, default=os.environ.get(env, default), help=f"{help} [env: {env}]", **kw
    )


def alias(parser: argparse.ArgumentParser | Any, dest: str, *flags: str, **kw: Any) -> None:
    """Old spellings of an option: accepted, hidden from --help, never setting a default of their own."""
    parser.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def size_hw(text: str, minimum: int = 1) -> tuple[int, int]:
    """`HxW` (height x width) in pixels, as every command spells a size."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match or min(int(match[1]), int(match[2])) < minimum:
        raise argparse.ArgumentTypeError(f"expected HxW (height x width) such as 172x172, got {text!r}")
    return int(match[1]), int(match[2])


def redis_url_option(
    parser: argparse.ArgumentParser | Any, what: str, default: str | None = DEFAULT_REDIS_URL
) -> None:
    env_option(
        parser, "--redis-url", env="REDIS_URL", default=default, type=redis_url, metavar="URL", help=what
    )


def top_k_option(parser: argparse.ArgumentParser | Any, what: str) -> None:
    """`--top-k` (`-k`), the name `run` has always used; `--top` stays as a hidden alias."""
    parser.add_argument("--top-k", "-k", type=positive_int, default=DEFAULT_TOP_K, metavar="K", help=what)
    alias(parser, "top_k", "--top", type=positive_int)


def model_options(parser: argparse.ArgumentParser | Any, what: str = "model") -> None:
    """`--model`, `--backend`, `--labels`: as `run` takes them, from the same environment variables."""
    env_option(
        parser,
        "--model",
        "-m",
        env="MOVINET_MODEL",
        metavar="MODEL",
        help=f"{what}: TF Hub handle, SavedModel folder, or .tflite file",
    )
    env_option(
        parser,
        "--backend",
        env="MOVINET_BACKEND",
        default="auto",
        choices=BACKENDS,
        help="auto picks litert for .tflite files, tfhub otherwise",
    )
    env_option(
        parser,
        "--labels",
        env="MOVINET_LABELS",
        metavar="PATH",
        help="label file, one per line (default: the tutorial's list, fetched once and cached)",
    )


def latency_budget_option(parser: argparse.ArgumentParser | Any) -> None:
    """`--latency-budget MS`: the short spelling of the `latency_budget_ms` setting (its flag
    `--latency-budget-ms` and MOVINET_LATENCY_BUDGET_MS work too)."""
    parser.add_argument(
        "--latency-budget",
        dest="latency_budget_ms",
        type=non_negative_float,
        default=argparse.SUPPRESS,
        metavar="MS",
        help="batching: how long after its capture a slot's prediction may be published; a round waits "
        "for more cameras within it (default: one slot, 1000/fps ms; 0: no waiting)",
    )
