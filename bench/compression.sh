#!/usr/bin/env bash
# Response compression: the balancer's [compression] with gzip at level 1
# against nginx's `gzip on; gzip_comp_level 1`, one interleaved run, on a
# 10 KiB JSON body served by a static origin (a third nginx process, the
# same for both proxies), proxied each time (/data.json) and from each
# proxy's cache (/cached/data.json: both store it uncompressed and gzip it
# per hit). `wrk -t1 -c64` with `Accept-Encoding: gzip`; the report gives
# requests/s and the proxy's CPU time per request, medians and ranges over
# the rounds.
#
#   bench/compression.sh [-o REPORT]
#
# Environment: CZ_ROUNDS (5), CZ_DURATION (5 s), CZ_ACCEPT (the requests'
# Accept-Encoding, default gzip; identity measures the same paths with
# nothing compressed), BENCH_PORT_BASE (19600), BENCH_SKIP_BUILD (1: use
# target/release as it is).
set -euo pipefail

PORT_BASE=${BENCH_PORT_BASE:-19600}
RAW=$(cd "$(dirname "$0")" && pwd)/results/raw
# shellcheck source=bench/servers.sh
source "$(dirname "$0")/servers.sh"
report_file compression "$@"
ROUNDS=${CZ_ROUNDS:-5}
DURATION=${CZ_DURATION:-5}
PATHS=(/data.json /cached/data.json)

build
open_work_dir

# The origin: nginx serving the file, static, on the port the proxies' configurations call the backend's.
BACKEND_PORT=$((PORT_BASE + 5))
ORIGIN=$WORK/origin
mkdir -p "$ORIGIN/www/cached"
"$PY" - "$ORIGIN/www/data.json" <<'PY'
import json, sys
items = [{"id": i, "name": f"item {i}", "tags": ["one", "two", "three"], "price": i * 1.25, "in_stock": i % 3 != 0} for i in range(200)]
text = json.dumps(items)
while len(text) > 10 * 1024:
    items.pop()
    text = json.dumps(items)
open(sys.argv[1], "w").write(text)
PY
cp "$ORIGIN/www/data.json" "$ORIGIN/www/cached/data.json"
cat >"$ORIGIN/nginx.conf" <<CONF
worker_processes 1;
user $(id -un) $(id -gn);
pid $ORIGIN/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    types { application/json json; }
    server {
        listen 127.0.0.1:$BACKEND_PORT backlog=4096;
        root $ORIGIN/www;
        location /cached/ { add_header Cache-Control "max-age=300"; }
    }
}
CONF
nginx -p "$ORIGIN" -c "$ORIGIN/nginx.conf" -e "$ORIGIN/error.log" -g 'daemon off;' >"$ORIGIN/out.log" 2>&1 &
AUX_PIDS+=($!)
for _ in $(seq 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$BACKEND_PORT/data.json") == 200 ]] && break
    sleep 0.1
done
[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$BACKEND_PORT/data.json") == 200 ]] ||
    die "the origin does not serve /data.json: $(tail -n 5 "$ORIGIN/error.log")"

balancer_gzip1() {
    cat >>"$1" <<'TOML'

[[cache.rule]]
path = "/cached/"

[compression]
algorithms = ["gzip"]
levels = { gzip = 1 }
TOML
}
nginx_gzip1() {
    sed -i -e 's|^    access_log off;|    access_log off;\n    gzip on;\n    gzip_comp_level 1;\n    gzip_types application/json;\n    gzip_min_length 1024;\n    gzip_vary on;|' \
        -e 's|^        location / {|        location /cached/ {\n            proxy_pass http://backend;\n            proxy_cache bench_cache;\n        }\n\n        location / {|' "$1"
}
start_proxy balancer balancer_gzip1
wait_ready balancer
start_proxy nginx nginx_gzip1
wait_ready nginx
TARGETS=(balancer nginx)
for t in "${TARGETS[@]}"; do
    for path in "${PATHS[@]}"; do
        encoding=$(curl -s -o /dev/null -D - -H 'Accept-Encoding: gzip' "http://127.0.0.1:${PORT[$t]}$path" | tr -d '\r' | awk -F': ' 'tolower($1) == "content-encoding" { print $2 }')
        [[ $encoding == gzip ]] || die "$t $path is not gzipped (content-encoding: ${encoding:-none})"
    done
done
SIZE=$(stat -c %s "$ORIGIN/www/data.json")
GZIPPED=$(curl -s -H 'Accept-Encoding: gzip' "http://127.0.0.1:${PORT[balancer]}/data.json" | wc -c)

declare -A RESULTS CPU
for ((round = 1; round <= ROUNDS; round++)); do
    for path in "${PATHS[@]}"; do
        for t in "${TARGETS[@]}"; do
            wrk_measured "$DURATION" "http://127.0.0.1:${PORT[$t]}$path" "${WATCH[$t]}" -H "Accept-Encoding: ${CZ_ACCEPT:-gzip}"
            RESULTS["$t $path"]+="$RPS "
            CPU["$t $path"]+="$CPU_US "
            log "round $round $path $t: $RPS req/s, $CPU_US µs of CPU per request"
        done
    done
done

{
    echo "# Compression: balancer (gzip level 1) against nginx (gzip_comp_level 1), one interleaved run"
    echo
    echo "$ROUNDS rounds of wrk -t1 -c64 -d${DURATION}s with Accept-Encoding: ${CZ_ACCEPT:-gzip} per path and proxy; a $SIZE-byte JSON body ($GZIPPED bytes gzipped) from a static nginx origin; one proxy worker or thread; $(nproc) cores; load before: $(cut -d' ' -f1-3 /proc/loadavg); nginx $(nginx -v 2>&1 | sed 's|.*/||')."
    echo
    rps_cpu_table proxy nginx "${TARGETS[@]}"
} >"$REPORT"
cat "$REPORT"
