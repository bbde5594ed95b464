# bench/servers.sh: the targets of the benchmarks, sourced by run.sh and
# idle.sh. It starts the backend and, in front of it, the balancer, the floor
# (bench/floor: the smallest Pingora proxy forwarding as the balancer does),
# nginx and HAProxy, each a foreground process in a temporary directory with its
# configuration from bench/ (balancer.toml, nginx.conf, haproxy.cfg, the
# @NAME@ placeholders filled in), reads their memory, and stops everything it
# started when the script exits. What is measured, and how, is the caller's.
#
# Before sourcing, the caller sets PORT_BASE (the backend; +1 balancer,
# +2 nginx, +3 HAProxy, +4 the floor, +6 a baseline: an earlier balancer
# build, BASELINE_BIN, run as the balancer is; all on 127.0.0.1) and RAW (where the servers' last
# log lines are kept on exit), then calls open_work_dir before starting any.
# shellcheck shell=bash

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PY=/usr/bin/python3
[[ -x $PY ]] || PY=python3

declare -A PORT=(
    [direct]=$PORT_BASE
    [balancer]=$((PORT_BASE + 1))
    [nginx]=$((PORT_BASE + 2))
    [haproxy]=$((PORT_BASE + 3))
    [floor]=$((PORT_BASE + 4))
    [baseline]=$((PORT_BASE + 6))
)
BACKEND_PORT=${PORT[direct]}
declare -A PID=()       # the process we started, per target (direct = the backend)
declare -A WATCH=()     # the PIDs whose RSS counts for a target (nginx: master + worker)
declare -A CHILDREN=()  # processes our processes started (nginx), stopped with them
FLOOR_ARGS=()           # more arguments for the floor (tls.sh: its HTTPS listener)
AUX_PIDS=()             # other processes the caller started (samplers, clients), stopped first
WORK=""

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# install_missing [PACKAGE...]: installs with apt (one apt-get update first)
# those PACKAGEs, and nginx, haproxy and curl when they are missing.
install_missing() {
    local -a missing=("$@")
    command -v nginx >/dev/null || missing+=(nginx)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v curl >/dev/null || missing+=(curl)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    PY=/usr/bin/python3
}

# raise_fd_limit NEEDED WHAT: to 65,536 (or the hard limit where lower); stops
# when the limit is below NEEDED, saying WHAT needs it.
raise_fd_limit() {
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    (($(ulimit -n) >= $1)) || die "open-file limit $(ulimit -n) is too low for $2"
}

# report_file NAME [-o FILE]: sets REPORT, where the report is written:
# FILE, or results/NAME.md.
report_file() {
    REPORT=$BENCH_DIR/results/$1.md
    if [[ ${2:-} == -o ]]; then
        REPORT=${3:?-o needs a file}
    fi
}

build() {
    if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
        log "BENCH_SKIP_BUILD=1: using $TARGET_DIR/release as it is"
    else
        log "cargo build --release -p balancer -p backend -p floor"
        (cd "$ROOT" && cargo build --release --quiet -p balancer -p backend -p floor)
    fi
    [[ -x $TARGET_DIR/release/balancer && -x $TARGET_DIR/release/backend && -x $TARGET_DIR/release/floor ]] ||
        die "no release binaries in $TARGET_DIR/release"
}

