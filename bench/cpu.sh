# bench/cpu.sh: the CPU time processes have used, from /proc, a wrk run
# measured with it, and the statistics of the reports; sourced by
# servers.sh (run.sh, idle.sh, tls.sh, ws.sh, compression.sh) and ab.sh.
# shellcheck shell=bash

# cpu_ticks PID...: sets CPU_USER and CPU_SYSTEM to the user and system time
# the PIDs have used so far, in clock ticks (CLK_TCK a second); no subshell.
cpu_ticks() {
    local pid stat
    local -a fields
    CPU_USER=0
    CPU_SYSTEM=0
    for pid in "$@"; do
        read -r stat 2>/dev/null <"/proc/$pid/stat" || continue
        read -r -a fields <<<"${stat##*) }" # from the third field, state
        CPU_USER=$((CPU_USER + fields[11]))
        CPU_SYSTEM=$((CPU_SYSTEM + fields[12]))
    done
}
# shellcheck disable=SC2034 # read by the scripts that source this one
CLK_TCK=$(getconf CLK_TCK)

# wrk_measured SECONDS URL PIDS [WRK_ARG...]: a 1 s warm-up, then
# `wrk -t1 -c64` for SECONDS on URL; sets RPS (requests/s), REQUESTS and
# CPU_US (the CPU time the PIDs, a space-separated list, used per request,
# in µs). wrk failing counts as 0 requests.
wrk_measured() {
    local seconds=$1 url=$2 pids=$3 ticks out
    shift 3
    wrk -t1 -c64 -d1s "$@" "$url" >/dev/null 2>&1 || true
    # shellcheck disable=SC2086 # a list of PIDs
    cpu_ticks $pids
    ticks=$((CPU_USER + CPU_SYSTEM))
    out=$(wrk -t1 -c64 -d"${seconds}s" "$@" "$url" 2>/dev/null || true)
    # shellcheck disable=SC2086
    cpu_ticks $pids
    ticks=$((CPU_USER + CPU_SYSTEM - ticks))
    RPS=$(awk '/Requests\/sec/ { print int($2) }' <<<"$out")
    RPS=${RPS:-0}
    REQUESTS=$(awk '/requests in/ { print $1 }' <<<"$out")
    CPU_US=$(awk -v t="$ticks" -v hz="$CLK_TCK" -v n="${REQUESTS:-0}" 'BEGIN { printf "%.2f", (n > 0 ? t / hz / n * 1e6 : 0) }')
}

# Of a space-separated list of numbers on standard input: the median, and
# the range as LOW-HIGH (an empty list gives an empty line, not a failure
# under pipefail: a variant may have no figures on a path); ratio A B is
# A / B to three decimals.
median() { tr ' ' '\n' | awk NF | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
range() { tr ' ' '\n' | awk NF | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "–"; else printf "%.3f", a / b }'; }

# rps_cpu_table WHAT REFERENCE TARGET...: the report's table of requests/s
# and CPU per request, per path of PATHS and TARGET, from the caller's
# RESULTS and CPU ("TARGET PATH" -> the rounds' figures), with the ratios
# to REFERENCE's medians; WHAT names the column of the targets. When the
# caller's FLOOR names one of the targets (bench/floor), the ratios to its
# medians follow too. A target with no figures on a path is left out there.
rps_cpu_table() {
    local what=$1 reference=$2 path t m c rps_ref cpu_ref floor_rps floor_cpu head="" rule=""
    shift 2
    [[ -n ${FLOOR:-} ]] && head=" vs floor |" rule="---|"
    echo "| path | $what | median req/s | range | vs $reference |$head CPU µs per request | range | vs $reference |$head"
    echo "|---|---|---|---|---|$rule---|---|---|$rule"
    for path in "${PATHS[@]}"; do
        rps_ref=$(echo "${RESULTS["$reference $path"]:-}" | median)
        cpu_ref=$(echo "${CPU["$reference $path"]:-}" | median)
        floor_rps=$(echo "${RESULTS["${FLOOR:-} $path"]:-}" | median)
        floor_cpu=$(echo "${CPU["${FLOOR:-} $path"]:-}" | median)
        for t in "$@"; do
            [[ -n ${RESULTS["$t $path"]:-} ]] || continue
            m=$(echo "${RESULTS["$t $path"]}" | median)
            c=$(echo "${CPU["$t $path"]}" | median)
            local rps_floor="" cpu_floor=""
            [[ -n ${FLOOR:-} ]] && rps_floor=" $(ratio "$m" "$floor_rps") |" cpu_floor=" $(ratio "$c" "$floor_cpu") |"
            echo "| \`$path\` | $t | $m | $(echo "${RESULTS["$t $path"]}" | range) | $(ratio "$m" "$rps_ref") |$rps_floor $c | $(echo "${CPU["$t $path"]}" | range) | $(ratio "$c" "$cpu_ref") |$cpu_floor"
        done
    done
}
