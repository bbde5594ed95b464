#!/usr/bin/env bash
# A/B of two balancer builds, in one interleaved run: the earlier build, the
# new build, and the new build with one route configured, each in front of
# the same backend, with `wrk -t1 -c64` on / (proxied) and /cache-me (a cache
# hit). Rounds alternate the targets so that drift of the machine hits all
# of them alike; the report gives each target's median and range.
#
#   bench/ab.sh OLD_BALANCER NEW_BALANCER [REPORT]
#
# OLD_BALANCER and NEW_BALANCER are release binaries (build the earlier one
# from its commit in a worktree). The backend is the one beside NEW_BALANCER
# (AB_BACKEND to name another).
# Environment: AB_ROUNDS (5), AB_DURATION (5 s), AB_PORT_BASE (28200).
set -euo pipefail

OLD=${1:?usage: bench/ab.sh OLD_BALANCER NEW_BALANCER [REPORT]}
NEW=${2:?usage: bench/ab.sh OLD_BALANCER NEW_BALANCER [REPORT]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPORT=${3:-$ROOT/bench/results/ab.md}
ROUNDS=${AB_ROUNDS:-5}
DURATION=${AB_DURATION:-5}
BASE=${AB_PORT_BASE:-28200}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"${AB_BACKEND:-$(dirname "$NEW")/backend}" --listen "127.0.0.1:$BASE" --workers 1 >"$WORK/backend.log" 2>&1 &
PIDS+=($!)

# name, binary, port, extra configuration
TARGETS=(old new new+route)
declare -A BIN=([old]=$OLD [new]=$NEW [new+route]=$NEW)
declare -A PORT=([old]=$((BASE + 1)) [new]=$((BASE + 2)) [new+route]=$((BASE + 3)))
declare -A EXTRA=([old]="" [new]="" [new+route]=$'[[route]]\nname = "app"\npath = "/"\nupstream = "default"\n')

for t in "${TARGETS[@]}"; do
    cat >"$WORK/$t.toml" <<EOF
listen = "127.0.0.1:${PORT[$t]}"
threads = 1
[upstream]
servers = ["127.0.0.1:$BASE"]
[cache]
[[cache.rule]]
path = "/cache-me"
ttl = "300s"
${EXTRA[$t]}
EOF
    RUST_LOG=warn "${BIN[$t]}" --config "$WORK/$t.toml" >"$WORK/$t.log" 2>&1 &
    PIDS+=($!)
done
for t in "${TARGETS[@]}"; do
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:${PORT[$t]}/" && break
        sleep 0.1
    done
    curl -s -o /dev/null --max-time 2 "http://127.0.0.1:${PORT[$t]}/cache-me"
done

declare -A RESULTS
for ((round = 1; round <= ROUNDS; round++)); do
    for path in / /cache-me; do
        for t in "${TARGETS[@]}"; do
            url="http://127.0.0.1:${PORT[$t]}$path"
            wrk -t1 -c64 -d1s "$url" >/dev/null 2>&1 || true
            rps=$(wrk -t1 -c64 -d"${DURATION}s" "$url" 2>/dev/null | awk '/Requests\/sec/ { print int($2) }')
            RESULTS["$t $path"]+="${rps:-0} "
            echo "round $round $path $t: ${rps:-0} req/s"
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
range() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
{
    echo "# A/B: $(basename "$OLD") vs $(basename "$NEW"), one interleaved run"
    echo
    echo "$ROUNDS rounds of wrk -t1 -c64 -d${DURATION}s per path and target, 1 proxy thread, 1 backend worker; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| path | target | median req/s | range | vs old |"
    echo "|---|---|---|---|---|"
    for path in / /cache-me; do
        old=$(echo "${RESULTS["old $path"]}" | median)
        for t in "${TARGETS[@]}"; do
            m=$(echo "${RESULTS["$t $path"]}" | median)
            echo "| \`$path\` | $t | $m | $(echo "${RESULTS["$t $path"]}" | range) | $(awk -v a="$m" -v b="$old" 'BEGIN { printf "%.3f", a / b }') |"
        done
    done
} >"$REPORT"
cat "$REPORT"
