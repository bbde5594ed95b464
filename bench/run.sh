#!/usr/bin/env bash
# bench/run.sh: the balancer against its floor (bench/floor: the smallest
# Pingora proxy doing the same forwarding), nginx, HAProxy and the backend
# called directly, all on 127.0.0.1, one worker/thread each, the same backend behind
# every proxy.
#
#   1. installs nginx, haproxy, wrk, curl, python3-matplotlib (apt) and oha
#      (cargo install) when missing;
#   2. builds the release binaries (balancer, backend, floor);
#   3. starts the backend, the balancer, the floor, nginx and HAProxy as foreground
#      processes in a temporary directory (configs: bench/*.toml|conf|cfg);
#   4. throughput: ROUNDS interleaved rounds of wrk -t1 -c64 on /, /cache-me
#      and /info, with the peak RSS of the process under test;
#   5. RSS with 1,000 connections held (wrk -c1000 on /);
#   6. latency at a fixed rate (oha, 5,000 req/s, 32 connections);
#   7. writes bench/results/results.md, chart.png and raw/ (bench/report.py).
#
# Every process it starts is stopped on exit. Settings (environment):
#   BENCH_ROUNDS (3), BENCH_DURATION (5, seconds), BENCH_RATE_ROUNDS (2),
#   BENCH_PORT_BASE (19100: backend, +1 balancer, +2 nginx, +3 haproxy, +4 floor),
#   BENCH_NOTE (a line about the conditions, printed in results.md),
#   BENCH_SKIP_BUILD=1 (use the binaries in target/release as they are).
# Starting, stopping and reading the memory of the servers: bench/servers.sh.
set -euo pipefail

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5}        # seconds per measured wrk run
WARMUP=1                             # seconds of wrk before each measured run
CONNS=64
HELD_CONNS=1000
RATE=5000                            # requests/s of the fixed-rate run
RATE_CONNS=32
RATE_DURATION=8
RATE_ROUNDS=${BENCH_RATE_ROUNDS:-2}
PORT_BASE=${BENCH_PORT_BASE:-19100}
# shellcheck source=bench/servers.sh
source "$(dirname "${BASH_SOURCE[0]}")/servers.sh"
RESULTS=$BENCH_DIR/results
RAW=$RESULTS/raw

TARGETS=(balancer floor nginx haproxy direct)
PATHS=(/ /cache-me /info)

# ---------------------------------------------------------------- 1. tools

install_tools() {
    local -a missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    "$PY" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
    install_missing "${missing[@]}"
    export PATH=$PATH:${CARGO_HOME:-${HOME:-/root}/.cargo}/bin
    if ! command -v oha >/dev/null; then
        log "installing oha (cargo install oha --locked)"
        cargo install oha --locked --quiet
    fi
}

# ---------------------------------------------------------------- 3. servers (bench/servers.sh)

start_servers() {
    local target
    start_backend
    for target in balancer floor nginx haproxy; do start_proxy "$target"; done
    for target in balancer floor nginx haproxy; do wait_ready "$target"; done
}

# has_cache TARGET: whether TARGET answers /cache-me from a cache of its own.
has_cache() { [[ $1 == balancer || $1 == nginx ]]; }

# check_targets: every path answers 200 everywhere; the caches answer HIT on a repeat.
check_targets() {
    local target path code cache out=$RAW/checks.txt
    : >"$out"
    for target in "${TARGETS[@]}"; do
        for path in "${PATHS[@]}"; do
            [[ $path == /cache-me ]] && ! has_cache "$target" && continue
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:${PORT[$target]}$path")
            echo "$target $path -> $code" >>"$out"
            [[ $code == 200 ]] || die "$target $path answered $code"
        done
    done
    for target in balancer nginx; do
        cache=$(curl -s -o /dev/null -D - --max-time 5 "http://127.0.0.1:${PORT[$target]}/cache-me" |
            tr -d '\r' | awk -F': ' 'tolower($1) == "x-cache-status" { print $2 }')
        echo "$target /cache-me repeated -> X-Cache-Status: ${cache:-none}" >>"$out"
        [[ $cache == HIT ]] || die "$target does not answer /cache-me from its cache (X-Cache-Status: ${cache:-none})"
    done
    sed 's/^/  /' "$out" >&2
}

# ---------------------------------------------------------------- 4-6. load

# rss_sampler OUT PID...: every 100 ms for at most 2 min, the peak summed VmRSS into OUT.
rss_sampler() {
    local out=$1 peak=0 i
    shift
    for ((i = 0; i < 1200; i++)); do
        read_rss "$@"
        if ((RSS_KB > peak)); then
            peak=$RSS_KB
            echo "$peak" >"$out"
        fi
        sleep 0.1
    done
}

