#!/usr/bin/env bash
# End-to-end test of deploy/swarm/stack.yaml on a single-node swarm: deploys
# the stack from the images compose.yaml builds, checks curl through the
# published port, that every backend task gets requests, that scaling the
# backend up and down is followed without restarting the balancer, that a new
# balancer config rolls out, that the balancer itself is rolled over under
# load with no failed request (stack.hostnet.yaml, on port 8080), then
# removes the stacks and leaves the swarm (when this script made it). Every
# wait is bounded; the last line is `N passed, M failed`. Needs a Docker
# engine, the images (BALANCER_IMAGE and BACKEND_IMAGE name others), curl
# and ports 80, 8080 and 8000 (the host-network stack's balancers and backend).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
STACK=${E2E_STACK:-lbe2e}
URL=${E2E_URL:-http://localhost}
HOSTNET_URL=${E2E_HOSTNET_URL:-http://localhost:8080}
BALANCER_IMAGE=${BALANCER_IMAGE:-pingora-lb/balancer:latest}
BACKEND_IMAGE=${BACKEND_IMAGE:-pingora-lb/backend:latest}
# The checks run in child shells (within bash -c); the stack files read the images.
export URL HOSTNET_URL STACK BALANCER_IMAGE BACKEND_IMAGE
work=$(mktemp -d)
passed=0
failed=0

say() { printf '    %s\n' "$*"; }
cleanup() {
    local rc=$?
    [ -f "$work/loops" ] && kill $(cat "$work/loops") 2>/dev/null
    docker stack rm "$STACK" "${STACK}h" >/dev/null 2>&1 || true
    for _ in $(seq 60); do
        [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ] \
            && [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=${STACK}h")" ] && break
        sleep 1
    done
    docker config rm "${STACK}_toml_v2" >/dev/null 2>&1 || true
    docker config rm lb_balancer_toml_v1 lb_balancer_hostnet_toml_v1 >/dev/null 2>&1 || true
    # A file, not a variable: steps run in subshells.
    if [ -f "$work/made-swarm" ]; then
        docker swarm leave --force >/dev/null 2>&1 && echo "left the swarm this test made"
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

step() {
    local title=$1; shift
    echo "--- $title"
    if ( set -euo pipefail; "$@" ); then
        passed=$((passed + 1)); echo "    ok"
    else
        failed=$((failed + 1)); echo "    FAILED: $title"
        docker service ls >&2 || true
        docker service logs --tail 30 "${STACK}_balancer" >&2 || true
        echo "$passed passed, $failed failed"
        exit 1
    fi
}

# Polls "$@" once a second for up to $1 seconds.
within() {
    local seconds=$1; shift
    for _ in $(seq "$seconds"); do
        if "$@"; then return 0; fi
        sleep 1
    done
    "$@"
}

ids_seen() {  # ids_seen N: distinct container ids in N requests of /info
    for _ in $(seq "$1"); do
        curl -sf --max-time 5 "$URL/info" | python3 -c 'import json,sys; print(json.load(sys.stdin)["container_id"])'
    done | sort -u | wc -l
}
balancer_container() {
    docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_balancer"
}

# A request loop in the background: one line per failed request in $work/failures.
start_loop() {
    : > "$work/failures"
    ( end=$((SECONDS + $1))
      while [ $SECONDS -lt $end ]; do
          curl -sf --max-time 5 -o /dev/null "$URL/info" || echo "failed at $SECONDS s" >> "$work/failures"
      done ) &
    loop_pid=$!
}

step_swarm() {
    if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
        docker swarm init --advertise-addr 127.0.0.1 >/dev/null 2>&1 || docker swarm init >/dev/null
        touch "$work/made-swarm"
    fi
    docker image inspect "$BALANCER_IMAGE" "$BACKEND_IMAGE" >/dev/null
}

step_deploy() {
    docker stack deploy -c "$here/stack.yaml" "$STACK" >/dev/null
    within 120 bash -c "curl -sf --max-time 3 '$URL/' | grep -qx 'Hello World!'"
    say "$(curl -s "$URL/")"
}

step_every_task() {
    within 60 bash -c "[ \$(docker service ps -q --filter desired-state=running ${STACK}_backend | wc -l) -eq 3 ]"
    within 60 bash -c "$(declare -f ids_seen); [ \$(ids_seen 30) -eq 3 ]"
    say "3 backend tasks answered /info"
}

step_scale() {
    local before after
    before=$(balancer_container)
    start_loop 60
    docker service scale -d "${STACK}_backend=5" >/dev/null
    within 90 bash -c "$(declare -f ids_seen); [ \$(ids_seen 40) -eq 5 ]"
    say "scaled up: 5 backend tasks answered"
    docker service scale -d "${STACK}_backend=2" >/dev/null
    within 90 bash -c "$(declare -f ids_seen); [ \$(ids_seen 30) -eq 2 ]"
    say "scaled down: 2 backend tasks answered"
    kill "$loop_pid" 2>/dev/null || true
    wait "$loop_pid" 2>/dev/null || true
    after=$(balancer_container)
    [ -n "$before" ] && [ "$before" = "$after" ] || { say "the balancer container changed: $before -> $after"; return 1; }
    say "the balancer was not restarted ($after)"
    if [ -s "$work/failures" ]; then say "failed requests: $(wc -l < "$work/failures")"; return 1; fi
    say "no request failed while scaling"
}

step_config_update() {
    # A new config that also caches /info: the header shows it is in force.
    sed 's|^\[\[cache.rule\]\]$|[[cache.rule]]\npath = "/info"\nttl = "5s"\n\n[[cache.rule]]|' \
        "$here/balancer.toml" > "$work/balancer-v2.toml"
    grep -q '"/info"' "$work/balancer-v2.toml"
    docker config create "${STACK}_toml_v2" "$work/balancer-v2.toml" >/dev/null
    docker service update -d \
        --config-rm lb_balancer_toml_v1 \
        --config-add "source=${STACK}_toml_v2,target=/etc/balancer/balancer.toml" \
        "${STACK}_balancer" >/dev/null
    within 120 bash -c "curl -si --max-time 3 '$URL/info' | grep -qi '^x-cache-status:'"
    say "the rolled-out config caches /info"
}

hostnet_balancers() {  # the ids of the running, healthy balancer containers of stack.hostnet.yaml
    docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}h_balancer" --filter health=healthy | sort
}

# Request loops until $work/stop exists, one line per request in $work/rolling:
# two open a new connection per request, one keeps its connection (curl reuses
# it across the URLs of one command; a reused connection the server closed is
# retried on a new one, as every HTTP client does).
start_rolling_loops() {
    : > "$work/rolling"; rm -f "$work/stop"
    local pids=()
    for _ in 1 2; do
        ( while [ ! -f "$work/stop" ]; do
              curl -s --max-time 10 -o /dev/null -w 'new %{http_code} %{time_total} %{errormsg}\n' "$HOSTNET_URL/info" >> "$work/rolling"
          done ) & pids+=($!)
    done
    ( args=(); for _ in $(seq 50); do args+=(-o /dev/null "$HOSTNET_URL/info"); done
      while [ ! -f "$work/stop" ]; do
          curl -s --max-time 60 -w 'kept %{http_code} %{num_connects} %{errormsg}\n' "${args[@]}" >> "$work/rolling"
      done ) & pids+=($!)
    echo "${pids[*]}" > "$work/loops"
}

step_rolling_update() {
    # As the README says for a host-network rollover: the old task's listener
    # hands what is queued at its close to the new one (the balancer, not
    # root in its container, may not be able to stop completing connections).
    migrate_req=$(cat /proc/sys/net/ipv4/tcp_migrate_req 2>/dev/null || true)
    if [ -n "$migrate_req" ] && (echo 1 > /proc/sys/net/ipv4/tcp_migrate_req) 2>/dev/null; then
        say "net.ipv4.tcp_migrate_req = 1 on the host for this step (was $migrate_req)"
    else
        say "net.ipv4.tcp_migrate_req could not be set (not root, or a kernel before 5.14)"
        migrate_req=
    fi
    local status=0
    rolling_update || status=$?
    [ -z "$migrate_req" ] || echo "$migrate_req" > /proc/sys/net/ipv4/tcp_migrate_req
    return $status
}

rolling_update() {
    docker stack deploy -c "$here/stack.hostnet.yaml" "${STACK}h" >/dev/null
    within 120 bash -c "$(declare -f hostnet_balancers); [ \$(hostnet_balancers | wc -l) -eq 2 ]"
    within 60 bash -c "curl -sf --max-time 3 '$HOSTNET_URL/' | grep -qx 'Hello World!'"
    local before after total failed kept reused slowest
    before=$(hostnet_balancers)
    start_rolling_loops
    within 30 bash -c "[ \$(wc -l < '$work/rolling') -ge 100 ]"
    local started=$SECONDS
    docker service update --force --quiet "${STACK}h_balancer" >/dev/null
    # The last old task drains after the update is reported done.
    within 60 bash -c "$(declare -f hostnet_balancers); [ \$(docker ps -q --filter label=com.docker.swarm.service.name=${STACK}h_balancer | wc -l) -eq 2 ] && [ \$(hostnet_balancers | wc -l) -eq 2 ]"
    local took=$((SECONDS - started))
    sleep 2   # a last stretch on the new tasks alone
    touch "$work/stop"
    wait $(cat "$work/loops") 2>/dev/null || true
    rm -f "$work/loops"
    after=$(hostnet_balancers)
    if [ -n "$(comm -12 <(echo "$before") <(echo "$after"))" ]; then
        say "a balancer task was not replaced: $before -> $after"; return 1
    fi
    total=$(wc -l < "$work/rolling")
    failed=$(grep -cv '^[a-z]* 200 ' "$work/rolling" || true)
    kept=$(grep -c '^kept ' "$work/rolling" || true)
    reused=$(grep -c '^kept 200 0 ' "$work/rolling" || true)
    slowest=$(awk '$1 == "new" && $3 > max { max = $3 } END { print max + 0 }' "$work/rolling")
    say "both balancer tasks replaced start-first in ${took}s under load: $total requests ($kept on a kept-alive loop, $reused of them on a reused connection), $failed failed; the slowest new connection took ${slowest}s"
    if [ "$failed" -ne 0 ]; then grep -v '^[a-z]* 200 ' "$work/rolling" | head -20 >&2; return 1; fi
}

step_remove() {
    docker stack rm "$STACK" "${STACK}h" >/dev/null
    within 60 bash -c "[ -z \"\$(docker ps -aq --filter label=com.docker.stack.namespace=$STACK)\" ] && [ -z \"\$(docker ps -aq --filter label=com.docker.stack.namespace=${STACK}h)\" ]"
    say "no container of the stack is left"
}

step "swarm and images" step_swarm
step "stack deploy, curl through the published port" step_deploy
step "requests reach every backend task" step_every_task
step "scale up and down under load, balancer not restarted" step_scale
step "a balancer config update rolls out" step_config_update
step "the balancer rolled over (start-first, host network) under load, nothing fails" step_rolling_update
step "stack removed" step_remove
echo "$passed passed, $failed failed"
