#!/usr/bin/env bash
# bench/run.sh: the balancer against nginx, HAProxy and the backend called
# directly, all on 127.0.0.1, one worker/thread each, the same backend behind
# every proxy.
#
#   1. installs nginx, haproxy, wrk, curl, python3-matplotlib (apt) and oha
#      (cargo install) when missing;
#   2. builds the release binaries (balancer, backend);
#   3. starts the backend, the balancer, nginx and HAProxy as foreground
#      processes in a temporary directory (configs: bench/*.toml|conf|cfg);
#   4. throughput: ROUNDS interleaved rounds of wrk -t1 -c64 on /, /cache-me
#      and /info, with the peak RSS of the process under test;
#   5. RSS with 1,000 connections held (wrk -c1000 on /);
#   6. latency at a fixed rate (oha, 5,000 req/s, 32 connections);
#   7. writes bench/results/results.md, chart.png and raw/ (bench/report.py).
#
# Every process it starts is stopped on exit. Settings (environment):
#   BENCH_ROUNDS (3), BENCH_DURATION (5, seconds), BENCH_RATE_ROUNDS (2),
#   BENCH_PORT_BASE (28100: backend, +1 balancer, +2 nginx, +3 haproxy),
#   BENCH_NOTE (a line about the conditions, printed in results.md),
#   BENCH_SKIP_BUILD=1 (use the binaries in target/release as they are).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RESULTS=$BENCH_DIR/results
RAW=$RESULTS/raw

ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5}        # seconds per measured wrk run
WARMUP=1                             # seconds of wrk before each measured run
CONNS=64
HELD_CONNS=1000
RATE=5000                            # requests/s of the fixed-rate run
RATE_CONNS=32
RATE_DURATION=8
RATE_ROUNDS=${BENCH_RATE_ROUNDS:-2}
PORT_BASE=${BENCH_PORT_BASE:-28100}

TARGETS=(balancer nginx haproxy direct)
PATHS=(/ /cache-me /info)
declare -A PORT=(
    [direct]=$PORT_BASE
    [balancer]=$((PORT_BASE + 1))
    [nginx]=$((PORT_BASE + 2))
    [haproxy]=$((PORT_BASE + 3))
)
BACKEND_PORT=${PORT[direct]}
declare -A PID=()       # the process we started, per target (direct = the backend)
declare -A WATCH=()     # the PIDs whose RSS counts for a target (nginx: master + worker)
declare -A CHILDREN=()  # processes our processes started (nginx), stopped with them
SAMPLER=""
WORK=""
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- 1. tools

