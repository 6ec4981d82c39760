"""Write components/monitoring/prometheusrule.yaml from deploy/prometheus/rules.yml (one source).

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
# GENERATED from deploy/prometheus/rules.yml by deploy/k8s/sync_rules.py: edit rules.yml, then run
# `python deploy/k8s/sync_rules.py`. Runbook links point at deploy/README.md sections.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: movinet-worker
  labels:
    app.kubernetes.io/name: movinet-worker
    app.kubernetes.io/component: worker
spec:
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    spec = yaml.safe_load(rules_text)
    body = yaml.dump(spec, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + "".join("  " + line if line.strip() else line for line in body.splitlines(keepends=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text(encoding="utf-8"))
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else None
    if args.check:
        if current != wanted:
            print(f"{TARGET} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        TARGET.write_text(wanted, encoding="utf-8")
        print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
