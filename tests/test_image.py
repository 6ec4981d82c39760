"""The container image, built and run: deploy/Dockerfile with podman, then the image's own files run.

The base stands in for `python:3.11-slim-bookworm` (no registry for base images is reachable from
CI): Debian's Python made with `mmdebstrap` and imported into podman once, then kept. The runtime
and publisher stages are built from a temporary copy of the build context (the files
`deploy/Dockerfile.dockerignore` lets through) with the real int8 model, labels and clip from
../shared/assets in its git-ignored `deploy/models/`; nothing is copied into the repository.
podman keeps the layers, so a second run rebuilds nothing unless the code changed (then only the
worker's own layer: the dependencies are a layer of their own, keyed by pyproject.toml).

OCI runtimes cannot start containers here (crun and runc fail on setrlimit), so the image is run
the way a container runtime would run it, with util-linux: `podman image mount` gives the image's
file system, a private mount namespace makes it read-only with a tmpfs at /tmp, and `unshare`
starts the image's entrypoint (tini) as PID 1 of a new PID namespace, chrooted, in the image's
working directory, as the image's user, with the image's environment. The network is the host's
(Redis on loopback), or none at all where the test says so.

CI (.ci/run) installs podman, buildah and mmdebstrap; elsewhere the tests skip when they are
missing, or when the shared assets are absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ASSETS, ROOT
from worker.config import Settings

pytestmark = pytest.mark.slow

BASE = "localhost/python:3.11-slim-bookworm"
TAG = "localhost/movinet-worker:image-test"
MODEL, LABELS, CLIP = "movinet_int8.tflite", "kinetics600_label_map.txt", "jumpingjack.gif"
# The LiteRT runtime image measured 523 MB: Debian's Python base 225 MB (python:3.11-slim is about
# 130 MB), the venv about 290 MB (PyAV with its FFmpeg 104, numpy 73, LiteRT 59, pip and setuptools
# 23, redis, pydantic, pyyaml and the rest), the int8 model 3 MB. The budget is the target,
# 600 MB, a fifth of the TensorFlow variant (2.62 GB): 77 MB of room for dependency updates; TensorFlow
# creeping back in (1.8 GB unpacked) or build tools left in the image break it.
SIZE_BUDGET_MB = 600
# The host's CA bundle, mounted over the image's during the build: pip inside the build trusts the
# package index only with it where a proxy re-signs TLS (and it is the same bundle elsewhere).
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# Inside a private mount namespace: the image's root read-only, /tmp a tmpfs, /dev the host's;
# then tini (the entrypoint) as PID 1 of a new PID namespace, chrooted there as the image's user.
RUN_SCRIPT = r"""
set -e
root=$IMG_ROOT wd=$IMG_WORKDIR uid=$IMG_UID gid=$IMG_GID
unset IMG_ROOT IMG_WORKDIR IMG_UID IMG_GID
mount --make-rprivate /
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t tmpfs -o mode=1777,size=256m tmpfs "$root/tmp"
mount --rbind /dev "$root/dev"
exec unshare --pid --fork --kill-child --mount-proc --root="$root" --wd="$wd" \
    --setuid "$uid" --setgid "$gid" -- "$@"
