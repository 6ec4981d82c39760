"""Shared by the deploy tests (tests/test_deploy_*.py): where deploy/ is, the tools that check it,
the Dockerfile read as BuildKit reads it, the worker CLI that parses its commands, and the
rendered Kubernetes objects.

No Docker engine or cluster runs here, so each artefact is checked by what parses it for real. Tools
that CI installs (kustomize via kubectl, promtool, redis-server, the dev extras) fail a test when
missing under CI=true, and skip it elsewhere (`need`).
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from worker.cli import build_parser

DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
README = DEPLOY / "README.md"
BAKE = DEPLOY / "docker" / "bake.py"
VENV_BIN = Path(sys.executable).parent

# What each kustomization is; "components" is the base with every component (their own defaults,
# in namespace movinet), rendered from a temporary kustomization (components cannot be built alone).
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "components": None,
}
COMPONENTS = ("monitoring", "autoscaling", "model-volume", "ingest")
# Targets with the KEDA and Prometheus Operator objects.
WITH_CRDS = ("prod", "components")
# Objects whose schemas kubernetes-validate does not ship: checked field by field below.
CRD_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
# Made by the operator outside the manifests (deploy/README.md says how), by target.
EXTERNAL = {
    "base": {"Secret/movinet-redis"},
    "dev": set(),
    "prod": {"Secret/movinet-redis", "Secret/movinet-redis-tls"},
    "components": {"Secret/movinet-redis", "PersistentVolumeClaim/movinet-models"},
}
# The oldest Kubernetes the manifests claim to support, and the newest schemas available.
OLDEST_KUBERNETES = "1.29"
WORKER = "movinet-worker"
ENTRYPOINT_INIT = ["tini", "--"]


def need(ok: Any, why: str) -> None:
    """A missing tool fails under CI (which installs it) and skips elsewhere."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must install it: see .ci/run)")
        pytest.skip(why)


def tool(name: str) -> str | None:
    beside = VENV_BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


# ---- Dockerfile ------------------------------------------------------------------------------


class Stage:
    def __init__(self, name: str, base: str, commands: list[Any]) -> None:
        self.name, self.base, self.commands = name, base, commands

    def all(self, cmd: str) -> list[Any]:
        return [c for c in self.commands if c.cmd == cmd.upper()]

    def last(self, cmd: str) -> Any:
        found = self.all(cmd)
        assert found, f"stage {self.name} has no {cmd}"
        return found[-1]


@functools.cache
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name in order), parsed by BuildKit's parser."""
    try:
        import dockerfile as parser
    except ImportError:
        need(False, "the `dockerfile` package (BuildKit's Dockerfile parser) is not installed")
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for command in parser.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            value = [v for v in command.value]
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages[name] = Stage(name, value[0], [command])
        elif current is None:
            assert command.cmd == "ARG", f"only ARG may precede the first FROM: {command.original}"
            global_args.update(_arg(command))
        else:
            current.commands.append(command)
    return global_args, stages


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _arg(command: Any) -> dict[str, str]:
    out = {}
    for item in command.value:
        name, _, default = item.partition("=")
        out[name] = _unquote(default)
    return out


