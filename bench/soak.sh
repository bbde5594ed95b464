#!/usr/bin/env bash
# Soak run (not part of CI): SOAK_SECONDS (default 600) of mixed traffic through
# the balancer while its backends are killed and restarted on a schedule.
# Reports requests, failures and the balancer's memory over time into
# bench/results/soak.md. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${SOAK_SECONDS:-600}
kill_every=${SOAK_KILL_EVERY:-30}
out=bench/results
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    pkill -f "backend --listen 127.0.0.1:1910" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release -p balancer -p backend

ports=(19101 19102 19103)
start_backend() {
    target/release/backend --listen "127.0.0.1:$1" --workers 1 >/dev/null 2>&1 &
    echo $! > "$work/backend-$1.pid"
}
for p in "${ports[@]}"; do start_backend "$p"; done

cat > "$work/balancer.toml" <<TOML
listen = "127.0.0.1:19080"
admin_listen = "127.0.0.1:19090"
threads = 1
[upstream]
servers = ["127.0.0.1:19101", "127.0.0.1:19102", "127.0.0.1:19103"]
connect_timeout = "1s"
read_timeout = "10s"
[upstream.health_check]
interval = "1s"
timeout = "500ms"
[cache]
[[cache.rule]]
path = "/cache-me"
ttl = "2s"
stale_while_revalidate = "2s"
stale_if_error = "1m"
TOML
RUST_LOG=warn target/release/balancer --config "$work/balancer.toml" >"$work/balancer.log" 2>&1 &
lb=$!
pids+=("$lb")
for _ in $(seq 100); do curl -sf http://127.0.0.1:19080/ >/dev/null && break; sleep 0.1; done

rss() { awk '/VmRSS/ {print $2}' "/proc/$lb/status"; }
wrk -t1 -c16 -d5s http://127.0.0.1:19080/ >/dev/null   # warm-up
rss_start=$(rss)
echo "elapsed_s,rss_kib" > "$out/soak-rss.csv"

wrk -t2 -c32 -d"${seconds}s" --timeout 10s -s bench/soak.lua http://127.0.0.1:19080 > "$work/wrk.txt" 2>&1 &
load=$!
pids+=("$load")

kills=0
started=$(date +%s)
while kill -0 "$load" 2>/dev/null; do
    sleep "$kill_every" || true
    now=$(( $(date +%s) - started ))
    echo "$now,$(rss)" >> "$out/soak-rss.csv"
    (( now + 15 >= seconds )) && continue
    victim=${ports[$(( kills % ${#ports[@]} ))]}
    kill -9 "$(cat "$work/backend-$victim.pid")" 2>/dev/null || true
    kills=$((kills + 1))
    sleep 10
    start_backend "$victim"
done
wait "$load" || true
rss_end=$(rss)

requests=$(awk '/requests in/ {print $1}' "$work/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt"); non2xx=${non2xx:-0}
socket=$(awk '/Socket errors/ {print}' "$work/wrk.txt"); socket=${socket:-"Socket errors: none"}
rate=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
{
    echo "# Soak run"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) vCPU ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), loopback."
    echo "${seconds} s of mixed traffic (wrk, 2 threads, 32 connections; /, /info, /cache-me, /cache-me?v=2) through"
    echo "the release balancer (1 thread) to 3 backends (1 worker each); every ${kill_every} s one backend was"
    echo "killed with SIGKILL and restarted 10 s later (${kills} kills)."
    echo
    echo "| requests | requests/s | non-2xx responses | socket errors | balancer RSS at start | at end |"
    echo "|---|---|---|---|---|---|"
    echo "| $requests | $rate | $non2xx | ${socket#Socket errors: } | $((rss_start / 1024)) MiB | $((rss_end / 1024)) MiB |"
    echo
    echo "RSS over time (KiB) is in soak-rss.csv."
} > "$out/soak.md"
cat "$out/soak.md"