"""


# Without TensorFlow installed, every module of the package imports (TensorFlow is imported only
# inside the functions of the TF Hub backend and the exporter) and none pulls TensorFlow in.
IMPORT_PROBE = r"""
import importlib, importlib.util, pkgutil, sys
import schemas, worker
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed"
names = [m.name for p in (worker, schemas) for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    if name != "worker.__main__":  # runs the CLI
        importlib.import_module(name)
assert not {"tensorflow", "tensorflow_hub", "tf_keras"} & set(sys.modules), "TensorFlow was imported"
print(len(names))
"""


def need(ok: Any, why: str) -> None:
    if not ok:
        pytest.skip(why)


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def base_image(tmp: Path) -> None:
    """The stand-in for python:3.11-slim-bookworm, made once from Debian packages and kept."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        return
    tar = tmp / "base.tar"
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python-is-python3,ca-certificates",
            "bookworm",
            str(tar),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    podman(
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change",
        'CMD ["python3"]',
        str(tar),
        BASE,
        timeout=300,
    )
    tar.unlink()


def build_context(dest: Path) -> Path:
    """The files deploy/Dockerfile.dockerignore lets through, plus the assets in deploy/models/."""
    from tests.support.deploy import ignored

    ignore = ROOT / "deploy" / "Dockerfile.dockerignore"
    patterns = [
        line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for folder, dirs, files in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            rel = (here / name).relative_to(ROOT)
            if not ignored(str(rel), patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(here / name, dest / rel)
    # The Dockerfile itself is read from the repository (-f), not the context.
    assert (dest / "worker" / "cli.py").is_file() and not (dest / "tests").exists()
    models = dest / "deploy" / "models"
    for source in (ASSETS / MODEL, ASSETS / LABELS, ASSETS / "videos" / CLIP):
        shutil.copyfile(source, models / source.name)
    return dest


@dataclass
class Build:
    code: int
    seconds: float
    log: str


def build(context: Path, target: str, tag: str, tmp: Path, **build_args: str) -> Build:
    pip_conf = tmp / "pip.conf"
    pip_conf.write_text(f"[global]\ncert = {CA_BUNDLE}\n")
    volumes = ["-v", f"{pip_conf}:/etc/pip.conf:ro"]
    if CA_BUNDLE.is_file():
        volumes += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    args = [f"--build-arg={k}={v}" for k, v in {"PYTHON_IMAGE": BASE, **build_args}.items()]
    started = time.monotonic()
    proc = subprocess.run(
        [
            "podman",
            "build",
            "--isolation",
            "chroot",
            "--network",
            "host",
            "--layers",
            "--format",
            "docker",  # OCI image configs have no HEALTHCHECK
            *volumes,
            "-f",
            str(ROOT / "deploy" / "Dockerfile"),
            "--target",
            target,
            *args,
            "-t",
            tag,
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return Build(proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr)


class Image:
    """A built image's file system (mounted by podman) and config, run as a container runtime would."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        (info,) = json.loads(podman("image", "inspect", tag).stdout)
        self.size = int(info["Size"])
        self.config: dict[str, Any] = info["Config"]
        self.healthcheck: dict[str, Any] = info.get("Healthcheck") or {}
        self.env = dict(item.split("=", 1) for item in self.config.get("Env", []))
        self.root = podman("image", "mount", tag).stdout.strip()
        assert Path(self.root, "opt").is_dir(), self.root

    def close(self) -> None:
        podman("image", "unmount", self.tag, check=False)

    def command(
        self, argv: list[str] | None = None, network: bool = True, entrypoint: list[str] | None = None
    ) -> list[str]:
        """The entrypoint with `argv` (default: the image's CMD), as an argv for Popen."""
        argv = self.config["Cmd"] if argv is None else argv
        entrypoint = self.config["Entrypoint"] if entrypoint is None else entrypoint
        unshare = ["unshare", "--mount", "--propagation", "private", *([] if network else ["--net"])]
        return [*unshare, "--", "sh", "-c", RUN_SCRIPT, "image", *entrypoint, *argv]

    def environ(self, **overrides: str) -> dict[str, str]:
        uid, _, gid = self.config["User"].partition(":")
        return {
            **self.env,
            **overrides,
            "IMG_ROOT": self.root,
            "IMG_WORKDIR": self.config.get("WorkingDir") or "/",
            "IMG_UID": uid,
            "IMG_GID": gid or uid,
        }

    def run(
        self,
        argv: list[str],
        network: bool = True,
        timeout: float = 120,
        entrypoint: list[str] | None = None,
        **env: str,
    ) -> subprocess.CompletedProcess[str]:
        command = self.command(argv, network, entrypoint)
        with subprocess.Popen(
            command, env=self.environ(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    def python(self, code: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Python inside the image (under its init): the entrypoint runs the worker, not python."""
        return self.run(["-c", code], entrypoint=["tini", "--", "python"], **env)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def stop(proc: subprocess.Popen[Any], timeout: float = 10) -> None:
    """End a run of the image: SIGTERM to its PID 1 (tini), then SIGKILL, which ends its whole PID
    namespace. Not the runner: `unshare --kill-child` cannot reach a child that changed its uid."""
    inits = children(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        for pid in inits:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def wait_for(condition: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> float:
    started = time.monotonic()
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} while waiting for {what}")
        assert time.monotonic() - started < timeout, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return "movinet_worker_ready 1.0" in response.read().decode()
    except OSError:
        return False


@dataclass
class Built:
    runtime: Image
    publisher: Image
    context: Path
    tmp: Path


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    for tool in ("podman", "mmdebstrap", "unshare"):
        need(shutil.which(tool), f"{tool} is not installed (.ci/run installs podman and mmdebstrap)")
    need((ASSETS / MODEL).is_file(), f"real reference assets not found at {ASSETS} (outside the repository)")
    with tempfile.TemporaryDirectory(prefix="movinet-image-") as name:
        tmp = Path(name)
        started = time.monotonic()
        base_image(tmp)
        base_seconds = time.monotonic() - started
        context = build_context(tmp / "context")
        args = {"MODEL_FILE": MODEL, "LABELS_FILE": LABELS, "CLIP_FILE": CLIP}
        runtime = build(context, "runtime", TAG, tmp, **args)
        assert runtime.code == 0, runtime.log[-5000:]
        publisher = build(context, "publisher", TAG + "-publisher", tmp, **args)
        assert publisher.code == 0, publisher.log[-5000:]
        print(
            f"\nimage build: base {base_seconds:.1f} s, runtime {runtime.seconds:.1f} s, "
            f"publisher {publisher.seconds:.1f} s"
        )
        images = [Image(TAG), Image(TAG + "-publisher")]
        try:
            yield Built(images[0], images[1], context, tmp)
        finally:
            for image in images:
                image.close()


def test_image_size_is_within_budget(built: Built) -> None:
    mb = built.runtime.size / 1e6
    print(f"\nruntime image {TAG}: {mb:.0f} MB (budget {SIZE_BUDGET_MB} MB)")
    assert mb <= SIZE_BUDGET_MB, f"the LiteRT image is {mb:.0f} MB, over its {SIZE_BUDGET_MB} MB budget"


def test_image_config_user_entrypoint_and_no_tensorflow(built: Built) -> None:
    image = built.runtime
    assert image.config["User"] == "10001:10001"
    assert image.config["Entrypoint"] == ["tini", "--", "movinet-worker"]
    assert image.config["Cmd"] == ["run"]
    assert image.env["MOVINET_MODEL"] == f"/opt/movinet/models/{MODEL}"
    # The LiteRT image carries no TensorFlow, and every worker module imports without it.
    probe = image.python(IMPORT_PROBE)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert int(probe.stdout) >= 30, probe.stdout


def test_root_is_read_only_but_tmp(built: Built) -> None:
    """The harness's read-only view has teeth: the image's own user can write /tmp and nothing else."""
    probe = built.runtime.python(
        "import os, errno\n"
        "open('/tmp/x', 'w').write('ok')\n"
        "for path in ('/opt/movinet/x', '/x', '/opt/venv/x'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "    except OSError as exc:\n"
        "        assert exc.errno in (errno.EROFS, errno.EACCES), exc\n"
        "    else:\n"
        "        raise SystemExit(f'wrote {path}')\n"
        "print(os.getuid(), os.getgid(), os.getpid())\n"
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    # The image's user, and the probe is the child of PID 1 (tini) in its own PID namespace.
    assert probe.stdout.split() == ["10001", "10001", "2"], probe.stdout


def test_baked_model_and_labels_classify_a_clip_with_no_network(built: Built) -> None:
    """The publisher image (runtime plus the clip from the build context) in an empty network."""
    out = built.publisher.run(
        ["classify", "/opt/movinet/clips/clip", "--json", "--no-progress"], network=False, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["top"][0]["label"] == "jumping jacks" and result["top"][0]["score"] >= 0.95, result["top"]


def test_a_bad_model_file_fails_the_build(built: Built) -> None:
    # Not a model at all: the labels file under a .tflite name, in the context.
    bogus = built.context / "deploy" / "models" / "bogus.tflite"
    shutil.copyfile(built.context / "deploy" / "models" / LABELS, bogus)
    try:
        for name in ("missing.tflite", "bogus.tflite"):
            failed = build(
                built.context, "runtime", TAG + "-bad", built.tmp, MODEL_FILE=name, LABELS_FILE=LABELS
            )
            assert failed.code != 0, f"MODEL_FILE={name} built"
            assert "bake:" in failed.log and name in failed.log, failed.log[-3000:]
            assert podman("image", "exists", TAG + "-bad", check=False).returncode != 0
    finally:
        bogus.unlink()


def test_worker_serves_a_published_clip_and_drains_on_sigterm(built: Built) -> None:
    import redis

    from schemas.messages import Prediction
    from worker.testing import free_port, local_redis

    need(shutil.which("redis-server"), "redis-server is not installed")
    settings = Settings(redis_url="redis://x")  # the image keeps the default key names
    grace = settings.grace_seconds
    camera = "gate"
    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with local_redis() as redis_url:
        client = redis.Redis.from_url(redis_url)
        env = {
            "REDIS_URL": redis_url,
            "MOVINET_METRICS_PORT": str(metrics_port),
            "MOVINET_METRICS_HOST": "127.0.0.1",
            "MOVINET_GRACE_SECONDS": str(grace),
        }
        log = built.tmp / "worker.log"
        with log.open("w") as sink:
            started = time.monotonic()
            proc = subprocess.Popen(
                built.runtime.command(), env=built.runtime.environ(**env), stdout=sink, stderr=sink
            )
        looping: subprocess.Popen[bytes] | None = None
        try:
            wait_for(lambda: ready(url), 300, "the worker to be ready", proc)
            print(f"\nruntime image: start to ready {time.monotonic() - started:.2f} s")
            # PID 1 of the container is tini, whose one child is the worker, as the image's user.
            (init,) = children(proc.pid)
            init_status = status(init)
            assert init_status["NSpid"].split()[-1] == "1", init_status["NSpid"]
            assert Path(f"/proc/{init}/cmdline").read_bytes().split(b"\0")[0] == b"tini"
            (worker,) = children(init)
            assert status(worker)["Uid"].split() == ["10001"] * 4
            assert status(worker)["Gid"].split() == ["10001"] * 4
            # The image's HEALTHCHECK command, run inside the image.
            kind, *probe = built.runtime.healthcheck["Test"]
            assert kind == "CMD" and probe[:3] == ["python", "-m", "worker.pipeline.health"], (
                built.runtime.healthcheck
            )
            health = built.runtime.run(probe, entrypoint=[], **env)
            assert health.returncode == 0, health.stderr

            # The publisher image publishes the clip from its build context (as fast as it decodes).
            published = built.publisher.run(
                ["publish", "/opt/movinet/clips/clip", "--camera", camera, "--no-progress"], **env
            )
            assert published.returncode == 0, published.stderr[-3000:]
            stream = settings.predictions_stream(camera)
            frames = client.xlen(settings.frames_stream(camera))
            assert frames >= 8, frames

            def last() -> Prediction | None:
                entries = client.xrevrange(stream, count=1)
                return Prediction.from_fields(entries[0][1]) if entries else None

            def settled() -> bool:
                before = client.xlen(stream)
                time.sleep(1.0)
                return before > 0 and client.xlen(stream) == before

            wait_for(settled, 120, "predictions for the clip", proc)
            prediction = last()
            assert prediction is not None and prediction.camera == camera
            top = prediction.top[0]
            assert top.label == "jumping jacks" and top.score >= 0.9, prediction.top

            # The publisher image as shipped (its CMD: the clip looped in real time as camera
            # "demo"), so that frames are arriving when the worker is told to stop.
            looping = subprocess.Popen(
                built.publisher.command(),
                env=built.publisher.environ(**env),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            demo = settings.predictions_stream("demo")
            wait_for(lambda: client.xlen(demo) >= 3, 60, "predictions for the looping publisher", looping)

            os.kill(init, signal.SIGTERM)  # what the kubelet does: SIGTERM to the container's PID 1
            signalled = time.monotonic()
            code = proc.wait(timeout=grace + 10)
            drained = time.monotonic() - signalled
        finally:
            for running in (proc, looping):
                if running is not None:
                    stop(running)
            client.close()
        text = log.read_text()
        print(f"runtime image: drained and exited {code} in {drained:.2f} s (grace {grace:g} s)")
        assert code == 0, text[-3000:]
        assert drained < grace, f"drain took {drained:.1f} s, grace is {grace:g} s"
        assert "Read-only file system" not in text and "Permission denied" not in text, text[-3000:]
        # Drained: it left the worker registry and handed its camera back on the way out.
        with redis.Redis.from_url(redis_url) as after:
            assert after.zcard(settings.workers_key) == 0
            assert not after.exists(settings.owner(camera))


def test_litert_install_needs_no_tensorflow(tmp_path: Path) -> None:
    """pip install '.[litert]' into a fresh venv: no TensorFlow, and the worker runs a clip."""
    need((ASSETS / MODEL).is_file(), f"real reference assets not found at {ASSETS}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", f"{ROOT}[litert]"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "ai-edge-litert" in names and not names & {"tensorflow", "tensorflow-hub", "tf-keras"}, names
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    imports = subprocess.run(
        [str(py), "-c", IMPORT_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert imports.returncode == 0, imports.stderr[-3000:]
    out = subprocess.run(
        [
            str(venv / "bin" / "movinet-worker"),
            "classify",
            str(ASSETS / "videos" / CLIP),
            "--model",
            str(ASSETS / MODEL),
            "--labels",
            str(ASSETS / LABELS),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["top"][0]["label"] == "jumping jacks"
    # A SavedModel there says which extra it needs, rather than failing on an import.
    saved = tmp_path / "a0_saved_model"
    saved.mkdir()
    worker = str(venv / "bin" / "movinet-worker")
    refused = subprocess.run(
        [
            worker,
            "classify",
            str(ASSETS / "videos" / CLIP),
            "--model",
            str(saved),
            "--labels",
            str(ASSETS / LABELS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode != 0 and "movinet-worker[tfhub]" in refused.stderr, refused.stderr[-3000:]
