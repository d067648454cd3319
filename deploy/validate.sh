#!/usr/bin/env bash
# Checks every Kubernetes manifest under deploy/k8s:
#   1. strictly against the Kubernetes API's JSON schemas (unknown fields
#      are errors), with kubernetes-validate from PyPI;
#   2. against security and reliability policies (Pod Security "restricted"
#      settings, read-only root file systems, resource limits, probes,
#      NetworkPolicies, ...), with checkov from PyPI.
# With kubectl on PATH, each overlay is rendered by kustomize first and the
# result checked, so patches and the base are checked together; without
# it, the base's and overlays' resource files are checked one by one
# (kustomization.yaml files and patches are then not checked; overlays
# therefore keep their patches inline in kustomization.yaml, so that every
# other .yaml file is a whole resource). VALIDATE_WITHOUT_KUBECTL=1 takes
# that second path even with kubectl, to check it too.
# Then checks deploy/monitoring with promtool (Debian's prometheus package,
# which .ci/run installs): the scrape configuration and its alert rules,
# the alerts' unit tests, and every dashboard query (as recording rules).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.32.0
VALIDATOR=kubernetes-validate==1.37.0
CHECKOV=checkov==3.3.30
venv=target/validate-venv
# checkov has many dependencies of its own: a venv apart, so that neither
# tool's pins can break the other.
checkov_venv=target/checkov-venv

if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR"
fi
if [ ! -x "$checkov_venv/bin/checkov" ]; then
  python3 -m venv "$checkov_venv"
  "$checkov_venv/bin/pip" install --quiet --disable-pip-version-check "$CHECKOV"
fi

# Checks that do not apply here, each for a reason:
# - CKV_K8S_35 (secrets as files, not environment variables): redis-cli
#   takes a password only from REDISCLI_AUTH or its command line, and the
#   variable is the way that keeps passwords off every command line; the
#   server and offloader, which could read SERVER_*_FILE settings, take
#   theirs from the same Secret the same way.
# - CKV_K8S_43 (images by digest): every image is pinned to an exact
#   version tag; the project's own image is built locally (dev) or pushed
#   by the release (production), so it has no digest the manifests could
#   know in advance.
skip=CKV_K8S_35,CKV_K8S_43

files=()
if [ -z "${VALIDATE_WITHOUT_KUBECTL:-}" ] && command -v kubectl >/dev/null 2>&1; then
  for overlay in deploy/k8s/overlays/*/; do
    rendered="target/rendered-$(basename "$overlay").yaml"
    kubectl kustomize "$overlay" > "$rendered"
    echo "rendered $overlay: $(grep -c '^kind:' "$rendered") resources"
    files+=("$rendered")
  done
else
  echo "kubectl not found (or VALIDATE_WITHOUT_KUBECTL set): checking resource files one by one, without kustomize rendering"
  while IFS= read -r file; do files+=("$file"); done < <(
    find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
  # The namespace of every resource comes from the overlays'
  # kustomization.yaml files, which are not rendered here.
  skip="$skip,CKV_K8S_21"
fi
"$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" "${files[@]}"
echo "every resource in ${files[*]} is valid for Kubernetes $KUBERNETES_VERSION (strict)"

checkov_args=()
for file in "${files[@]}"; do checkov_args+=(--file "$file"); done
# --skip-download: no policy metadata from the vendor's servers (CI reaches
# only package registries); --compact --quiet: only the failures, in full.
"$checkov_venv/bin/checkov" --framework kubernetes --skip-download --compact --quiet \
  --skip-check "$skip" "${checkov_args[@]}"
echo "checkov: every policy passes for ${files[*]} (skipped: $skip)"

# Prometheus and Grafana. promtool is required: without it, nothing would
# say that a rule or a dashboard query no longer parses.
if ! command -v promtool >/dev/null 2>&1; then
  echo "promtool not found: install Debian's prometheus package (.ci/run does)" >&2
  exit 1
fi
promtool check config deploy/monitoring/prometheus.yml
promtool test rules deploy/monitoring/alerts.test.yml
dashboard_rules=target/dashboard-rules.json
mkdir -p target
python3 deploy/monitoring/dashboard_rules.py deploy/monitoring/dashboards/*.json > "$dashboard_rules"
promtool check rules "$dashboard_rules"
echo "promtool: the scrape configuration, alert rules and their tests, and every dashboard query pass"
