"""Write components/monitoring/prometheusrule.yaml from deploy/prometheus/rules.yml (one source), and
prometheusrule-ingest.yaml from ingest_rules.yml.

    python deploy/k8s/sync_rules.py          # rewrite it
    python deploy/k8s/sync_rules.py --check  # exit 1 if it is out of date (CI runs this check)

The PrometheusRule's spec is rules.yml's content, so the rules Prometheus Operator loads are the ones
`promtool test rules` checks in CI. Multi-line expressions are written as literal blocks: kustomize
re-serialises the file and mangles folded (`>-`) blocks with indented lines (it adds blank lines).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "rules.yml"
TARGET = HERE / "components" / "monitoring" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/{rules} by deploy/k8s/sync_rules.py: edit {rules}, then run
# `python deploy/k8s/sync_rules.py`. Runbook links point at deploy/README.md sections.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: movinet-{component}
  labels:
    app.kubernetes.io/name: movinet-{component}
    app.kubernetes.io/component: {component}
spec:
"""
# The ingest service's rules (deploy/prometheus/ingest_rules.yml) get a PrometheusRule of their own.
INGEST_RULES = HERE.parent / "prometheus" / "ingest_rules.yml"
INGEST_TARGET = HERE / "components" / "monitoring" / "prometheusrule-ingest.yaml"
GENERATED = ((RULES, TARGET, "worker"), (INGEST_RULES, INGEST_TARGET, "ingest"))


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str, rules: str = RULES.name, component: str = "worker") -> str:
    spec = yaml.safe_load(rules_text)
    body = yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    indented = "".join("  " + line if line.strip() else line for line in body.splitlines(keepends=True))
    return HEADER.format(rules=rules, component=component) + indented


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    stale = False
    for rules, target, component in GENERATED:
        wanted = render(rules.read_text(encoding="utf-8"), rules.name, component)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == wanted:
            continue
        if args.check:
            print(f"{target} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            stale = True
        else:
            target.write_text(wanted, encoding="utf-8")
            print(f"wrote {target}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
