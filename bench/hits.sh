#!/usr/bin/env bash
# Cache hits: the balancer as shipped (RUST_LOG=info: the access log on, to
# a file), nginx's proxy_cache and the hit floor, one interleaved run. The
# hit floor is bench/floor with `--answer /cache-me`: Pingora answering
# /cache-me from memory in `request_filter`, with bytes fetched from the
# backend once, the least any program on Pingora's public API, a cache
# included, can do for a request it answers itself. `wrk -t1 -c64` on
# /cache-me, one worker or thread each, rounds alternating the targets; the
# report gives each one's median requests/s and CPU per request, with the
# ratios to nginx and to the hit floor.
#
#   bench/hits.sh [-o REPORT]
#
# Environment: HITS_ROUNDS (5), HITS_DURATION (5 s), BENCH_PORT_BASE (19700),
# BENCH_SKIP_BUILD (1: use target/release as it is).
set -euo pipefail

PORT_BASE=${BENCH_PORT_BASE:-19700}
RAW=$(cd "$(dirname "$0")" && pwd)/results/raw
# shellcheck source=bench/servers.sh
source "$(dirname "$0")/servers.sh"
report_file hits "$@"
ROUNDS=${HITS_ROUNDS:-5}
DURATION=${HITS_DURATION:-5}
PATHS=(/cache-me)
TARGETS=(balancer nginx floor)
FLOOR=floor

install_missing
build
open_work_dir
start_backend
FLOOR_ARGS=(--answer /cache-me)
BALANCER_RUST_LOG=info start_proxy balancer
start_proxy nginx
start_proxy floor
for t in "${TARGETS[@]}"; do
    wait_ready "$t"
    # Fill the caches; each answers a hit from here on.
    curl -s -o /dev/null "http://127.0.0.1:${PORT[$t]}/cache-me"
done
grep -q '"GET /cache-me HTTP/1.1" 200' "$WORK/balancer/out.log" ||
    die "the balancer writes no access-log line for /cache-me"

declare -A RESULTS CPU
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${TARGETS[@]}"; do
        wrk_measured "$DURATION" "http://127.0.0.1:${PORT[$t]}/cache-me" "${WATCH[$t]}"
        RESULTS["$t /cache-me"]+="$RPS "
        CPU["$t /cache-me"]+="$CPU_US "
        log "round $round $t: $RPS req/s, $CPU_US µs of CPU per request"
    done
done

{
    echo "# Cache hits: the balancer, nginx and the hit floor, one interleaved run"
    echo
    echo "$ROUNDS rounds of wrk -t1 -c64 -d${DURATION}s on /cache-me, one worker or thread each, 1 backend worker; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); nginx $(nginx -v 2>&1 | sed 's|.*/||')."
    echo
    echo "- balancer: as shipped, \`RUST_LOG=info\` (the access log on, to a file), bench/balancer.toml's cache rule for /cache-me;"
    echo "- nginx: bench/nginx.conf's \`proxy_cache\` for /cache-me;"
    echo "- floor: bench/floor \`--answer /cache-me\`, the backend's answer to /cache-me kept in memory and written from \`request_filter\`."
    echo
    rps_cpu_table target nginx "${TARGETS[@]}"
} >"$REPORT"
cat "$REPORT"
