#!/usr/bin/env bash
# A/B of balancer builds and settings, in one interleaved run: each variant
# runs in front of the same backend, and `wrk -t1 -c64` measures / (proxied)
# and /cache-me (a cache hit) on each. Rounds alternate the variants so that
# drift of the machine hits all of them alike; the report gives each
# variant's median and range of requests/s, and of the CPU time (user +
# system) its process used per request, each with its ratio to the first
# variant. CPU per request is the steadier figure on a shared machine: time
# other tenants take from the cores lowers requests/s, not it.
#
#   bench/ab.sh [-o REPORT] VARIANT...
#
# A VARIANT is NAME=BINARY[,OPTION...], where BINARY is a release build of
# the balancer (build an earlier one from its commit in a worktree), or the
# floor (target/release/floor, bench/floor: the smallest Pingora proxy doing
# the same forwarding; it has no cache, so it is measured on the paths other
# than /cache-me, and the report adds a "vs floor" column), and the options
# (the balancer's; the floor takes threads=N and with=CALL[+CALL] only; the
# first floor variant is the one the "vs floor" column divides by) are:
#   route             one [[route]] sending / to the default upstream
#   threads=N         worker threads (default 1)
#   log=text|json     the access log on, in that format, to a file
#                     (default: off, RUST_LOG=warn)
#   pipe              the output through a pipe (to a process writing the
#                     file), as Docker reads a container's
#   config=FILE       more TOML, appended to the variant's configuration
#   off=PART[+PART]   parts of the request path turned off (BALANCER_BENCH_OFF;
#                     only a build with the feature bench-parts: bench/parts.sh)
#   with=CALL[+CALL]  the floor only: Pingora calls of the balancer's features
#                     it makes too (floor --with: request-id, forwarded-proto,
#                     timeouts)
# For example:
#   bench/ab.sh -o bench/results/ab.md old=/tmp/old/balancer \
#       new=target/release/balancer new+route=target/release/balancer,route
#   bench/ab.sh new=target/release/balancer floor=target/release/floor
#
# The backend is the one beside the first variant's binary (AB_BACKEND to
# name another). Environment: AB_ROUNDS (5), AB_DURATION (5 s),
# AB_PORT_BASE (19200), AB_PATHS ("/ /cache-me").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/cpu.sh
source "$ROOT/bench/cpu.sh"
REPORT=$ROOT/bench/results/ab.md
if [[ ${1:-} == -o ]]; then
    REPORT=${2:?-o needs a file}
    shift 2
