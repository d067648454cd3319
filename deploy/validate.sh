#!/usr/bin/env bash
# Validates every Kubernetes manifest under deploy/k8s against the
# Kubernetes API's JSON schemas with kubernetes-validate (from PyPI),
# strictly (unknown fields are errors). With kubectl on PATH, each overlay
# is rendered by kustomize first and the result validated, so patches and
# the base are checked together; without it, the base's and overlays'
# resource files are validated one by one (kustomization.yaml files and
# patches are then not checked).
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.32.0
VALIDATOR=kubernetes-validate==1.37.0
venv=target/validate-venv

if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$VALIDATOR"
fi

files=()
if command -v kubectl >/dev/null 2>&1; then
  for overlay in deploy/k8s/overlays/*/; do
    rendered="target/rendered-$(basename "$overlay").yaml"
    kubectl kustomize "$overlay" > "$rendered"
    echo "rendered $overlay: $(grep -c '^kind:' "$rendered") resources"
    files+=("$rendered")
  done
else
  echo "kubectl not found: validating resource files one by one, without kustomize rendering"
  while IFS= read -r file; do files+=("$file"); done < <(
    find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
fi
"$venv/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" "${files[@]}"
echo "every resource in ${files[*]} is valid for Kubernetes $KUBERNETES_VERSION (strict)"
