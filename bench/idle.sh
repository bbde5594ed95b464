#!/usr/bin/env bash
# bench/idle.sh: memory per idle keep-alive client connection, of the
# balancer, nginx and HAProxy (one worker/thread each, the same backend
# process behind every one), all on 127.0.0.1.
#
# For each count N of IDLE_COUNTS and each proxy: starts the proxy afresh,
# warms it up, reads its memory, opens N client connections with
# bench/idle_clients.py (one keep-alive GET / on each, the whole response
# read), holds them idle, reads its memory again (the highest of SAMPLES
# readings, SETTLE s after the last connection became idle), counts the
# connections still established, then releases them and stops the proxy.
# Memory is summed over the proxy's processes (nginx: master + worker): VmRSS
# from /proc/PID/status and Pss from /proc/PID/smaps_rollup.
#
# Writes bench/results/idle.md and bench/results/idle/ (raw). Every process it
# starts is stopped on exit. Settings (environment):
#   IDLE_COUNTS ("1000 10000"), BENCH_PORT_BASE (19300: backend, +1 balancer,
#   +2 nginx, +3 haproxy), BENCH_SKIP_BUILD=1 (use target/release as it is),
#   BENCH_NOTE (a line about the conditions, printed in idle.md).
set -euo pipefail

read -ra COUNTS <<<"${IDLE_COUNTS:-1000 10000}"
PORT_BASE=${BENCH_PORT_BASE:-19300}
# shellcheck source=bench/servers.sh
source "$(dirname "${BASH_SOURCE[0]}")/servers.sh"
RESULTS=$BENCH_DIR/results
RAW=$RESULTS/idle

PROXIES=(balancer floor nginx haproxy)
WINDOW=50           # connections being opened at once (idle_clients.py --window)
SETTLE=2            # seconds between the last connection going idle and the readings
SAMPLES=5           # readings of the memory with the connections idle, ...
SAMPLE_EVERY=0.5    # ... this many seconds apart; the highest counts
KEEPALIVE=300s      # every proxy's keep-alive (idle) timeout: far beyond a hold
MAX_COUNT=0
for n in "${COUNTS[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "IDLE_COUNTS: $n is not a count of connections"
    ((n <= MAX_COUNT)) || MAX_COUNT=$n
done

install_tools() {
    if command -v ss >/dev/null; then install_missing; else install_missing iproute2; fi
}

# ------------------------------------------------ the proxies' configurations
# bench/balancer.toml, nginx.conf and haproxy.cfg as run.sh uses them, with
# the keep-alive timeouts beyond the hold and the connection limits beyond
# the largest count. The open-file limit FD is set by main.

# replace_line FILE PATTERN LINES: every line matching PATTERN (an ERE) becomes
# LINES (\n between lines); stops when none matches.
replace_line() {
    local file=$1 pattern=$2 lines=$3
    grep -Eq "$pattern" "$file" || die "$(basename "$file"): no line matches $pattern"
    awk -v p="$pattern" -v l="$lines" '$0 ~ p { print l; next } { print }' "$file" >"$file.new"
    mv "$file.new" "$file"
}

# The floor takes no configuration file: Pingora's defaults.
edit_floor() { :; }

edit_balancer() {
    ! grep -q '^\[limits\]' "$1" || die "$(basename "$1") has a [limits] table already"
    # client_header_timeout is left alone: it bounds the wait for a request
    # head only, and each request is sent as soon as its connection is open.
    cat >>"$1" <<EOF

[limits]
keepalive_timeout = "$KEEPALIVE"
max_connections = $FD
EOF
}

edit_nginx() {
    replace_line "$1" '^worker_rlimit_nofile ' "worker_rlimit_nofile $FD;"
    replace_line "$1" '^ *worker_connections ' "    worker_connections $FD;"
    replace_line "$1" '^ *access_log off;' "    access_log off;\n    keepalive_timeout $KEEPALIVE;"
}

edit_haproxy() {
    # HAProxy asks for two descriptors per connection (client and server
    # side); an idle client holds one, so a hard limit of twice the count is
    # not needed: no strict-limits lets it start below that.
    replace_line "$1" '^ *maxconn ' "    maxconn $((MAX_COUNT + 100))\n    no strict-limits"
    replace_line "$1" '^ *timeout client ' "    timeout client $KEEPALIVE"
    replace_line "$1" '^ *timeout http-keep-alive ' "    timeout http-keep-alive $KEEPALIVE"
}

