#!/usr/bin/env bash
# Latency added at a fixed rate: the backend called directly, the balancer
# as shipped (RUST_LOG=info: the access log on, to a file) and the floor
# (bench/floor), each under `oha` at LATENCY_RATE requests/s on `/` for
# LATENCY_DURATION seconds, round after round, the targets in an order that
# turns by one each round. A target's *added* p50 or p99 in a round is its
# percentile minus the backend's in the same round, so that a change of the
# machine's speed between rounds does not count as latency; the report gives
# each target's medians over the rounds, and the balancer's added p50 minus
# the floor's round by round (the target of issue #26: at most 0.02 ms).
#
#   bench/latency.sh [-o REPORT]
#
# Environment: LATENCY_ROUNDS (8), LATENCY_RATE (5000), LATENCY_CONNECTIONS
# (32), LATENCY_DURATION (8 s), BENCH_PORT_BASE (19700), BENCH_SKIP_BUILD
# (1: use target/release as it is). run.sh measures the same at the end of
# its run, in fewer rounds and without the access log.
set -euo pipefail

PORT_BASE=${BENCH_PORT_BASE:-19700}
RAW=$(cd "$(dirname "$0")" && pwd)/results/raw-latency
# shellcheck source=bench/servers.sh
source "$(dirname "$0")/servers.sh"
report_file latency "$@"
ROUNDS=${LATENCY_ROUNDS:-8}
RATE=${LATENCY_RATE:-5000}
CONNECTIONS=${LATENCY_CONNECTIONS:-32}
DURATION=${LATENCY_DURATION:-8}
command -v oha >/dev/null || die "oha is missing (cargo install oha)"

build
open_work_dir
start_backend
BALANCER_RUST_LOG=info start_proxy balancer
wait_ready balancer
start_proxy floor
wait_ready floor
TARGETS=(direct balancer floor)

declare -A P50 P99
for ((round = 1; round <= ROUNDS; round++)); do
    n=${#TARGETS[@]}
    for ((i = 0; i < n; i++)); do
        t=${TARGETS[$(((i + round) % n))]}
        url="http://127.0.0.1:${PORT[$t]}/"
        oha_at_rate "$url" "$RATE" "$CONNECTIONS" "$DURATION" "$WORK/oha.json" "$WORK/oha.err" ||
            die "round $round, $t: oha failed: $(head -c 300 "$WORK/oha.err")"
        read -r p50 p99 < <("$PY" "$BENCH_DIR/report.py" --percentiles "$WORK/oha.json") ||
            die "round $round, $t: no latency measured, or errors (see $WORK/oha.json)"
        P50[$t]+="$p50 " P99[$t]+="$p99 "
        log "round $round $t: p50 $p50 ms, p99 $p99 ms"
    done
done

# As shipped means with its access log: make sure it was written.
grep -q '"GET / HTTP/1.1" 200' "$WORK/balancer/out.log" ||
    die "the balancer wrote no access-log line for / (see $WORK/balancer/out.log)"

{
    echo "# Latency added at a fixed rate: the balancer as shipped against the floor"
    echo
    echo "$ROUNDS rounds of \`oha\` at $RATE requests/s on \`/\`, $CONNECTIONS connections, ${DURATION} s each (after 1 s at the rate), one load thread; the backend (\`backend --workers 1\`) called directly, the balancer (\`threads = 1\`, \`bench/balancer.toml\`, \`RUST_LOG=info\`: the access log on, to a file) and the floor (\`bench/floor --threads 1\`) in front of it; the order of the three turns by one each round. $(nproc) cores; load at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    "$PY" - "${P50[direct]}" "${P99[direct]}" "${P50[balancer]}" "${P99[balancer]}" "${P50[floor]}" "${P99[floor]}" <<'EOF'
import statistics, sys
d50, d99, b50, b99, f50, f99 = ([float(x) for x in a.split()] for a in sys.argv[1:7])
med = statistics.median
def added(xs, base):
    return [x - b for x, b in zip(xs, base)]
rows = [("backend, directly", d50, d99, None, None),
        ("balancer", b50, b99, added(b50, d50), added(b99, d99)),
        ("floor", f50, f99, added(f50, d50), added(f99, d99))]
print("| target | p50 ms (median) | p99 ms (median) | added p50 ms (median; range) | added p99 ms (median) |")
print("|---|---|---|---|---|")
for name, p50, p99, a50, a99 in rows:
    a = f"{med(a50):.3f} ({min(a50):.3f} to {max(a50):.3f})" if a50 else "–"
    print(f"| {name} | {med(p50):.3f} | {med(p99):.3f} | {a} | {f'{med(a99):.3f}' if a99 else '–'} |")
diff = [b - f for b, f in zip(added(b50, d50), added(f50, d50))]
print()
print(f"The balancer's added p50 minus the floor's, round by round (ms): {', '.join(f'{x:+.3f}' for x in diff)}; "
      f"median {med(diff):+.3f} ms (target: at most +0.020).")
print()
print("| round | backend p50 | balancer p50 | floor p50 | backend p99 | balancer p99 | floor p99 |")
print("|---|---|---|---|---|---|---|")
for i in range(len(d50)):
    print(f"| {i + 1} | {d50[i]:.3f} | {b50[i]:.3f} | {f50[i]:.3f} | {d99[i]:.3f} | {b99[i]:.3f} | {f99[i]:.3f} |")
EOF
} >"$REPORT"
log "wrote $REPORT"
cat "$REPORT"