install_tools() {
    local -a missing=()
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    "$PY" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
    if ((${#missing[@]})); then
        log "installing ${missing[*]} (apt)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        PY=/usr/bin/python3
    fi
    export PATH=$PATH:${CARGO_HOME:-${HOME:-/root}/.cargo}/bin
    if ! command -v oha >/dev/null; then
        log "installing oha (cargo install oha --locked)"
        cargo install oha --locked --quiet
    fi
}

raise_fd_limit() {
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    (($(ulimit -n) >= 4 * HELD_CONNS)) ||
        die "open-file limit $(ulimit -n) is too low for $HELD_CONNS connections"
}

# ---------------------------------------------------------------- 2. build

build() {
    if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
        log "BENCH_SKIP_BUILD=1: using $TARGET_DIR/release as it is"
    else
        log "cargo build --release -p balancer -p backend"
        (cd "$ROOT" && cargo build --release --quiet -p balancer -p backend)
    fi
    [[ -x $TARGET_DIR/release/balancer && -x $TARGET_DIR/release/backend ]] ||
        die "no release binaries in $TARGET_DIR/release"
}

# ---------------------------------------------------------------- 3. servers

# render TEMPLATE DIR PORT: writes DIR/<name of TEMPLATE> with the placeholders filled in.
render() {
    local template=$1 dir=$2 port=$3
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" \
        -e "s|@USER@|$(id -un)|g" -e "s|@GROUP@|$(id -gn)|g" \
        "$template" >"$dir/$(basename "$template")"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_ready TARGET: until it answers on its port (at most 10 s).
wait_ready() {
    local target=$1 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID[$target]}" 2>/dev/null || break
        if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:${PORT[$target]}/"; then
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$WORK/$target/out.log" >&2 || true
    die "$target did not start on 127.0.0.1:${PORT[$target]}"
}

start_servers() {
    local target
    for target in "${TARGETS[@]}"; do
        ! port_in_use "${PORT[$target]}" ||
            die "127.0.0.1:${PORT[$target]} is in use (set BENCH_PORT_BASE)"
        mkdir -p "$WORK/$target"
    done

    log "starting backend on 127.0.0.1:$BACKEND_PORT"
    "$TARGET_DIR/release/backend" --listen "127.0.0.1:$BACKEND_PORT" --workers 1 \
        >"$WORK/direct/out.log" 2>&1 &
    PID[direct]=$!
    wait_ready direct

    log "starting balancer on 127.0.0.1:${PORT[balancer]}"
    render "$BENCH_DIR/balancer.toml" "$WORK/balancer" "${PORT[balancer]}"
    RUST_LOG=warn "$TARGET_DIR/release/balancer" --config "$WORK/balancer/balancer.toml" \
        >"$WORK/balancer/out.log" 2>&1 &
    PID[balancer]=$!

    log "starting nginx on 127.0.0.1:${PORT[nginx]}"
    render "$BENCH_DIR/nginx.conf" "$WORK/nginx" "${PORT[nginx]}"
    nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" \
        -g 'daemon off;' >"$WORK/nginx/out.log" 2>&1 &
    PID[nginx]=$!

    log "starting haproxy on 127.0.0.1:${PORT[haproxy]}"
    render "$BENCH_DIR/haproxy.cfg" "$WORK/haproxy" "${PORT[haproxy]}"
    haproxy -db -f "$WORK/haproxy/haproxy.cfg" >"$WORK/haproxy/out.log" 2>&1 &
    PID[haproxy]=$!

    for target in balancer nginx haproxy; do wait_ready "$target"; done
    for target in "${TARGETS[@]}"; do WATCH[$target]=${PID[$target]}; done
    # nginx's master started a worker (whose RSS counts too), a cache manager
    # and a cache loader (which do not).
    local child
    CHILDREN[nginx]=$(cat "/proc/${PID[nginx]}/task/${PID[nginx]}/children")
    for child in ${CHILDREN[nginx]}; do
        if grep -q 'worker process' "/proc/$child/cmdline" 2>/dev/null; then
            WATCH[nginx]+=" $child"
        fi
    done
    [[ ${WATCH[nginx]} == *' '* ]] || die "no nginx worker process found"
}

# check_targets: every path answers 200 everywhere; the caches answer HIT on a repeat.
check_targets() {
    local target path code cache out=$RAW/checks.txt
    : >"$out"
    for target in "${TARGETS[@]}"; do
        for path in "${PATHS[@]}"; do
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

# stop_all: TERM to everything we started (proxies first), KILL after 10 s.
stop_all() {
    local target pid i alive
    local -a pids=()
    for target in balancer nginx haproxy direct; do
        [[ -n ${PID[$target]:-} ]] || continue
        kill -TERM "${PID[$target]}" 2>/dev/null || true
        # shellcheck disable=SC2206 # a list of PIDs
        pids+=(${PID[$target]} ${CHILDREN[$target]:-})
    done
    for ((i = 0; i < 100; i++)); do
        alive=0
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then
                alive=1
                break
            fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PID=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $SAMPLER ]]; then kill "$SAMPLER" 2>/dev/null || true; fi
    stop_all
    if [[ -n $WORK && -d $WORK ]]; then
        # Keep what the servers said (errors only: access logs are off), briefly.
        local f
        for f in "$WORK"/*/out.log "$WORK"/nginx/error.log; do
            [[ -s $f ]] || continue
            mkdir -p "$RAW/logs"
            tail -n 30 "$f" >"$RAW/logs/$(basename "$(dirname "$f")")-$(basename "$f")"
        done
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- 4-6. load

# read_rss PID...: sets RSS_KB to the sum of their VmRSS (kB); no subshell.
read_rss() {
    local pid key value _
    RSS_KB=0
    for pid in "$@"; do
        # (2>/dev/null first: the process may be gone by now)
        while read -r key value _; do
            if [[ $key == VmRSS: ]]; then
                RSS_KB=$((RSS_KB + value))
                break
            fi
        done 2>/dev/null <"/proc/$pid/status" || true
    done
}

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
    SAMPLER=$!
    timeout --kill-after=5 $((DURATION + 60)) \
        wrk -t1 -c"$conns" -d"${DURATION}s" --latency "$url" >>"$out" 2>&1 ||
        echo "# wrk failed: exit $?" >>"$out"
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    SAMPLER=""
    echo "# peak_rss_kb: $(cat "$peak")" >>"$out"
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
                # HAProxy has no cache: it is compared on / and /info only.
                [[ $target == haproxy && $path == /cache-me ]] && continue
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
            # One load-generating thread (like wrk -t1); -w: requests still open at
            # the deadline are waited for, not counted as aborted.
            timeout 60 oha -z 1s -q "$RATE" -c "$RATE_CONNS" -w --worker-threads 1 --no-tui \
                --output-format quiet "$url" >/dev/null 2>&1 || true
            timeout --kill-after=5 $((RATE_DURATION + 60)) \
                oha -z "${RATE_DURATION}s" -q "$RATE" -c "$RATE_CONNS" -w --worker-threads 1 --no-tui \
                --output-format json "$url" >"$out.full" 2>"$WORK/oha.err" ||
                log "oha against $target failed: $(head -c 300 "$WORK/oha.err")"
            # Keep the summary and the percentiles, not the whole histogram.
            "$PY" "$BENCH_DIR/report.py" --trim-oha "$out.full" "$out" "$target"
            rm -f "$out.full"
        done < <(rotated_targets "$round")
    done
}

# ---------------------------------------------------------------- 7. report

describe_machine() {
    local os cpu mem
    os=$(awk -F= '$1 == "PRETTY_NAME" { gsub(/"/, "", $2); print $2 }' /etc/os-release)
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "nproc: $(nproc)"
        echo "cpu: ${cpu:-unknown}"
        echo "memory: $mem"
        echo "kernel: $(uname -srm)"
        echo "os: $os"
        echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
        echo "haproxy: $(haproxy -v | head -n 1 | awk '{ print $3 }')"
        echo "wrk: $(wrk -v 2>&1 | head -n 1 | awk '{ print $2 }')"
        echo "oha: $(oha --version | awk '{ print $2 }')"
        echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
        echo "commit: $(git -C "$ROOT" --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo unknown)$(
            [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain -- balancer backend 2>/dev/null) ]] && echo ' (with uncommitted changes)'
        )"
        echo "open files limit: $(ulimit -n)"
        echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
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
    raise_fd_limit
    build
    rm -rf "$RAW"
    mkdir -p "$RAW"
    rm -f "$RESULTS/results.md" "$RESULTS/chart.png"
    WORK=$(mktemp -d /tmp/bench.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT TERM
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