# ------------------------------------------------------------- measuring

# peak_memory TARGET SAMPLES: sets PEAK_RSS and PEAK_PSS (kB) to the highest
# sums over the target's processes in SAMPLES readings SAMPLE_EVERY s apart,
# and READINGS to the RSS of each.
peak_memory() {
    local target=$1 samples=$2 i
    PEAK_RSS=0 PEAK_PSS=0 READINGS=""
    for ((i = 0; i < samples; i++)); do
        ((i == 0)) || sleep "$SAMPLE_EVERY"
        # shellcheck disable=SC2086 # WATCH holds a list of PIDs
        read_kb status VmRSS ${WATCH[$target]}
        READINGS+=" $KB"
        if ((KB > PEAK_RSS)); then PEAK_RSS=$KB; fi
        # shellcheck disable=SC2086
        read_kb smaps_rollup Pss ${WATCH[$target]}
        if ((KB > PEAK_PSS)); then PEAK_PSS=$KB; fi
    done
}

# established PORT: client connections to PORT the server side holds open.
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

# until_line FILE LINE PID SECONDS: until FILE has LINE, while PID runs.
until_line() {
    local file=$1 line=$2 pid=$3 i
    for ((i = 0; i < $4 * 10; i++)); do
        grep -qx "$line" "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -qx "$line" "$file" 2>/dev/null
}

# hold_idle TARGET N OUT: opens N connections to TARGET, reads its memory
# with them idle, and appends what it found to OUT.
hold_idle() {
    local target=$1 n=$2 out=$3 port=${PORT[$1]} client rc=0 hold held
    local said=$WORK/client.txt fifo=$WORK/hold
    rm -f "$fifo" "$said"
    mkfifo "$fifo"
    # The client holds the connections until its standard input closes.
    "$PY" "$BENCH_DIR/idle_clients.py" --port "$port" --count "$n" --window "$WINDOW" \
        --max-hold 600 <"$fifo" >"$said" 2>&1 &
    client=$!
    AUX_PIDS=("$client")
    exec {hold}>"$fifo"
    if ! until_line "$said" READY "$client" $((60 + n / 100)); then
        cat "$said" >&2
        die "idle_clients.py did not get $n connections to $target open"
    fi
    sleep "$SETTLE"
    peak_memory "$target" "$SAMPLES"
    held=$(established "$port")
    exec {hold}>&-
    until_line "$said" 'held_seconds: .*' "$client" 10 || kill "$client" 2>/dev/null || true
    wait "$client" || rc=$?
    AUX_PIDS=()
    {
        echo "# rss_idle_kb: $PEAK_RSS"
        echo "# pss_idle_kb: $PEAK_PSS"
        echo "# rss_readings_kb:$READINGS"
        echo "# established: $held"
        echo "# client_exit: $rc"
        cat "$said"
    } >>"$out"
    log "  $target: $held of $n established, RSS $((PEAK_RSS / 1024)) MiB"
}

# measure TARGET N: a fresh TARGET, warmed up, before and with N idle connections.
measure() {
    local target=$1 n=$2 out=$RAW/$1-$2.txt
    start_proxy "$target" "edit_$target"
    wait_ready "$target"
    # Warm-up: one window of connections, answered and closed, so that what
    # the first requests set up once (the connections to the backend among
    # them) is in the figure before.
    "$PY" "$BENCH_DIR/idle_clients.py" --port "${PORT[$target]}" --count "$WINDOW" \
        --window "$WINDOW" </dev/null >"$WORK/warmup.txt" 2>&1 ||
        die "the warm-up of $target failed: $(tr '\n' ' ' <"$WORK/warmup.txt")"
    sleep 1
    peak_memory "$target" 3
    {
        echo "# target: $target"
        echo "# connections: $n"
        echo "# rss_before_kb: $PEAK_RSS"
        echo "# pss_before_kb: $PEAK_PSS"
    } >"$out"
    hold_idle "$target" "$n" "$out"
    stop "$target"
}

