#!/usr/bin/env bash
# bench/tls.sh: the balancer against nginx over HTTPS, in one interleaved run,
# all on 127.0.0.1: one worker/thread each, in front of the same backend
# process, with run.sh's configurations (bench/balancer.toml, nginx.conf) and
# an HTTPS listener added to each (bench/balancer-tls.toml, nginx-tls.conf):
# TLS 1.3 only, the same certificate (`balancer cert --self-signed`). The
# floor (bench/floor, with Pingora's own TLS settings and the same
# certificate) runs the h1 and h2 steps on / (it has no cache).
#
#   h1       HTTP/1.1 with keep-alive: wrk -t1 -c64 on / (proxied) and
#            /cache-me (a cache hit);
#   h2       HTTP/2 (ALPN h2): h2load -c64 -m10 on the same paths;
#   full     a new connection and a full TLS handshake for every request:
#            curl, 32 transfers at once, Connection: close, no session reuse,
#            on /cache-me;
#   resumed  a new connection for every request, resuming a TLS session:
#            h2load --h1 -c32, Connection: close, on /cache-me.
#
# Each run is preceded by 1 s of the same load and records the CPU time the
# proxy and the load generator used. The load generators are checked first
# (tls.sh stops if one does not do what its step says). Writes
# bench/results/tls.md and bench/results/raw-tls/; every process it starts is
# stopped on exit. Settings (environment):
#   BENCH_ROUNDS (5), BENCH_DURATION (5, seconds of each measured run),
#   BENCH_PORT_BASE (19400: the backend; +1 the balancer, +2 nginx and +4 the
#   floor over plain HTTP, +11, +12 and +14 over HTTPS, +13 nginx's check
#   listener),
#   BENCH_NOTE (a line about the conditions, printed in tls.md),
#   BENCH_SKIP_BUILD=1 (use the binaries in target/release as they are).
# Starting and stopping the servers: bench/servers.sh.
set -euo pipefail
export LC_ALL=C

ROUNDS=${BENCH_ROUNDS:-5}
DURATION=${BENCH_DURATION:-5}
WARMUP=1
PORT_BASE=${BENCH_PORT_BASE:-19400}
# shellcheck source=bench/servers.sh
source "$(dirname "${BASH_SOURCE[0]}")/servers.sh"
RESULTS=$BENCH_DIR/results
RAW=$RESULTS/raw-tls
REPORT=$RESULTS/tls.md

CONNS=64          # wrk's and h2load's connections
STREAMS=10        # h2load's streams at once on each
HANDSHAKERS=32    # connections at once when each request has one of its own
CLIENTS=$(nproc)  # ... over this many client processes (curl) or threads (h2load):
                  # a TLS client's handshake costs more CPU than the server's

TARGETS=(balancer floor nginx)
STEPS=(h1 h2 full resumed)
declare -A PATHS=([h1]="/ /cache-me" [h2]="/ /cache-me" [full]=/cache-me [resumed]=/cache-me)
declare -A TLS_PORT=([balancer]=$((PORT_BASE + 11)) [nginx]=$((PORT_BASE + 12)) [floor]=$((PORT_BASE + 14)))
CHECK_PORT=$((PORT_BASE + 13))
declare -A PACE=()    # requests/s of the last `resumed` run, per port

# ------------------------------------------------------------------ servers

# tls_snippet NAME TARGET: bench/NAME, placeholders filled in, into WORK/TARGET.
tls_snippet() {
    sed -e "s|@DIR@|$WORK/$2|g" -e "s|@TLS_DIR@|$WORK/tls|g" -e "s|@TLS_PORT@|${TLS_PORT[$2]}|g" \
        -e "s|@CHECK_PORT@|$CHECK_PORT|g" "$BENCH_DIR/$1" >"$WORK/$2/$1"
}

edit_balancer() {
    tls_snippet balancer-tls.toml balancer
    cat "$WORK/balancer/balancer-tls.toml" >>"$1"
}

