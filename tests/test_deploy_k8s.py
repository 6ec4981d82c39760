"""deploy/k8s, checked offline: kustomize renders every target, each object validates against the
Kubernetes schemas (strict), the KEDA and Prometheus Operator objects field by field, the
configuration through the worker's own `config` command, the rules through promtool."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.support.deploy import (
    CRD_KINDS,
    DEPLOY,
    EXTERNAL,
    K8S,
    OLDEST_KUBERNETES,
    README,
    TARGETS,
    VENV_BIN,
    WITH_CRDS,
    WORKER,
    configmap_data,
    container,
    container_env,
    cores,
    find,
    image_config,
    matches,
    mebibytes,
    need,
    parse_cli,
)
from worker.config import Settings


@pytest.mark.parametrize("target", list(TARGETS))
def test_manifests_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, latest_version
    except ImportError:
        need(False, "kubernetes-validate is not installed")
    docs = rendered[target]
    unchecked = set()
    for doc in docs:
        for version in (OLDEST_KUBERNETES, latest_version()):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except SchemaNotFoundError:
                unchecked.add(doc["kind"])
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{target}: {doc['kind']}/{doc['metadata']['name']} ({version}) {where}: {exc.message}"
                )
    # Only the CRD objects escape the schemas; they are checked field by field below.
    assert unchecked <= CRD_KINDS, unchecked - CRD_KINDS
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceAccount"} <= kinds


def test_schema_validation_has_teeth(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Strict validation rejects a misspelt field and a wrong type, so a pass above means something."""
    try:
        import kubernetes_validate
    except ImportError:
        need(False, "kubernetes-validate is not installed")
    deployment = find(rendered["prod"], "Deployment", WORKER)
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesytem"] = True
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30s"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("target", list(TARGETS))
def test_deployment_is_secure_probed_sized_and_wired(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = rendered[target]
    deployment = find(docs, "Deployment", WORKER)
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(docs)
    config = configmap_data(docs, c["envFrom"][0]["configMapRef"]["name"])

    # securityContext, for every pod in the render (the dev Redis too).
    image_uid = int(image_config("runtime")["User"].split(":")[0])
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert spec.get("enableServiceLinks") is False
        for cc in spec["containers"]:
            sc = cc["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert cc["resources"]["requests"] and cc["resources"]["limits"]
    assert pod["securityContext"]["runAsUser"] == image_uid

    # The command is the image's entrypoint with `run`; the probes are GETs on the metrics port.
    runtime = image_config("runtime")
    assert "command" not in c, "keep the image's entrypoint (tini -- movinet-worker)"
    assert parse_cli(runtime["Entrypoint"] + c["args"]).command == "run"
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert all(p["port"] == "metrics" and "exec" not in c[k] for k, p in probes.items())
    assert probes["readinessProbe"]["path"] == "/readyz", "ready only once Redis answers too"
    assert probes["startupProbe"]["path"] == "/readyz", "liveness starts once the worker serves"
    assert probes["livenessProbe"]["path"] == "/healthz", "a Redis outage must not restart the workers"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for slow model loads"

    # Drain: the grace period outlasts the worker's own.
    grace = float(config.get("MOVINET_GRACE_SECONDS", Settings.model_fields["grace_seconds"].default))
    assert pod["terminationGracePeriodSeconds"] >= grace + 5

    # Resources, from the benchmark: LiteRT ~400 MB RSS, one CPU per interpreter.
    res = c["resources"]
    assert mebibytes(res["requests"]["memory"]) >= 400 * 1e6 / 2**20
    assert mebibytes(res["limits"]["memory"]) >= 1.5 * mebibytes(res["requests"]["memory"])
    assert cores(res["requests"]["cpu"]) <= cores(res["limits"]["cpu"])
    assert cores(res["limits"]["cpu"]) >= int(config["MOVINET_INTERPRETERS"])

    # Ports and selectors agree.
    port = int(config["MOVINET_METRICS_PORT"])
    assert c["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    service = find(docs, "Service", WORKER)
    assert matches(service["spec"]["selector"], labels)
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    pdb = find(docs, "PodDisruptionBudget")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1, "a single replica stays drainable, more keep one"
    assert matches(deployment["spec"]["selector"]["matchLabels"], labels)
    for spread in pod.get("topologySpreadConstraints", []):
        assert matches(spread["labelSelector"]["matchLabels"], labels)
    assert re.fullmatch("movinet.*", service["metadata"]["name"]), "the rules select job=~'movinet.*'"

    # Every reference resolves in the render, or is made by the operator (and documented).
    present = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    refs = {f"ConfigMap/{e['configMapRef']['name']}" for e in c.get("envFrom", [])}
    refs |= {
        f"Secret/{e['valueFrom']['secretKeyRef']['name']}"
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    for volume in pod["volumes"]:
        if "secret" in volume:
            refs.add(f"Secret/{volume['secret']['secretName']}")
        if "persistentVolumeClaim" in volume:
            refs.add(f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}")
    assert refs - present == EXTERNAL[target]
    readme = README.read_text()
    for ref in EXTERNAL[target]:
        assert ref.split("/")[1] in readme, f"deploy/README.md must say how to make {ref}"
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["volumes"]}
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "HOME and temp files need /tmp"

    # $(VAR) references are all defined before use (kubelet leaves undefined ones verbatim).
    defined = set(config)
    for e in c["env"]:
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", e.get("value", "")):
            assert ref in defined, f"{e['name']} uses $({ref}) before it is defined"
        defined.add(e["name"])

    # Images are pinned in the overlays.
    if target in ("dev", "prod"):
        image = c["image"]
        assert ":" in image and not image.endswith(":latest"), image


@pytest.mark.parametrize("target", list(TARGETS))
def test_configuration_is_valid_for_the_worker(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    """`movinet-worker config` (the validation `run` does) accepts each rendered environment."""
    env = container_env(rendered[target])
    unknown = {k for k in env if k.startswith("MOVINET_")} - {
        f"MOVINET_{name.upper()}" for name in Settings.model_fields
    }
    assert not unknown, f"not worker settings (typos?): {sorted(unknown)}"
    image_env = image_config("runtime", MODEL_FILE="m.tflite")["Env"]
    full = {**os.environ, **{k: v for k, v in image_env.items() if k != "PATH"}, **env}
    proc = subprocess.run(
        [str(VENV_BIN / WORKER), "config"], capture_output=True, text=True, env=full, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["redis_url"].startswith(env["REDIS_SCHEME"] + "://")
    assert printed["metrics_port"] == int(env["MOVINET_METRICS_PORT"])
    assert "external-secret" not in proc.stdout and "movinet-dev-only" not in proc.stdout, "password printed"


@pytest.mark.parametrize("target", WITH_CRDS)
def test_scaledobject_scales_the_deployment_on_total_input_lag(
    rendered: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = rendered[target]
    so = find(docs, "ScaledObject", WORKER)
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    deployment = find(docs, "Deployment", WORKER)
    target = spec["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert (
        target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    )
    assert "replicas" not in deployment["spec"], "KEDA owns replicas; a fixed count would fight it"
    assert spec["minReplicaCount"] >= 1, "at least one worker always runs"
    assert spec["maxReplicaCount"] > spec["minReplicaCount"]
    assert (
        spec["fallback"]["replicas"] >= spec["minReplicaCount"] and spec["fallback"]["failureThreshold"] >= 1
    )
    lag, cameras = spec["triggers"]
    for trigger in (lag, cameras):
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
        meta = trigger["metadata"]
        assert set(meta) >= {"serverAddress", "query", "threshold"}
        assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?/?", meta["serverAddress"]), meta["serverAddress"]
        assert isinstance(meta["threshold"], str) and float(meta["threshold"]) > 0, "KEDA wants a string"
        selectors = dict(re.findall(r'(\w+)="([^"]*)"', meta["query"]))
        assert selectors["namespace"] == deployment["metadata"]["namespace"], (
            "query must select this namespace"
        )
        assert selectors["job"] == find(docs, "Service", WORKER)["metadata"]["name"], (
            "job is the Service name"
        )
    assert re.fullmatch(r"sum\(movinet_worker_input_lag_seconds\{(.*)\}\)", lag["metadata"]["query"])
    # Cameras served plus cameras nobody has room for, whatever the number of workers.
    query = " ".join(cameras["metadata"]["query"].split())
    assert re.fullmatch(
        r"sum\(movinet_cameras_owned\{.*\}\) \+ max\(movinet_cameras_unassigned\{.*\}\)", query
    ), query
    metrics_code = Path(ROOT / "worker" / "pipeline" / "metrics.py").read_text()
    assert all(
        name in metrics_code for name in ('"movinet_worker_input_lag_seconds"', "movinet_cameras_unassigned")
    )
    # The HPA scales down gently: every scale-down hands cameras over.
    down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300


@pytest.mark.parametrize("target", WITH_CRDS)
def test_servicemonitor_and_prometheusrule(rendered: dict[str, list[dict[str, Any]]], target: str) -> None:
    docs = rendered[target]
    service = find(docs, "Service", WORKER)
    sm = find(docs, "ServiceMonitor", WORKER)
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert matches(sm["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert sm["metadata"]["namespace"] == service["metadata"]["namespace"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert sm["spec"]["endpoints"], "at least one endpoint"
    for endpoint in sm["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint.get("path", "/metrics") == "/metrics"
    rule = find(docs, "PrometheusRule", WORKER)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    assert rule["metadata"]["labels"].get("release") == sm["metadata"]["labels"].get("release")


def test_prometheusrule_is_generated_from_the_rules_file() -> None:
    proc = subprocess.run(
        [sys.executable, str(K8S / "sync_rules.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_prometheusrule_passes_promtool(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    need(promtool, "promtool is not installed (apt-get install prometheus)")
    spec = find(rendered["prod"], "PrometheusRule", WORKER)["spec"]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [str(promtool), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
