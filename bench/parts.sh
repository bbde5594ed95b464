#!/usr/bin/env bash
# What each part of the balancer's per-request work costs: one interleaved
# A/B (bench/ab.sh) of a bench-only build (Cargo feature bench-parts) with
# one part turned off at a time, beside the same build with everything on
# and Pingora's floor (bench/floor). All variants have one route (`/` to the
# default group) and the access log on as shipped (text, to a file), but
# the ones that say otherwise; the path is `/`, proxied.
#
#   bench/parts.sh [-o REPORT]        # default report: bench/results/parts.md
#
# The bench build goes to target/parts (a target directory of its own, so
# that target/release stays the shipped build). Listens on
# 127.0.0.1:19800-19812. Environment: AB_ROUNDS (5), AB_DURATION (5 s), as
# bench/ab.sh reads them; PARTS_SKIP_BUILD=1 uses the builds as they are.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPORT=$ROOT/bench/results/parts.md
if [[ ${1:-} == -o ]]; then
    REPORT=${2:?-o needs a file}
    shift 2
fi
command -v valgrind >/dev/null || { echo "parts.sh: valgrind is needed for the instruction counts (apt-get install -y valgrind)" >&2; exit 2; }
if [[ ${PARTS_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p backend -p floor)
    (cd "$ROOT" && CARGO_TARGET_DIR=$ROOT/target/parts cargo build --release -p balancer --features bench-parts)
fi
BIN=$ROOT/target/parts/release/balancer
FLOOR=$ROOT/target/release/floor

# Each variant: NAME, the parts turned off, RUST_LOG, more TOML (the access
# log is on at `info`, to a file).
VARIANTS=(
    "shipped||info|"
    "no_guard|guard|info|"
    "no_request_id|request_id|info|"
    "no_routing|routing|info|"
    "no_metrics|metrics|info|"
    "no_cache_lookup|cache_lookup|info|"
    "no_log||warn|"
    "json_log||info|log_format = \"json\""
    "no_all|guard,request_id,routing,metrics,cache_lookup|warn|"
)
# The floor, and the floor making the calls into Pingora's API that some of
# the balancer's parts need (bench/floor --with): NAME, the calls. What
# these cost the floor is Pingora's price for those parts.
FLOORS=(
    "floor|"
    "floor+request_id|request-id"
    "floor+forwarded_proto|forwarded-proto"
    "floor+timeouts|timeouts"
    "floor+calls|request-id,forwarded-proto,timeouts"
)

# 1. Time: bench/ab.sh, interleaved rounds of wrk.
if [[ ${PARTS_WRK:-1} == 1 ]]; then
    specs=()
    for v in "${VARIANTS[@]}"; do
        IFS='|' read -r name off level toml <<<"$v"
        spec="$name=$BIN,route"
        [[ $level == info ]] && spec+=",log=${toml:+json}"
        [[ $level == info && -z $toml ]] && spec+="text"
        [[ -n $off ]] && spec+=",off=${off//,/+}"
        specs+=("$spec")
    done
    # The floor alone and with all its calls (the last of FLOORS): the
    # others in instructions only.
    calls=${FLOORS[-1]#*|}
    AB_PORT_BASE=19800 AB_PATHS=/ AB_BACKEND=$ROOT/target/release/backend \
        "$ROOT/bench/ab.sh" -o "$REPORT" "${specs[@]}" "floor=$FLOOR" \
        "floor+calls=$FLOOR,with=${calls//,/+}"
else
    : >"$REPORT"
fi

# 2. Instructions: each variant under callgrind, which counts the
# instructions a process runs whatever else the machine does. A run of N1
# and one of N2 requests (one kept-alive connection, curl), so that what
# starting and stopping costs drops out: (I(N2) - I(N1)) / (N2 - N1).
N1=${PARTS_N1:-300}
N2=${PARTS_N2:-2300}
WORK=$(mktemp -d)
BACKEND_PID=
cleanup() {
    [[ -z $BACKEND_PID ]] || kill "$BACKEND_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
"$ROOT/target/release/backend" --listen 127.0.0.1:19849 --workers 1 >"$WORK/backend.log" 2>&1 &
BACKEND_PID=$!
sleep 0.5
kill -0 "$BACKEND_PID" 2>/dev/null || { echo "parts.sh: the backend did not start (is 127.0.0.1:19849 in use?):" >&2; cat "$WORK/backend.log" >&2; exit 1; }

# instructions N LEVEL OFF CMD...: the instructions CMD (a proxy on 19850)
# ran to serve N requests to /, and to start and stop.
instructions() {
    local n=$1 level=$2 off=$3 pid
    shift 3
    RUST_LOG=$level BALANCER_BENCH_OFF=$off valgrind --tool=callgrind \
        --callgrind-out-file="$WORK/callgrind.%p" "$@" >"$WORK/proxy.log" 2>"$WORK/valgrind.log" &
    pid=$!
    for _ in $(seq 300); do
        curl -s -o /dev/null --max-time 1 http://127.0.0.1:19850/ && break
        sleep 0.2
    done
    curl -sf -o /dev/null "http://127.0.0.1:19850/?[1-$n]" || { echo "parts.sh: the proxy did not answer:" >&2; tail "$WORK/proxy.log" >&2; exit 1; }
    kill -INT "$pid"
    wait "$pid" || true
    awk '/^summary:/ { print $2 }' "$WORK/callgrind.$pid"
}

declare -A PER
for v in "${VARIANTS[@]}" "${FLOORS[@]}"; do
    IFS='|' read -r name off level toml <<<"$v"
    if [[ $name == floor* ]]; then
        cmd=("$FLOOR" --listen 127.0.0.1:19850 --upstream 127.0.0.1:19849 --threads 1 ${off:+--with "$off"})
        off= level=warn
    else
        mkdir -p "$WORK/$name"
        {
            echo 'listen = "127.0.0.1:19850"'
            echo 'threads = 1'
            echo "$toml"
            echo '[upstream]'
            echo 'servers = ["127.0.0.1:19849"]'
            echo '[cache]'
            echo '[[cache.rule]]'
            echo 'path = "/cache-me"'
            echo 'ttl = "300s"'
            echo '[[route]]'
            echo 'name = "app"'
            echo 'path = "/"'
            echo 'upstream = "default"'
        } >"$WORK/$name/balancer.toml"
        cmd=("$BIN" --config "$WORK/$name/balancer.toml")
    fi
    i1=$(instructions "$N1" "$level" "$off" "${cmd[@]}")
    i2=$(instructions "$N2" "$level" "$off" "${cmd[@]}")
    PER[$name]=$(((i2 - i1) / (N2 - N1)))
    echo "$name: ${PER[$name]} instructions per request"
done

{
    echo
    echo "## Instructions per request (callgrind)"
    echo
    echo "Each variant under \`valgrind --tool=callgrind\`, $N1 and then $N2 requests to \`/\` on one"
    echo "kept-alive connection (curl); per request: the difference of the two totals over $((N2 - N1))."
    echo "User-space instructions only (the kernel's work is not counted), the same in every run"
    echo "of the same build whatever else the machine does."
    echo
    echo "| variant | instructions per request | vs shipped | what the part costs | vs floor |"
    echo "|---|---|---|---|---|"
    for v in "${VARIANTS[@]}" "${FLOORS[@]}"; do
        name=${v%%|*}
        case $name in
            shipped | floor) cost= ;;
            floor*) cost="+$((PER[$name] - PER[floor])) to the floor" ;;
            *) cost=$((PER[shipped] - PER[$name])) ;;
        esac
        printf '| %s | %d | %s | %s | %s |\n' "$name" "${PER[$name]}" \
            "$(awk -v a="${PER[$name]}" -v b="${PER[shipped]}" 'BEGIN { printf "%.3f", a / b }')" \
            "$cost" \
            "$(awk -v a="${PER[$name]}" -v b="${PER[floor]}" 'BEGIN { printf "%.3f", a / b }')"
    done
    echo
    echo "\`shipped\`: the bench build (\`--features bench-parts\`) with every part on, one route"
    echo "(\`/\` to the default group), the access log as text to a file. \`no_PART\`: the same"
    echo "with that part turned off (\`BALANCER_BENCH_OFF\`, see \`balancer/src/proxy/parts.rs\`);"
    echo "\`no_log\`: the access log off (\`RUST_LOG=warn\`); \`json_log\`: the access log as JSON;"
    echo "\`no_all\`: every part and the log off; \`floor\`: \`bench/floor\`, the smallest Pingora"
    echo "proxy doing the same forwarding; \`floor+CALL\`: the floor making too the calls into"
    echo "Pingora's API that a part of the balancer needs (\`floor --with\`: \`X-Request-Id\` inserted"
    echo "upstream and in the response, \`X-Forwarded-Proto\` inserted, the peer's timeouts set;"
    echo "\`floor+calls\`: all three), which is Pingora's price for that part."
} >>"$REPORT"
cat "$REPORT"