edit_nginx() {
    local line
    tls_snippet nginx-tls.conf nginx
    # shellcheck disable=SC2016 # $scheme is nginx's
    sed -i -e "s|^\( *\)listen 127.0.0.1:${PORT[nginx]} \(.*\)$|&\n\1listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2 \2|" \
        -e 's|^\( *\)proxy_set_header X-Forwarded-For .*$|&\n\1proxy_set_header X-Forwarded-Proto $scheme;|' \
        -e "s|^\( *\)access_log off;$|&\n\1include $WORK/nginx/nginx-tls.conf;|" "$1"
    # shellcheck disable=SC2016
    for line in "listen 127.0.0.1:${TLS_PORT[nginx]} ssl http2" 'X-Forwarded-Proto $scheme' "include $WORK/nginx"; do
        grep -qF "$line" "$1" || die "nginx.conf: could not add '$line' (has bench/nginx.conf changed?)"
    done
}

start_servers() {
    local port target
    for port in "${TLS_PORT[@]}" "$CHECK_PORT"; do
        ! port_in_use "$port" || die "127.0.0.1:$port is in use (set BENCH_PORT_BASE)"
    done
    "$TARGET_DIR/release/balancer" cert --self-signed --host localhost --out "$WORK/tls" >/dev/null
    FLOOR_ARGS=(--tls-listen "127.0.0.1:${TLS_PORT[floor]}" --cert "$WORK/tls/cert.pem" --key "$WORK/tls/key.pem")
    start_backend
    for target in "${TARGETS[@]}"; do start_proxy "$target" "edit_$target"; done
    for target in "${TARGETS[@]}"; do wait_ready "$target"; done
}

# runs TARGET STEP PATH: whether TARGET is measured in STEP on PATH (the
# floor has no cache: it runs h1 and h2 on / only).
runs() {
    [[ $1 != floor ]] || [[ $3 == / && ($2 == h1 || $2 == h2) ]]
}

# ------------------------------------------------------------------ load

# handshakes PORT PATH SECONDS: GET PATH for SECONDS, every request on a new
# connection (Connection: close, which both servers honour by closing) with a
# full TLS handshake (no session reuse), HANDSHAKERS at once over CLIENTS curl
# processes; prints how many requests ended with each status and count of
# connections opened for it ("1234 200 1"). (h2load cannot: it resumes the
# session of a client's previous connection; so does wrk.)
handshakes() {
    local port=$1 path=$2 seconds=$3 rc=0 i
    local -a pids=()
    for ((i = 1; i <= CLIENTS; i++)); do
        # The fragment #N only makes the URLs many: curl does not send it.
        timeout -s INT "$seconds" curl -sk --no-progress-meter --http1.1 -H 'Connection: close' \
            --no-sessionid --parallel --parallel-max $((HANDSHAKERS / CLIENTS)) \
            --resolve "localhost:$port:127.0.0.1" -o /dev/null -w '%{stderr}%{http_code} %{num_connects}\n' \
            "https://localhost:$port$path#[1-100000000]" 2>"$WORK/transfers.$i" &
        pids+=($!)
    done
    for i in "${pids[@]}"; do
        rc=0
        wait "$i" || rc=$?
        ((rc == 124)) || echo "curl ended before the time was up: exit $rc"
    done
    cat "$WORK"/transfers.* | grep -E '^[0-9]{3} [0-9]+$' | sort | uniq -c
    rm -f "$WORK"/transfers.*
}

# resumptions PORT PATH SECONDS: about SECONDS of requests, each on a new
# connection (Connection: close), HANDSHAKERS at once, each client resuming
# the TLS session of its previous connection; h2load's output on stdout.
# h2load is given a number of requests (with a duration and Connection:
# close, it does not stop): what the last run made in as many seconds.
resumptions() {
    local port=$1 path=$2 seconds=$3 rc=0 pace
    local requests=$((${PACE[$port]:-1000} * seconds))
    timeout -k 5 $((seconds * 10 + 60)) h2load --h1 -H 'Connection: close' -c"$HANDSHAKERS" -t"$CLIENTS" \
        -n$((requests > 10 * HANDSHAKERS ? requests : 10 * HANDSHAKERS)) \
        --connect-to="127.0.0.1:$port" "https://localhost:$port$path" >"$WORK/h2load.out" 2>&1 || rc=$?
    pace=$(awk '/^finished in/ { printf "%d", $4 }' "$WORK/h2load.out")
    PACE[$port]=${pace:-1000}
    cat "$WORK/h2load.out"
    return "$rc"
}

