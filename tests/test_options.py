"""The command line speaks with one voice: one flag per concept, old names as hidden aliases, defaults
and choices in --help, and commands that import only what they use."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from worker.cli import SUBCOMMANDS, build_parser

HELP_EXAMPLE = '[{"name": "exercise", "group": "exercise", "threshold": 0.6}]'


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]  # type: ignore[no-any-return]


def _flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: a for a in p._actions for flag in a.option_strings}


CONCEPTS = {  # flag -> the dest every command that has the concept stores it in
    "--redis-url": "redis_url",
    "--predictions-key": "predictions_key",
    "--frames-key": "frames_key",
    "--alerts-key": "alerts_key",
    "--top-k": "top_k",
    "--model": "model",
    "--labels": "labels",
    "--backend": "backend",
}
OLD_NAMES = [  # command, old flag, value, the canonical dest
    ("tail", "--key-template", "p:{<camera>}", "predictions_key"),
    ("alerts", "--key", "a:{<camera>}", "alerts_key"),
    ("publish", "--key-template", "f:{<camera>}", "frames_key"),
    ("classify", "--top", "3", "top_k"),
    ("plot", "--top", "3", "top_k"),
    ("render", "--top", "3", "top_k"),
    ("bench", "--json", "out.json", "json_path"),
    ("bench-model", "--json", "out.json", "json_path"),
]
REQUIRED = {
    "classify": ["clip.mp4"],
    "render": ["clip.mp4", "--out", "x.gif"],
    "publish": ["clip.mp4", "--camera", "c"],
    "plot": ["--camera", "c", "--out", "x.png"],
}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_one_flag_per_concept_with_the_same_dest_everywhere(command: str) -> None:
    flags = _flags(_sub(command))
    for flag, dest in CONCEPTS.items():
        if flag in flags:
            assert flags[flag].dest == dest, (command, flag)
    for old in ("--key-template", "--key", "--top", "--json-path"):
        if old in flags:
            assert flags[old].help == argparse.SUPPRESS, f"{command} {old} should be a hidden alias"


@pytest.mark.parametrize(("command", "old", "value", "dest"), OLD_NAMES)
def test_old_names_still_work_and_are_hidden(command: str, old: str, value: str, dest: str) -> None:
    p = _sub(command)
    args = p.parse_args([*REQUIRED.get(command, []), old, value])
    new = next(f for f in _flags(p) if _flags(p)[f].dest == dest and _flags(p)[f].help != argparse.SUPPRESS)
    assert getattr(args, dest) == p.parse_args([*REQUIRED.get(command, []), new, value]).__dict__[dest]
    assert old not in p.format_help().replace(new, "")


def test_help_shows_defaults_and_choices() -> None:
    run = " ".join(_sub("run").format_help().split())
    assert "(default: 9108)" in run and "{windows,ema}" in run and "(default: windows)" in run
    assert "[env: MOVINET_TOP_K]" in run and "(default: frames:{<camera>})" in run
    tail = _sub("tail").format_help()
    assert "(default: redis://127.0.0.1:6379/0) [env: REDIS_URL]" in " ".join(tail.split())
    for command in SUBCOMMANDS:  # every help renders (a stray % would raise here)
        _sub(command).format_help()


def test_help_hides_a_password_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://app:s3cret@redis:6379/0")
    text = _sub("tail").format_help()
    assert "s3cret" not in text and "redis://app:***@redis:6379/0" in " ".join(text.split())


def test_alert_rules_takes_the_json_its_help_shows() -> None:
    from worker.config import settings_from_args

    assert HELP_EXAMPLE in " ".join(_sub("run").format_help().split())
    args = _sub("config").parse_args(["--alert-rules", HELP_EXAMPLE])
    rules = settings_from_args(args).alert_rules
    assert [(r.name, r.group, r.threshold) for r in rules] == [("exercise", "exercise", 0.6)]


def _imported(*argv: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "worker", *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[-1].strip() for line in lines}


@pytest.mark.parametrize("argv", [("--help",), ("check", "--metrics-port", "1"), ("tail", "--help")])
def test_light_commands_load_only_what_they_use(argv: tuple[str, ...]) -> None:
    modules = _imported(*argv)
    assert "worker.cli" in modules or "worker" in modules, "importtime output not understood"
    heavy = {"numpy", "av", "tensorflow", "ai_edge_litert", "simplejpeg", "matplotlib"}
    assert not heavy & modules, f"{argv} imports {sorted(heavy & modules)}"
    assert not {
        m
        for m in modules
        if m.startswith(("worker.bench", "worker.pipeline.worker", "worker.model.backends"))
    }
