#!/usr/bin/env bash
# What a single-instance `docker compose up -d` of a new balancer costs: one
# balancer and one backend as compose.yaml runs them (on port $PORT, project
# gap27), a loop of requests on new connections, then the balancer container
# recreated (`up -d --force-recreate balancer`, what a new image or changed
# service does). Prints the failed requests and the gap: from the first
# failed request to the last one. Needs Docker, docker-compose (or the
# compose plugin), curl and the images.
#
#   bench/compose-gap.sh                  # 3 rounds
#   ROUNDS=5 PORT=18090 bench/compose-gap.sh
#   TOML=path/to/balancer.toml              # instead of deploy/balancer.toml
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PORT=${PORT:-18090}
ROUNDS=${ROUNDS:-3}
BALANCER_IMAGE=${BALANCER_IMAGE:-pingora-lb/balancer:latest}
BACKEND_IMAGE=${BACKEND_IMAGE:-pingora-lb/backend:latest}
compose=(docker-compose)
docker compose version >/dev/null 2>&1 && compose=(docker compose)
work=$(mktemp -d)
cp "${TOML:-$repo/deploy/balancer.toml}" "$work/balancer.toml"
chmod a+rx "$work"; chmod a+r "$work/balancer.toml"   # read by the image's user
cat > "$work/compose.yaml" <<EOF
services:
  balancer:
    image: $BALANCER_IMAGE
    command: ["--config", "/etc/balancer/balancer.toml"]
    volumes: ["$work:/etc/balancer:ro"]
    ports: ["127.0.0.1:$PORT:80"]
    sysctls: {net.ipv4.ip_unprivileged_port_start: 0}
    stop_grace_period: 10s
  backend:
    image: $BACKEND_IMAGE
    command: ["--listen", "0.0.0.0:8000"]
EOF
dc() { "${compose[@]}" -p gap27 -f "$work/compose.yaml" "$@"; }
cleanup() { dc down -t 10 >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

dc up -d >/dev/null 2>&1
up() { curl -sf --max-time 2 "http://127.0.0.1:$PORT/" >/dev/null; }
for _ in $(seq 60); do up && break; sleep 1; done
up || { echo "the balancer did not answer on port $PORT" >&2; dc logs --tail 20 >&2; exit 1; }

for round in $(seq "$ROUNDS"); do
    log=$work/round$round
    : > "$log"
    ( end=$((SECONDS + 20))
      while [ $SECONDS -lt $end ]; do
          code=$(curl -s --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/" || true)
          echo "$(date +%s.%N) $code" >> "$log"
      done ) &
    loop=$!
    sleep 3
    started=$(date +%s.%N)
    dc up -d --force-recreate balancer >/dev/null 2>&1
    done_at=$(date +%s.%N)
    wait "$loop"
    python3 - "$log" "$started" "$done_at" "$round" <<'PY'
import sys
lines = [l.split() for l in open(sys.argv[1]) if l.strip()]
started, done_at, round_ = float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
failed = [float(t) for t, code in lines if code != "200"]
gap = (failed[-1] - failed[0]) if failed else 0.0
print(f"round {round_}: {len(lines)} requests, {len(failed)} failed, gap {gap:.2f} s "
      f"(up -d took {done_at - started:.2f} s)")
PY
done