# generate STEP PORT PATH SECONDS: the load of STEP on 127.0.0.1:PORT; the
# load generator's output on stdout.
generate() {
    local step=$1 port=$2 path=$3 seconds=$4 url="https://localhost:$2$3"
    local limit=$((seconds + 60))
    case $step in
        h1) timeout -k 5 "$limit" wrk -t1 -c"$CONNS" -d"${seconds}s" "$url" ;;
        h2) timeout -k 5 "$limit" h2load -c"$CONNS" -m"$STREAMS" -D"$seconds" \
            --connect-to="127.0.0.1:$port" "$url" ;;
        full) handshakes "$port" "$path" "$seconds" ;;
        resumed) resumptions "$port" "$path" "$seconds" ;;
    esac
}

# tally STEP FILE SECONDS: "# key: value" lines of what the load generator's
# output in FILE says: requests, errors (not 2xx, or failed), requests/s.
tally() {
    case $1 in
        h1) awk '
            / requests in / { n = $1 }
            /^Requests\/sec:/ { rate = $2 }
            /Non-2xx or 3xx responses:/ { bad += $NF }
            /Socket errors:/ { gsub(/[^0-9]+/, " "); split($0, e, " "); for (i in e) bad += e[i] }
            END { printf "# requests: %d\n# errors: %d\n# per_second: %.0f\n", n, bad, rate }' "$2" ;;
        h2 | resumed) awk '
            /^TLS Protocol:/ { tls = $3 }
            /^Application protocol:/ { alpn = $3 }
            /^finished in/ { rate = $4 }
            /^requests:/ { n = $6; bad = $10 }
            END {
                printf "# negotiated: %s %s\n", tls, alpn
                printf "# requests: %d\n# errors: %d\n# per_second: %.0f\n", n, bad, rate
            }' "$2" ;;
        full) awk -v seconds="$3" '
            NF == 3 && $1 ~ /^[0-9]+$/ { n += $1; conns += $1 * $3; if ($2 == 200) ok += $1 }
            END {
                printf "# requests: %d\n# errors: %d\n# per_second: %.0f\n", n, n - ok, ok / seconds
                printf "# connections: %d\n# connections_per_request: %.3f\n", conns, n ? conns / n : 0
            }' "$2" ;;
    esac
}