# open_work_dir: the temporary directory of the servers, and the clean-up on exit.
open_work_dir() {
    WORK=$(mktemp -d /tmp/bench.XXXXXX)
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# render TEMPLATE DIR PORT: writes DIR/<name of TEMPLATE> with the placeholders filled in.
render() {
    local template=$1 dir=$2 port=$3
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@BACKEND_PORT@|$BACKEND_PORT|g" \
        -e "s|@USER@|$(id -un)|g" -e "s|@GROUP@|$(id -gn)|g" \
        "$template" >"$dir/$(basename "$template")"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# claim TARGET: its port is free and its directory exists.
claim() {
    ! port_in_use "${PORT[$1]}" || die "127.0.0.1:${PORT[$1]} is in use (set BENCH_PORT_BASE)"
    mkdir -p "$WORK/$1"
}

# wait_ready TARGET: until it answers on its port (at most 10 s); then, for
# nginx, the worker its master started is watched too.
wait_ready() {
    local target=$1 i
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID[$target]}" 2>/dev/null || break
        if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:${PORT[$target]}/"; then
            [[ $target != nginx ]] || watch_nginx_worker
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$WORK/$target/out.log" >&2 || true
    die "$target did not start on 127.0.0.1:${PORT[$target]}"
}

# nginx's master started a worker (whose RSS counts too), a cache manager and
# a cache loader (which do not).
watch_nginx_worker() {
    local child
    CHILDREN[nginx]=$(cat "/proc/${PID[nginx]}/task/${PID[nginx]}/children")
    for child in ${CHILDREN[nginx]}; do
        if grep -q 'worker process' "/proc/$child/cmdline" 2>/dev/null; then
            WATCH[nginx]+=" $child"
        fi
    done
    [[ ${WATCH[nginx]} == *' '* ]] || die "no nginx worker process found"
}

start_backend() {
    claim direct
    log "starting backend on 127.0.0.1:$BACKEND_PORT"
    "$TARGET_DIR/release/backend" --listen "127.0.0.1:$BACKEND_PORT" --workers 1 \
        >"$WORK/direct/out.log" 2>&1 &
    PID[direct]=$!
    WATCH[direct]=$!
    wait_ready direct
}

# start_proxy TARGET [EDIT]: starts the balancer (RUST_LOG=warn, no access
# log, unless BALANCER_RUST_LOG says otherwise), the floor, nginx or haproxy
# with its configuration rendered into WORK/TARGET (the floor takes its few
# settings on its command line, and FLOOR_ARGS, an array, after them); EDIT,
# a function, is given the rendered file to change before the start. It does
# not wait (wait_ready).
start_proxy() {
    local target=$1 edit=${2:-} dir=$WORK/$1 config
    claim "$target"
    if [[ $target == floor ]]; then
        log "starting floor on 127.0.0.1:${PORT[floor]}"
        "$TARGET_DIR/release/floor" --listen "127.0.0.1:${PORT[floor]}" \
            --upstream "127.0.0.1:$BACKEND_PORT" --threads 1 "${FLOOR_ARGS[@]}" >"$dir/out.log" 2>&1 &
        PID[floor]=$!
        WATCH[floor]=$!
        return 0
    fi
    case $target in
        balancer | baseline) config=$dir/balancer.toml ;;
        nginx) config=$dir/nginx.conf ;;
        haproxy) config=$dir/haproxy.cfg ;;
        *) die "no such proxy: $target" ;;
    esac
    render "$BENCH_DIR/$(basename "$config")" "$dir" "${PORT[$target]}"
    [[ -z $edit ]] || "$edit" "$config"
    log "starting $target on 127.0.0.1:${PORT[$target]}"
    case $target in
        balancer)
            RUST_LOG=${BALANCER_RUST_LOG:-warn} "$TARGET_DIR/release/balancer" --config "$config" >"$dir/out.log" 2>&1 &
            ;;
        baseline)
            RUST_LOG=warn "${BASELINE_BIN:?no BASELINE_BIN}" --config "$config" >"$dir/out.log" 2>&1 &
            ;;
        nginx)
            nginx -p "$dir" -c "$config" -e "$dir/error.log" -g 'daemon off;' >"$dir/out.log" 2>&1 &
            ;;
        haproxy)
            haproxy -db -f "$config" >"$dir/out.log" 2>&1 &
            ;;
    esac
    PID[$target]=$!
    WATCH[$target]=$!
}

# oha_at_rate URL RATE CONNECTIONS SECONDS OUT ERR: `oha` against URL at RATE
# requests/s over CONNECTIONS, a second first (connections open, caches warm),
# then SECONDS measured, its JSON in OUT and its errors in ERR; fails when
# that oha does. One load-generating thread (like wrk -t1); -w: requests
# still open at the deadline are waited for, not counted as aborted.
oha_at_rate() {
    local url=$1 rate=$2 conns=$3 secs=$4 out=$5 err=$6
    timeout 60 oha -z 1s -q "$rate" -c "$conns" -w --worker-threads 1 --no-tui \
        --output-format quiet "$url" >/dev/null 2>&1 || true
    timeout --kill-after=5 $((secs + 60)) \
        oha -z "${secs}s" -q "$rate" -c "$conns" -w --worker-threads 1 --no-tui \
        --output-format json "$url" >"$out" 2>"$err"
}

# stop TARGET...: TERM to those we started, KILL after 10 s.
stop() {
    local target pid i alive
    local -a pids=()
    for target in "$@"; do
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
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for target in "$@"; do unset "PID[$target]" "WATCH[$target]" "CHILDREN[$target]"; done
}

# stop_all: every server we started, the proxies first.
stop_all() { stop balancer baseline floor nginx haproxy direct; }

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${AUX_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    stop_all
    wait 2>/dev/null || true
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

# read_kb FILE FIELD PID...: sets KB to the sum of FIELD (a line "FIELD: n kB"
# of /proc/PID/FILE) over the PIDs; no subshell.
read_kb() {
    local file=$1 field=$2 pid key value _
    shift 2
    KB=0
    for pid in "$@"; do
        # (2>/dev/null first: the process may be gone by now)
        while read -r key value _; do
            if [[ $key == "$field:" ]]; then
                KB=$((KB + value))
                break
            fi
        done 2>/dev/null <"/proc/$pid/$file" || true
    done
}

# read_rss PID...: sets RSS_KB to the sum of their VmRSS (kB).
read_rss() {
    read_kb status VmRSS "$@"
    # shellcheck disable=SC2034 # read by the caller
    RSS_KB=$KB
}

# cpu_ticks PID... and CLK_TCK: bench/cpu.sh.
# shellcheck source=bench/cpu.sh
source "$BENCH_DIR/cpu.sh"

# machine_lines: "key: value" lines about the machine and the versions measured.
machine_lines() {
    local os cpu mem
    os=$(awk -F= '$1 == "PRETTY_NAME" { gsub(/"/, "", $2); print $2 }' /etc/os-release)
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc: $(nproc)"
    echo "cpu: ${cpu:-unknown}"
    echo "memory: $mem"
    echo "kernel: $(uname -srm)"
    echo "os: $os"
    echo "nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
    echo "haproxy: $(haproxy -v | head -n 1 | awk '{ print $3 }')"
    echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
    echo "commit: $(git -C "$ROOT" --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo unknown)$(
        [[ -n $(git -C "$ROOT" --no-optional-locks status --porcelain -- balancer backend 2>/dev/null) ]] && echo ' (with uncommitted changes)'
    )"
    echo "open files limit: $(ulimit -n)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
}