# measure OUT TARGET PATH CONNS: a warm-up, then wrk with the RSS sampler; appends to OUT.
measure() {
    local out=$1 target=$2 path=$3 conns=$4 warmup=${5:-$WARMUP}
    local url="http://127.0.0.1:${PORT[$target]}$path" peak=$WORK/peak_rss
    # shellcheck disable=SC2086 # WATCH holds a list of PIDs
    read_rss ${WATCH[$target]}
    {
        echo "# target: $target"
        echo "# path: $path"
        echo "# connections: $conns"
        echo "# rss_before_kb: $RSS_KB"
    } >>"$out"
    if ((warmup > 0)); then
        timeout 60 wrk -t1 -c"$conns" -d"${warmup}s" "$url" >/dev/null 2>&1 || true
    fi
    echo 0 >"$peak"
    # shellcheck disable=SC2086
    rss_sampler "$peak" ${WATCH[$target]} &
    # shellcheck disable=SC2086
    cpu_ticks ${WATCH[$target]}
    local user=$CPU_USER system=$CPU_SYSTEM
    AUX_PIDS=($!)
    timeout --kill-after=5 $((DURATION + 60)) \
        wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$url" >>"$out" 2>&1 ||
        echo "# wrk failed: exit $?" >>"$out"
    # shellcheck disable=SC2086
    cpu_ticks ${WATCH[$target]}
    kill "${AUX_PIDS[0]}" 2>/dev/null || true
    wait "${AUX_PIDS[0]}" 2>/dev/null || true
    AUX_PIDS=()
    {
        echo "# peak_rss_kb: $(cat "$peak")"
        # The CPU time the proxy's processes used over the measured run.
        echo "# cpu_user_seconds: $(awk -v t=$((CPU_USER - user)) -v hz="$CLK_TCK" 'BEGIN { print t / hz }')"
        echo "# cpu_system_seconds: $(awk -v t=$((CPU_SYSTEM - system)) -v hz="$CLK_TCK" 'BEGIN { print t / hz }')"
    } >>"$out"
}

# The order of the targets turns by one each round, so none always goes first.
rotated_targets() {
    local round=$1 n=${#TARGETS[@]} i
    for ((i = 0; i < n; i++)); do echo "${TARGETS[(i + round) % n]}"; done
}

throughput_rounds() {
    local round target path name
    for ((round = 1; round <= ROUNDS; round++)); do
        log "throughput round $round/$ROUNDS: wrk -t1 -c$CONNS -d${DURATION}s on ${PATHS[*]}"
        while read -r target; do
            for path in "${PATHS[@]}"; do
                # HAProxy and the floor have no cache: they are compared on / and /info only.
                [[ $path == /cache-me ]] && ! has_cache "$target" && continue
                if [[ $path == /cache-me ]]; then # fill the cache before the warm-up
                    curl -s -o /dev/null --max-time 5 "http://127.0.0.1:${PORT[$target]}$path" || true
                fi
                name=${path#/}
                measure "$RAW/wrk-r$round-$target-${name:-root}.txt" "$target" "$path" "$CONNS"
            done
        done < <(rotated_targets "$round")
    done
}

held_connection_rounds() {
    local round target
    for ((round = 1; round <= ROUNDS; round++)); do
        log "held connections round $round/$ROUNDS: wrk -t1 -c$HELD_CONNS -d${DURATION}s on /"
        while read -r target; do
            measure "$RAW/c$HELD_CONNS-r$round-$target.txt" "$target" / "$HELD_CONNS" 0
        done < <(rotated_targets "$round")
    done
}

fixed_rate_rounds() {
    local round target url out
    for ((round = 1; round <= RATE_ROUNDS; round++)); do
        log "fixed-rate round $round/$RATE_ROUNDS: oha $RATE req/s, $RATE_CONNS connections, ${RATE_DURATION}s on /"
        while read -r target; do
            url="http://127.0.0.1:${PORT[$target]}/"
            out=$RAW/rate-r$round-$target.json
            oha_at_rate "$url" "$RATE" "$RATE_CONNS" "$RATE_DURATION" "$out.full" "$WORK/oha.err" ||
                log "oha against $target failed: $(head -c 300 "$WORK/oha.err")"
            # Keep the summary and the percentiles, not the whole histogram.
            "$PY" "$BENCH_DIR/report.py" --trim-oha "$out.full" "$out" "$target"
            rm -f "$out.full"
        done < <(rotated_targets "$round")
    done
}

# ---------------------------------------------------------------- 7. report

describe_machine() {
    {
        machine_lines
        echo "wrk: $(wrk -v 2>&1 | head -n 1 | awk '{ print $2 }')"
        echo "oha: $(oha --version | awk '{ print $2 }')"
        echo "rounds: $ROUNDS throughput (${DURATION} s each, after ${WARMUP} s of warm-up), $ROUNDS with $HELD_CONNS connections, $RATE_ROUNDS at a fixed rate"
        echo "fixed rate: $RATE requests/s, $RATE_CONNS connections, ${RATE_DURATION} s"
        echo "note: ${BENCH_NOTE:-}"
    } >"$RAW/machine.txt"
}

report() {
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW/machine.txt"
    "$PY" "$BENCH_DIR/report.py" "$RESULTS"
    log "wrote $RESULTS/results.md and $RESULTS/chart.png"
}

main() {
    install_tools
    raise_fd_limit $((4 * HELD_CONNS)) "$HELD_CONNS connections"
    build
    rm -rf "$RAW"
    mkdir -p "$RAW"
    rm -f "$RESULTS/results.md" "$RESULTS/chart.png"
    open_work_dir
    describe_machine
    start_servers
    check_targets
    throughput_rounds
    held_connection_rounds
    fixed_rate_rounds
    stop_all
    report
}

main "$@"