# ---------------------------------------------------------------- report

report() {
    local md=$RESULTS/idle.md
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW/machine.txt"
    {
        echo "# Memory per idle keep-alive connection"
        echo
        if [[ -n ${BENCH_NOTE:-} ]]; then printf '> %s\n\n' "$BENCH_NOTE"; fi
        echo "Each proxy (one worker/thread, in front of the same backend process) was"
        echo "started afresh for each count N, warmed up with $WINDOW connections, and given N"
        echo "client connections, each with one keep-alive \`GET /\` answered \`200 Hello World!\`"
        echo "and then left idle. *before*: its memory before they were opened; *with N idle*:"
        echo "the highest of $SAMPLES readings ${SAMPLE_EVERY} s apart, from ${SETTLE} s after the last one went idle;"
        echo "*per connection*: (with N idle - before) / N. Memory is summed over the"
        echo "proxy's processes (nginx: master + worker); *held* is how many of the"
        echo "connections the proxy still had ESTABLISHED after the readings (\`ss\`)."
        echo
        awk -v raw="$RAW" -v counts="${COUNTS[*]}" -v proxies="${PROXIES[*]}" -f /dev/stdin "$RAW"/*-*.txt <<'AWK'
/^# [a-z_]+: / { key = substr($2, 1, length($2) - 1); v[FILENAME, key] = $3 }
/^failure: / { fail[FILENAME] = fail[FILENAME] "; " substr($0, 10) }
function per(f, kind) {
    return v[f, "connections"] ? (v[f, kind "_idle_kb"] - v[f, kind "_before_kb"]) / v[f, "connections"] : 0
}
function mib(kb) { return sprintf("%.1f MiB", kb / 1024) }
function ratio(x, ref) { return ref > 0 ? sprintf("%.2f", x / ref) : "-" }
END {
    nc = split(counts, c, " "); np = split(proxies, p, " ")
    print "| target | N | held | RSS before | RSS with N idle | KiB per connection | × floor | × nginx | PSS KiB per connection | × floor | × nginx |"
    print "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for (i = 1; i <= nc; i++) {
        ref = raw "/nginx-" c[i] ".txt"
        floor = raw "/floor-" c[i] ".txt"
        for (j = 1; j <= np; j++) {
            f = raw "/" p[j] "-" c[i] ".txt"
            if (!((f, "rss_idle_kb") in v)) continue
            held = v[f, "established"]
            if (held < c[i]) { held = held " (!)"; short = 1 }
            printf "| %s | %d | %s | %s | %s | %.1f | %s | %s | %.1f | %s | %s |\n", p[j], c[i], held,
                mib(v[f, "rss_before_kb"]), mib(v[f, "rss_idle_kb"]), per(f, "rss"),
                ratio(per(f, "rss"), per(floor, "rss")), ratio(per(f, "rss"), per(ref, "rss")),
                per(f, "pss"), ratio(per(f, "pss"), per(floor, "pss")), ratio(per(f, "pss"), per(ref, "pss"))
            if (f in fail) notes = notes "\n- " p[j] ", N = " c[i] ": the client could not open" fail[f]
        }
    }
    if (short) print "\n(!) fewer than N connections were still open: the figure per connection understates the cost."
    if (notes != "") print "\nFailed connections:" notes
}
AWK
        echo
        echo "## Machine"
        echo
        sed 's/^/- /' "$RAW/machine.txt"
    } >"$md"
    log "wrote $md"
}

main() {
    install_tools
    raise_fd_limit $((MAX_COUNT + 500)) "$MAX_COUNT idle connections"
    FD=$(ulimit -n)
    build
    rm -rf "$RAW"
    mkdir -p "$RAW"
    rm -f "$RESULTS/idle.md"
    open_work_dir
    {
        machine_lines
        echo "connections: ${COUNTS[*]} (opened $WINDOW at a time)"
        echo "keep-alive timeouts: $KEEPALIVE"
    } >"$RAW/machine.txt"
    start_backend
    local n target
    for n in "${COUNTS[@]}"; do
        log "$n idle connections to each of ${PROXIES[*]}"
        for target in "${PROXIES[@]}"; do measure "$target" "$n"; done
    done
    stop_all
    report
}

main "$@"