# measure STEP ROUND TARGET PATH: the warm-up, then the measured run, into
# RAW/STEP-rROUND-TARGET-PATH.txt with its figures.
measure() {
    local step=$1 round=$2 target=$3 path=$4 name=${4#/}
    local out=$RAW/$step-r$round-$target-${name:-root}.txt port=${TLS_PORT[$3]}
    local start end cpu_start cpu_end rc=0 TIMEFORMAT='%3U %3S'
    generate "$step" "$port" "$path" "$WARMUP" >/dev/null 2>&1 || true
    # shellcheck disable=SC2086 # WATCH holds a list of PIDs
    cpu_ticks ${WATCH[$target]}
    cpu_start=$((CPU_USER + CPU_SYSTEM))
    start=$EPOCHREALTIME
    { time generate "$step" "$port" "$path" "$DURATION" >"$out" 2>&1; } 2>"$WORK/client_time" || rc=$?
    end=$EPOCHREALTIME
    # shellcheck disable=SC2086
    cpu_ticks ${WATCH[$target]}
    cpu_end=$((CPU_USER + CPU_SYSTEM))
    local seconds proxy client figures
    seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
    proxy=$(awk -v t=$((cpu_end - cpu_start)) -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')
    client=$(awk '{ printf "%.2f", $1 + $2 }' "$WORK/client_time")
    figures=$(tally "$step" "$out" "$seconds")
    {
        echo "# step: $step"
        echo "# target: $target"
        echo "# path: $path"
        echo "# exit: $rc"
        echo "# seconds: $seconds"
        echo "$figures"
        echo "# proxy_cpu_seconds: $proxy"
        echo "# client_cpu_seconds: $client"
        awk -v s="$seconds" -v p="$proxy" -v c="$client" '
            $2 == "requests:" { n = $3 }
            END {
                printf "# proxy_cpu_percent: %.0f\n# client_cpu_percent: %.0f\n", 100 * p / s, 100 * c / s
                printf "# proxy_cpu_us_per_request: %.1f\n", n ? 1e6 * p / n : 0
            }' <<<"$figures"
    } >>"$out"
    [[ $step != h2 ]] || grep -q '^# negotiated: TLSv1.3 h2$' "$out" ||
        die "h2load did not speak HTTP/2 over TLS 1.3 to $target: $(grep '^# negotiated' "$out")"
    [[ $step != resumed ]] || grep -q '^# negotiated: TLSv1.3 http/1.1$' "$out" ||
        die "h2load did not speak HTTP/1.1 over TLS 1.3 to $target: $(grep '^# negotiated' "$out")"
}

rounds() {
    local round step path target
    local -a order=("${TARGETS[@]}")
    for ((round = 1; round <= ROUNDS; round++)); do
        log "round $round/$ROUNDS: ${STEPS[*]}, ${DURATION} s each, first ${order[0]}"
        for step in "${STEPS[@]}"; do
            # shellcheck disable=SC2086 # PATHS holds lists of paths
            for path in ${PATHS[$step]}; do
                for target in "${order[@]}"; do
                    runs "$target" "$step" "$path" || continue
                    measure "$step" "$round" "$target" "$path"
                done
            done
        done
        order=("${order[@]:1}" "${order[0]}") # the other target first next round
    done
}

# ------------------------------------------------------------------ checks

# fetch TARGET PATH CURL_OPTION...: GET over HTTPS, the certificate checked
# against the development CA; the body in WORK/body, curl's trace in
# WORK/trace; prints "HTTP-version status".
fetch() {
    local port=${TLS_PORT[$1]} path=$2
    shift 2
    curl -sv --max-time 5 --cacert "$WORK/tls/ca.pem" --resolve "localhost:$port:127.0.0.1" \
        -o "$WORK/body" -w '%{http_version} %{http_code}' "$@" "https://localhost:$port$path" \
        2>"$WORK/trace" || true
}

check() {
    echo "- $*" >>"$RAW/checks.txt"
    log "ok: $*"
}

check_targets() {
    local target version got tls cache request=$'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n'
    for target in "${TARGETS[@]}"; do
        for version in 1.1 2; do
            got=$(fetch "$target" / --http"$version")
            tls=$(sed -n 's/^\* SSL connection using //p' "$WORK/trace")
            [[ $got == "$version 200" && $(<"$WORK/body") == "Hello World!" && $tls == TLSv1.3* ]] ||
                die "$target: / over HTTP/$version answered '$got' over '$tls': $(head -c 200 "$WORK/body")"
            if [[ $target == floor ]]; then
                check "$target: HTTP/$version over $tls, the certificate verified: / answers Hello World!"
                continue
            fi
            fetch "$target" /cache-me --http"$version" >/dev/null
            got=$(fetch "$target" /cache-me --http"$version")
            cache=$(tr -d '\r' <"$WORK/trace" | awk 'tolower($2) == "x-cache-status:" { print $3 }')
            [[ $got == "$version 200" && $cache == HIT ]] ||
                die "$target: /cache-me repeated over HTTP/$version answered '$got', X-Cache-Status: ${cache:-none}"
            check "$target: HTTP/$version over $tls, the certificate verified: / answers Hello World!, /cache-me repeated is a HIT"
        done
        [[ $target != floor ]] || continue # Pingora's defaults: TLS 1.2 too; not in the handshake steps
        ! curl -sk --max-time 5 --tlsv1.2 --tls-max 1.2 -o /dev/null "https://127.0.0.1:${TLS_PORT[$target]}/" ||
            die "$target accepts TLS 1.2"
        timeout 10 openssl s_client -connect "127.0.0.1:${TLS_PORT[$target]}" -servername localhost -quiet \
            -sess_out "$WORK/session" <<<"$request" >/dev/null 2>&1 || true
        timeout 10 openssl s_client -connect "127.0.0.1:${TLS_PORT[$target]}" -servername localhost \
            -sess_in "$WORK/session" <<<"$request" 2>/dev/null | grep -q '^Reused, TLSv1.3' ||
            die "$target does not resume a TLS 1.3 session (openssl s_client -sess_in)"
        check "$target: refuses TLS 1.2; resumes a TLS 1.3 session (openssl s_client -sess_out, then -sess_in)"
    done
}

# check_generators: what the load generators do, seen by nginx's check
# listener (bench/nginx-tls.conf): its log says, for every request, the
# connection, the request's number on it, the protocol and whether the TLS
# session was resumed.
check_generators() {
    local log=$WORK/nginx/generator.log seen count
    # count: requests, connections, requests not over TLS 1.3, resumed sessions,
    # connections that carried more than one request, requests for another path.
    # shellcheck disable=SC2016 # an awk program
    count='{ n++; if (!($1 in c)) { c[$1]; conns++ } }
        $3 != "TLSv1.3" { old++ } $4 == "r" { resumed++ } $2 > 1 { again++ } $5 != path { other++ }
        END { printf "%d %d %d %d %d %d\n", n, conns, old, resumed, again, other }'

    : >"$log"
    generate h1 "$CHECK_PORT" / 1 >/dev/null 2>&1 || true
    read -r -a seen < <(awk -v path=/ "$count" "$log")
    ((seen[0] > seen[1] && seen[1] <= CONNS && seen[2] == 0)) ||
        die "wrk: ${seen[0]} requests on ${seen[1]} connections, ${seen[2]} not over TLS 1.3 (expected keep-alive and TLS 1.3)"
    check "wrk: ${seen[0]} requests on ${seen[1]} connections, all over TLS 1.3"

    : >"$log"
    generate full "$CHECK_PORT" /cache-me 1 >/dev/null 2>&1 || true
    read -r -a seen < <(awk -v path=/cache-me "$count" "$log")
    ((seen[0] > 0 && seen[0] == seen[1] && seen[2] + seen[3] + seen[4] + seen[5] == 0)) ||
        die "curl without session reuse: ${seen[0]} requests on ${seen[1]} connections, ${seen[3]} resumed, ${seen[5]} for another path than /cache-me"
    check "curl for \`full\`: ${seen[0]} requests on ${seen[1]} connections, every one a full TLS 1.3 handshake"

    : >"$log"
    generate resumed "$CHECK_PORT" /cache-me 1 >/dev/null 2>&1 || true
    read -r -a seen < <(awk -v path=/cache-me "$count" "$log")
    ((seen[0] > 0 && seen[0] == seen[1] && seen[2] + seen[4] + seen[5] == 0 && 10 * seen[3] >= 9 * seen[0])) ||
        die "h2load with Connection: close: ${seen[0]} requests on ${seen[1]} connections, ${seen[3]} resumed (expected 90% or more)"
    check "h2load for \`resumed\`: ${seen[0]} requests on ${seen[1]} connections, ${seen[3]} of them resumed TLS 1.3 sessions (the others: each client's first)"
}

# ------------------------------------------------------------------ report

describe_machine() {
    local cert
    cert=$(openssl x509 -in "$WORK/tls/cert.pem" -noout -text |
        awk -F': *' '/Public Key Algorithm/ { a = $2 } /NIST CURVE/ { c = " " $2 } END { print a c }')
    {
        machine_lines
        echo "nginx's TLS: $(nginx -V 2>&1 | sed -n 's/^built with //p')"
        echo "balancer's TLS: rustls $(awk '$0 == "name = \"rustls\"" { getline; gsub(/[^0-9.]/, ""); print; exit }' "$ROOT/Cargo.lock")"
        echo "wrk: $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }'); h2load: $(h2load --version | awk '{ print $2 }'); curl: $(curl --version | awk 'NR == 1 { print $2, $5 }')"
        echo "certificate: $cert, with its CA (two certificates sent)"
        echo "rounds: $ROUNDS, ${DURATION} s each run after ${WARMUP} s of warm-up"
        echo "note: ${BENCH_NOTE:-}"
    } >"$RAW/machine.txt"
}

# values KEY STEP TARGET PATH: KEY's value in each round of the run.
values() {
    local name=${4#/}
    awk -v k="$1:" '$1 == "#" && $2 == k { print $3 }' "$RAW/$2"-r*-"$3-${name:-root}.txt"
}

# summary: of the numbers on stdin, "median lowest highest".
summary() {
    sort -g | awk '{ v[NR] = $1 }
        END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2), v[1], v[NR] }'
}

median() { summary | awk '{ print $1 }'; }

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }

# table STEP: the figures of STEP, per path and target; "× floor" where the
# floor ran the same step and path.
table() {
    local step=$1 path target rate lo hi nginx_rate us nginx_us floor_rate floor_us extra=""
    local -a figures
    [[ $step == full ]] && extra=" connections per request |"
    echo "| path | target | requests/s | range | × nginx | × floor | proxy CPU | proxy CPU per request | × nginx | × floor | client CPU |$extra errors |"
    echo "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|${extra:+--:|}--:|"
    # shellcheck disable=SC2086
    for path in ${PATHS[$step]}; do
        nginx_rate=$(values per_second "$step" nginx "$path" | median)
        nginx_us=$(values proxy_cpu_us_per_request "$step" nginx "$path" | median)
        floor_rate=0 floor_us=0
        if runs floor "$step" "$path"; then
            floor_rate=$(values per_second "$step" floor "$path" | median)
            floor_us=$(values proxy_cpu_us_per_request "$step" floor "$path" | median)
        fi
        for target in "${TARGETS[@]}"; do
            runs "$target" "$step" "$path" || continue
            read -r rate lo hi < <(values per_second "$step" "$target" "$path" | summary)
            us=$(values proxy_cpu_us_per_request "$step" "$target" "$path" | median)
            figures=(
                "\`$path\`" "$target" "$rate" "$lo–$hi" "$(ratio "$rate" "$nginx_rate")" "$(ratio "$rate" "$floor_rate")"
                "$(values proxy_cpu_percent "$step" "$target" "$path" | median) %"
                "$us µs" "$(ratio "$us" "$nginx_us")" "$(ratio "$us" "$floor_us")"
                "$(values client_cpu_percent "$step" "$target" "$path" | median) %"
            )
            [[ -z $extra ]] || figures+=("$(values connections_per_request "$step" "$target" "$path" | median)")
            figures+=("$(values errors "$step" "$target" "$path" | awk '{ s += $1 } END { print s + 0 }')")
            printf '| %s ' "${figures[@]}"
            echo "|"
        done
    done
}