def expand(text: str, env: dict[str, str]) -> str:
    """Dockerfile variable substitution: $X, ${X}, ${X:-word}, ${X:+word}, nested words."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif c == "$" and text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                assert j < len(text), f"unbalanced braces in {text!r}"
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth -= text[j] == "}"
                j += 1
            inner = text[i + 2 : j - 1]
            m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?::([-+])(.*))?", inner, re.S)
            assert m, f"unsupported substitution ${{{inner}}}"
            name, op, word = m.groups()
            value = env.get(name, "")
            if op == "-":
                value = value or expand(word, env)
            elif op == "+":
                value = expand(word, env) if value else ""
            out.append(value)
            i = j
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)", text[i:])):
            out.append(env.get(m.group(1), ""))
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def image_config(stage_name: str = "runtime", **build_args: str) -> dict[str, Any]:
    """The image config a build of `stage_name` gets: Env, User, WorkingDir, Entrypoint, Cmd, ...

    Follows FROM chains through earlier stages; a base outside the Dockerfile contributes only PATH.
    """
    global_args, stages = dockerfile()
    stage = stages[stage_name]
    base = expand(stage.base, {**global_args, **build_args})
    if base in stages:
        config = image_config(base, **build_args)
    else:
        config = {"Env": {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"}}
        config["Base"] = base
    config = {**config, "Env": dict(config["Env"]), "Stage": stage_name}
    args: dict[str, str] = {}
    for command in stage.commands[1:]:
        scope = {**args, **config["Env"]}
        if command.cmd == "ARG":
            for name, default in _arg(command).items():
                args[name] = build_args.get(name, expand(default or global_args.get(name, ""), scope))
        elif command.cmd == "ENV":
            pairs = list(command.value)
            for name, value in zip(pairs[::2], pairs[1::2], strict=True):
                config["Env"][name] = expand(_unquote(value), scope)  # one ENV sees the env before it
        elif command.cmd in ("USER", "WORKDIR", "STOPSIGNAL"):
            config[command.cmd.title()] = expand(command.value[0], scope)
        elif command.cmd in ("ENTRYPOINT", "CMD"):
            assert command.json, f"{command.cmd} must be in exec (JSON) form: {command.original}"
            config[command.cmd.title()] = list(command.value)
        elif command.cmd == "HEALTHCHECK":
            assert command.value[0] == "CMD" and command.json, "HEALTHCHECK must be CMD in exec form"
            config["Healthcheck"] = {"test": list(command.value[1:]), "flags": list(command.flags)}
        elif command.cmd == "EXPOSE":
            config.setdefault("Expose", []).extend(command.value)
    return config


def worker_argv(argv: list[str]) -> list[str]:
    """The worker's command line inside an entrypoint, without the init process in front."""
    if argv[: len(ENTRYPOINT_INIT)] == ENTRYPOINT_INIT:
        argv = argv[len(ENTRYPOINT_INIT) :]
    assert argv and argv[0] == WORKER, f"not a {WORKER} command: {argv}"
    return argv


def parse_cli(argv: list[str]) -> Any:
    """Parse with the worker's own CLI: a renamed command or flag fails here."""
    argv = worker_argv(argv)
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"movinet-worker does not accept {argv[1:]}") from exc


# ---- Kubernetes ------------------------------------------------------------------------------


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    need(False, "neither kustomize nor kubectl (which embeds kustomize) is installed")
    raise AssertionError  # unreachable


def render_targets(scratch: Path) -> dict[str, list[dict[str, Any]]]:
    """Each of TARGETS rendered by kustomize (components from a kustomization made in `scratch`)."""
    command = kustomize_command()
    on_disk = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert on_disk == set(COMPONENTS), "every component is rendered and validated here"
    (scratch / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "movinet",
                "resources": [os.path.relpath(K8S / "base", scratch)],
                "components": [os.path.relpath(K8S / "components" / c, scratch) for c in COMPONENTS],
            }
        )
    )
    out = {}
    for name, path in TARGETS.items():
        proc = subprocess.run(
            [*command, str(path or scratch)], capture_output=True, text=True, timeout=60, check=False
        )
        assert proc.returncode == 0, f"kustomize {name}: {proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = find(docs, "Deployment", WORKER)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "worker")


def configmap_data(docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    data: dict[str, str] = find(docs, "ConfigMap", name)["data"]
    return data


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def mebibytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 1e3, "M": 1e6, "G": 1e9}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", quantity)
    assert m, quantity
    return float(m.group(1)) * units.get(m.group(2) or "", 1) / 2**20


def cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(
    docs: list[dict[str, Any]], replace: dict[str, str] | None = None, pod_name: str = "movinet-worker-0"
) -> dict[str, str]:
    """The worker container's environment as kubelet builds it: envFrom, then env with $(VAR)."""
    c = container(docs)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(configmap_data(docs, source["configMapRef"]["name"]))
    env.update(replace or {})
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"]
            )
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            secret = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
            value = base64.b64decode(secret[0]["data"][ref["key"]]).decode() if secret else "external-secret"
            env[e["name"]] = value
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
        else:
            raise AssertionError(f"unhandled env source {e}")
    return env


def run_bake(models_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, str(BAKE), "--out", str(out), "--models-dir", str(models_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here: last match wins, a folder covers its files."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if any(fnmatch(c, pat) for c in candidates) or (
            pat.startswith("**/") and any(fnmatch(p, pat[3:]) for p in parts)
        ):
            excluded = not negate
    return excluded
