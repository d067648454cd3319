"""Prints the queries of Grafana dashboards as Prometheus recording rules
(JSON, which promtool reads as YAML), so that `promtool check rules`
parses every query. Grafana's variables become what they stand for at
their widest: `$__rate_interval` a 5 minute range, `$tenant` every tenant.

Usage: python3 dashboard_rules.py dashboards/*.json > rules.json"""

import json
import sys

SUBSTITUTIONS = {"$__rate_interval": "5m", "$tenant": ".*"}


def queries(path):
    with open(path) as f:
        dashboard = json.load(f)
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in SUBSTITUTIONS.items():
                expr = expr.replace(variable, value)
            yield f"{dashboard['uid']} {panel['title']} {target['refId']}", expr


def main(paths):
    groups = []
    for path in paths:
        rules = [
            {"record": "dashboard:query", "expr": expr, "labels": {"panel": name}}
            for name, expr in queries(path)
        ]
        groups.append({"name": path, "rules": rules})
    json.dump({"groups": groups}, sys.stdout, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