report() {
    echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RAW/machine.txt"
    {
        echo "# HTTPS: the balancer, its floor and nginx, one interleaved run"
        echo
        [[ -z ${BENCH_NOTE:-} ]] || { echo "*$BENCH_NOTE*"; echo; }
        echo "Written by \`bench/tls.sh\` (see bench/README.md). Rounds: $ROUNDS; in each, every step and path"
        echo "ran on every target back to back (the first target turning), ${DURATION} s after ${WARMUP} s of"
        echo "the same load. Every proxy: one worker/thread, the same certificate, the same backend"
        echo "process (\`--workers 1\`); the balancer and nginx TLS 1.3 only, the floor (\`bench/floor\`:"
        echo "the smallest Pingora proxy forwarding as the balancer does, with Pingora's own TLS"
        echo "settings) on \`/\` in steps 1 and 2 only, as it has no cache. Figures are medians over the rounds; *range* is"
        echo "the lowest and highest requests/s; *proxy CPU* is the CPU time of the proxy's processes"
        echo "over the run's wall time (100 % = one core), *client CPU* the same for the load generator;"
        echo "*errors* are summed over the rounds."
        echo
        echo "## 1. HTTP/1.1 over TLS 1.3, keep-alive (\`wrk -t1 -c$CONNS\`)"
        echo
        table h1
        echo
        echo "## 2. HTTP/2 over TLS 1.3, ALPN h2 (\`h2load -c$CONNS -m$STREAMS\`)"
        echo
        table h2
        echo
        echo "## 3. A new connection and a full TLS 1.3 handshake per request"
        echo
        echo "curl ($CLIENTS processes), $HANDSHAKERS transfers at once, HTTP/1.1 with \`Connection: close\`, \`--no-sessionid\`:"
        echo "requests/s here is handshakes/s. *connections per request* is curl's count of the"
        echo "connections it opened (\`%{num_connects}\`) over the requests."
        echo
        table full
        echo
        echo "## 4. A new connection per request, resuming a TLS 1.3 session"
        echo
        echo "\`h2load --h1 -c$HANDSHAKERS -t$CLIENTS\` with \`Connection: close\`: each client's connection resumes the TLS"
        echo "session of its previous one (PSK with a new X25519 exchange; no certificate sent or"
        echo "signed); requests/s here is resumed handshakes/s."
        echo
        table resumed
        echo
        echo "## Checks made before measuring"
        echo
        cat "$RAW/checks.txt"
        echo
        echo "## Machine"
        echo
        sed 's/^/- /' "$RAW/machine.txt"
    } >"$REPORT"
    log "wrote $REPORT and $RAW/"
}

install_tools() {
    local -a missing=()
    command -v wrk >/dev/null || missing+=(wrk)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
    command -v openssl >/dev/null || missing+=(openssl)
    install_missing "${missing[@]}"
}

main() {
    install_tools
    build
    rm -rf "$RAW"
    mkdir -p "$RAW"
    rm -f "$REPORT"
    open_work_dir
    start_servers
    describe_machine
    : >"$RAW/checks.txt"
    check_targets
    check_generators
    rounds
    stop_all
    report
}

main "$@"
