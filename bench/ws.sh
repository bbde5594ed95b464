#!/usr/bin/env bash
# WebSocket echo through the balancer and through nginx, one interleaved
# run: the backend's /ws behind each proxy (one worker or thread each), and
# `ws_bench` (balancer/examples/ws_bench.rs) holding WS_CONNECTIONS
# WebSockets, each sending a 32-byte message and waiting for its echo, over
# and over. Rounds alternate the proxies so that drift of the machine hits
# both alike; the report gives each one's median round trips per second and
# p99 latency, with the range over the rounds, and the CPU time its
# processes used per round trip.
#
#   bench/ws.sh [-o REPORT]
#
# Environment: WS_ROUNDS (5), WS_DURATION (5 s), WS_CONNECTIONS (50),
# BENCH_PORT_BASE (19500), BENCH_SKIP_BUILD (1: use target/release as it is),
# WS_BASELINE (an earlier release build of the balancer, built from its
# commit in a worktree: it runs as a third target, `baseline`, for an A/B of
# the two builds in the same interleaved run).
set -euo pipefail

PORT_BASE=${BENCH_PORT_BASE:-19500}
RAW=$(cd "$(dirname "$0")" && pwd)/results/raw
# shellcheck source=bench/servers.sh
source "$(dirname "$0")/servers.sh"
report_file ws "$@"
ROUNDS=${WS_ROUNDS:-5}
DURATION=${WS_DURATION:-5}
CONNECTIONS=${WS_CONNECTIONS:-50}

build
if [[ ${BENCH_SKIP_BUILD:-0} != 1 || ! -x $TARGET_DIR/release/examples/ws_bench ]]; then
    (cd "$ROOT" && cargo build --release --quiet -p balancer --example ws_bench)
fi
CLIENT=$TARGET_DIR/release/examples/ws_bench

# nginx proxies /ws as its documentation says WebSockets are proxied.
nginx_ws() {
    sed -i 's|^        location / {|        location /ws {\n            proxy_pass http://backend;\n            proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection "upgrade";\n            proxy_read_timeout 3600s;\n        }\n\n        location / {|' "$1"
}

open_work_dir
start_backend
start_proxy balancer
wait_ready balancer
start_proxy nginx nginx_ws
wait_ready nginx
TARGETS=(balancer nginx)
if [[ -n ${WS_BASELINE:-} ]]; then
    [[ -x $WS_BASELINE ]] || die "WS_BASELINE=$WS_BASELINE is not an executable"
    BASELINE_BIN=$WS_BASELINE
    start_proxy baseline
    wait_ready baseline
    TARGETS=(balancer baseline nginx)
fi
for t in "${TARGETS[@]}"; do
    out=$("$CLIENT" "ws://127.0.0.1:${PORT[$t]}/ws" 2 1)
    [[ $out == *"failed=0"* ]] || die "$t: no WebSocket echo: $out"
done

declare -A RATE P99 P50 CPU USER SYSTEM
# CPU ticks $1 in microseconds per round trip, for the round's $n.
per_trip() { awk -v t="$1" -v hz="$CLK_TCK" -v n="$n" 'BEGIN { printf "%.2f", (n > 0 ? t / hz / n * 1e6 : 0) }'; }
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        # shellcheck disable=SC2086 # a list of PIDs
        cpu_ticks ${WATCH[$t]}
        user=$CPU_USER system=$CPU_SYSTEM
        out=$("$CLIENT" "ws://127.0.0.1:${PORT[$t]}/ws" "$CONNECTIONS" "$DURATION")
        # shellcheck disable=SC2086
        cpu_ticks ${WATCH[$t]}
        user=$((CPU_USER - user)) system=$((CPU_SYSTEM - system))
        [[ $out == *"failed=0"* ]] || die "round $round, $t: WebSockets failed: $out"
        n=$(sed -E 's/.*round_trips=([0-9]+).*/\1/' <<<"$out")
        RATE[$t]+="$(sed -E 's/.*per_second=([0-9]+).*/\1/' <<<"$out") "
        P50[$t]+="$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$out") "
        P99[$t]+="$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$out") "
        CPU[$t]+="$(per_trip $((user + system))) "
        USER[$t]+="$(per_trip "$user") "
        SYSTEM[$t]+="$(per_trip "$system") "
        log "round $round $t: $out"
    done
done

{
    echo "# WebSocket echo: balancer against nginx, one interleaved run"
    echo
    if [[ -n ${WS_BASELINE:-} ]]; then
        echo "\`baseline\` is an earlier build of the balancer, $WS_BASELINE, with the same configuration."
        echo
    fi
    echo "$ROUNDS rounds of ${DURATION} s, $CONNECTIONS WebSockets each sending a 32-byte message and waiting for its echo (\`ws_bench\`), one backend worker, one proxy worker or thread; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); nginx $(nginx -v 2>&1 | sed 's|.*/||')."
    echo
    echo "| proxy | median round trips/s | range | p50 µs | p99 µs (median) | p99 range | proxy CPU µs per round trip | user + system µs |"
    echo "|---|---|---|---|---|---|---|---|"
    for t in "${TARGETS[@]}"; do
        echo "| $t | $(echo "${RATE[$t]}" | median) | $(echo "${RATE[$t]}" | range) | $(echo "${P50[$t]}" | median) | $(echo "${P99[$t]}" | median) | $(echo "${P99[$t]}" | range) | $(echo "${CPU[$t]}" | median) | $(echo "${USER[$t]}" | median) + $(echo "${SYSTEM[$t]}" | median) |"
    done
} >"$REPORT"
cat "$REPORT"