fi
(($# > 0)) || { sed -n '2,31p' "$0" >&2; exit 2; }
ROUNDS=${AB_ROUNDS:-5}
DURATION=${AB_DURATION:-5}
BASE=${AB_PORT_BASE:-19200}
read -r -a PATHS <<<"${AB_PATHS:-/ /cache-me}"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

NAMES=()
FLOOR=   # the name of the floor's variant, if there is one
# is_floor NAME: whether the variant NAME runs the floor.
is_floor() { [[ $(basename "${BIN[$1]}") == floor ]]; }
declare -A BIN PORT THREADS LOG PIPE CONFIG OFF WITH VPID
for spec in "$@"; do
    name=${spec%%=*}
    IFS=, read -r -a fields <<<"${spec#*=}"
    [[ $name != "$spec" && -x ${fields[0]:-} ]] || { echo "ab.sh: $spec: expected NAME=BINARY[,OPTION...] with an executable BINARY" >&2; exit 2; }
    NAMES+=("$name")
    BIN[$name]=${fields[0]}
    [[ -z $FLOOR ]] && is_floor "$name" && FLOOR=$name
    PORT[$name]=$((BASE + ${#NAMES[@]}))
    THREADS[$name]=1
    LOG[$name]=
    PIPE[$name]=
    CONFIG[$name]=
    OFF[$name]=
    WITH[$name]=
    for option in "${fields[@]:1}"; do
        case $option in
            route) CONFIG[$name]+=$'[[route]]\nname = "app"\npath = "/"\nupstream = "default"\n' ;;
            threads=*) THREADS[$name]=${option#threads=} ;;
            log=text | log=json) LOG[$name]=${option#log=} ;;
            pipe) PIPE[$name]=1 ;;
            config=*) CONFIG[$name]+=$(cat "${option#config=}")$'\n' ;;
            off=*) OFF[$name]=${option#off=} ;;
            with=*) WITH[$name]=${option#with=} ;;
            *) echo "ab.sh: $spec: unknown option $option" >&2; exit 2 ;;
        esac
    done
done

"${AB_BACKEND:-$(dirname "${BIN[${NAMES[0]}]}")/backend}" --listen "127.0.0.1:$BASE" --workers 1 >"$WORK/backend.log" 2>&1 &
PIDS+=($!)

# Each variant's configuration in a directory of its own, and its output
# beside it: a file written in the watched directory would wake the
# configuration watch on every line.
mkdir -p "$WORK/logs"
for t in "${NAMES[@]}"; do
    mkdir -p "$WORK/$t"
    if is_floor "$t"; then
        "${BIN[$t]}" --listen "127.0.0.1:${PORT[$t]}" --upstream "127.0.0.1:$BASE" \
            --threads "${THREADS[$t]}" ${WITH[$t]:+--with "${WITH[$t]//+/,}"} >"$WORK/logs/$t.log" 2>&1 &
        PIDS+=($!)
        VPID[$t]=$!
        continue
    fi
    {
        echo "listen = \"127.0.0.1:${PORT[$t]}\""
        echo "threads = ${THREADS[$t]}"
        [[ -n ${LOG[$t]} ]] && echo "log_format = \"${LOG[$t]}\""
        echo "[upstream]"
        echo "servers = [\"127.0.0.1:$BASE\"]"
        echo "[cache]"
        echo "[[cache.rule]]"
        echo "path = \"/cache-me\""
        echo "ttl = \"300s\""
        echo "${CONFIG[$t]}"
    } >"$WORK/$t/balancer.toml"
    level=warn
    [[ -n ${LOG[$t]} ]] && level=info
    if [[ -n ${PIPE[$t]} ]]; then
        BALANCER_BENCH_OFF=${OFF[$t]//+/,} RUST_LOG=$level "${BIN[$t]}" --config "$WORK/$t/balancer.toml" \
            > >(cat >"$WORK/logs/$t.log") 2>&1 &
    else
        BALANCER_BENCH_OFF=${OFF[$t]//+/,} RUST_LOG=$level "${BIN[$t]}" --config "$WORK/$t/balancer.toml" >"$WORK/logs/$t.log" 2>&1 &
    fi
    PIDS+=($!)
    VPID[$t]=$!
done
for t in "${NAMES[@]}"; do
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:${PORT[$t]}/" && break
        sleep 0.1
    done
    status=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${PORT[$t]}/cache-me" || true)
    [[ $status == 200 ]] || { echo "ab.sh: $t does not answer on port ${PORT[$t]}:" >&2; tail -n 20 "$WORK/logs/$t.log" >&2; exit 1; }
done

declare -A RESULTS CPU
for ((round = 1; round <= ROUNDS; round++)); do
    for path in "${PATHS[@]}"; do
        for t in "${NAMES[@]}"; do
            is_floor "$t" && [[ $path == /cache-me ]] && continue
            wrk_measured "$DURATION" "http://127.0.0.1:${PORT[$t]}$path" "${VPID[$t]}"
            RESULTS["$t $path"]+="$RPS "
            CPU["$t $path"]+="$CPU_US "
            echo "round $round $path $t: $RPS req/s, $CPU_US µs of CPU per request"
        done
    done
done

first=${NAMES[0]}
{
    echo "# A/B: ${NAMES[*]}, one interleaved run"
    echo
    echo "$ROUNDS rounds of wrk -t1 -c64 -d${DURATION}s per path and variant, 1 backend worker; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    echo "| variant | binary and options |"
    echo "|---|---|"
    for spec in "$@"; do echo "| ${spec%%=*} | \`${spec#*=}\` |"; done
    echo
    rps_cpu_table variant "$first" "${NAMES[@]}"
} >"$REPORT"
cat "$REPORT"
