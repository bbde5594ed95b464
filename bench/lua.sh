#!/usr/bin/env bash
# The cost of a Lua script on the request path: the same balancer build and
# the same route (`/` to the default upstream), once plain and once with a
# trivial `on_request` (one header read, one header set), A/B in one
# interleaved run by bench/ab.sh. The report gives requests/s and the CPU
# time per request of each; the difference in CPU per request is what the
# script costs (target: at most 3 µs).
#
#   bench/lua.sh [-o REPORT]          # default report: bench/results/lua.md
#
# Builds the release binaries first (LUA_SKIP_BUILD=1 to use target/release
# as it is). Listens on 127.0.0.1:19700-19702. Environment: AB_ROUNDS (8),
# AB_DURATION (5 s), as bench/ab.sh reads them.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPORT=$ROOT/bench/results/lua.md
if [[ ${1:-} == -o ]]; then
    REPORT=${2:?-o needs a file}
    shift 2
fi
if [[ ${LUA_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p balancer -p backend)
fi
BIN=$ROOT/target/release/balancer
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

cat >"$WORK/trivial.lua" <<'LUA'
function on_request(req)
  req.headers["x-bench"] = req.headers["user-agent"] or "none"
end
LUA
cat >"$WORK/lua.toml" <<TOML
[extensions.trivial]
kind = "lua"
script = "$WORK/trivial.lua"

[[route]]
name = "app"
path = "/"
upstream = "default"
extensions = ["trivial"]
TOML

export AB_PORT_BASE=19700 AB_PATHS=/ AB_ROUNDS=${AB_ROUNDS:-8}
"$ROOT/bench/ab.sh" -o "$REPORT" "route=$BIN,route" "route+lua=$BIN,config=$WORK/lua.toml"
{
    echo
    echo "\`route\`: \`[[route]] path = \"/\"\` to the default upstream. \`route+lua\`: the same route with"
    echo "\`extensions = [\"trivial\"]\`, a \`kind = \"lua\"\` instance running:"
    echo
    echo '```lua'
    cat "$WORK/trivial.lua"
    echo '```'
} >>"$REPORT"
