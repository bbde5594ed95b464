#!/usr/bin/env bash
# Validates the Kubernetes manifests: the schema, strictly (kubernetes-validate,
# from PyPI), and the balancer TOML inside the ConfigMap (balancer --check).
# Usage: deploy/k8s/check.sh [path/to/balancer-binary]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
balancer=${1:-$here/../../target/debug/balancer}

python3 -m kubernetes_validate --strict "$here"/*.yaml

toml=$(mktemp --suffix=.toml)
trap 'rm -f "$toml"' EXIT
python3 - "$here/balancer.yaml" "$toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
config = next(d for d in docs if d["kind"] == "ConfigMap")
open(sys.argv[2], "w").write(config["data"]["balancer.toml"])
PY
"$balancer" --config "$toml" --check
echo "deploy/k8s: manifests and the ConfigMap's balancer.toml are valid"
