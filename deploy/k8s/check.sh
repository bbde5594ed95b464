#!/usr/bin/env bash
# Validates the Kubernetes manifests: the schema, strictly (kubernetes-validate,
# from PyPI), and the balancer TOML inside the ConfigMap (balancer --check).
# Usage: deploy/k8s/check.sh [path/to/balancer-binary]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
balancer=${1:-$here/../../target/debug/balancer}

python3 -m kubernetes_validate --strict "$here"/*.yaml

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Each manifest's ConfigMap TOML passes --check; a [tls] one is checked with
# a development certificate standing in for its Secret.
for manifest in "$here"/balancer*.yaml; do
    toml=$work/$(basename "$manifest" .yaml).toml
    python3 - "$manifest" "$toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
config = next(d for d in docs if d["kind"] == "ConfigMap")
open(sys.argv[2], "w").write(config["data"]["balancer.toml"])
PY
    if grep -q '^\[tls\]' "$toml"; then
        "$balancer" cert --self-signed --host localhost --out "$work/tls" >/dev/null
        cp "$work/tls/cert.pem" "$work/tls/tls.crt"
        cp "$work/tls/key.pem" "$work/tls/tls.key"
        sed -i "s|/etc/balancer-tls/|$work/tls/|g" "$toml"
    fi
    "$balancer" --config "$toml" --check
done
echo "deploy/k8s: manifests and their ConfigMaps' balancer.toml are valid"
