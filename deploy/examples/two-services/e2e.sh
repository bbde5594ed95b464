#!/usr/bin/env bash
# End-to-end test of the two-services example: the balancer on port 8080 in
# front of `backend` and `api` (two services of the demo image), with
# balancer.toml's route sending /api/... to `api` with /api stripped.
#
#   deploy/examples/two-services/e2e.sh
#
# Needs a running Docker engine, `docker compose` or `docker-compose`, curl,
# python3 and a free port 8080. Builds the images only when they are missing
# (deploy/e2e.sh, run before this one, builds them); E2E_BUILD=1 builds anyway.
# Every wait is bounded; the stack is taken down on exit, whatever happens.
# The last line is `N passed, M failed`; the exit status is 0 only when every
# step passed. A failed step ends the run after printing the state of the stack.
set -euo pipefail
shopt -s inherit_errexit

DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=pingora-lb-example
URL=http://localhost:8080
if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
else
    COMPOSE_CMD=(docker-compose)
fi
COMPOSE=("${COMPOSE_CMD[@]}" -f "$DIR/compose.yaml" -p "$PROJECT")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pingora-lb-example.XXXXXX")
PASSED=0
FAILED=0

say() { printf '    %s\n' "$*"; }
fail() { printf '    FAIL: %s\n' "$*" >&2; return 1; }
compose() { "${COMPOSE[@]}" "$@"; }

cleanup() {
    local rc=$?
    compose down -v --remove-orphans --timeout 10 >"$WORK/cleanup.log" 2>&1 ||
        cat "$WORK/cleanup.log" >&2
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one step in a subshell with errexit on; stops the run at a failure.
step() {
    local title=$1 started=$SECONDS rc
    shift
    printf '==> step %d: %s\n' $((PASSED + FAILED + 1)) "$title"
    set +e
    (
        set -e
        "$@"
    )
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf '    ok (%d s)\n' $((SECONDS - started))
        return 0
    fi
    FAILED=$((FAILED + 1))
    printf '    FAILED (%d s)\n' $((SECONDS - started))
    echo "--- state of the stack ---"
    project_ps -a --format '{{.Names}}\t{{.Status}}' || true
    local id
    for id in $(service_ids balancer -a); do
        echo "--- last lines of the balancer's log ---"
        docker logs --tail 30 "$id" 2>&1 || true
    done
    finish
}

finish() {
    printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
    [ "$FAILED" -eq 0 ] && exit 0
    exit 1
}

project_ps() { docker ps --filter "label=com.docker.compose.project=$PROJECT" "$@"; }
# The short ids (= HOSTNAME = /info's container_id) of service $1's containers.
service_ids() { project_ps -q --filter "label=com.docker.compose.service=$1" "${@:2}"; }

# Waits until exactly $1 containers of the project run, all healthy.
wait_healthy() {
    local want=$1 deadline=$((SECONDS + $2)) running healthy
    while :; do
        running=$(project_ps -q | wc -l)
        healthy=$(project_ps -q --filter health=healthy | wc -l)
        if [ "$running" -eq "$want" ] && [ "$healthy" -eq "$want" ]; then
            project_ps --format '{{.Names}}\t{{.Status}}' | sort | sed 's/^/    /'
            return 0
        fi
        [ "$SECONDS" -lt "$deadline" ] ||
            fail "$healthy of $running running containers healthy after $2 s; wanted $want of $want"
        sleep 1
    done
}

# GET $URL$1: the body on stdout; fails unless the answer is 200.
get() {
    local code
    code=$(curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 "$URL$1" || true)
    [ "$code" = 200 ] || fail "GET $1 answered $code: $(head -c 200 "$WORK/body" 2>/dev/null)"
    cat "$WORK/body"
}

container_id() { python3 -c 'import json, sys; print(json.load(sys.stdin)["container_id"])'; }

# GET $1 (an /info) $3 times: every answer must come from a container of
# service $2; prints the distinct container ids seen, one a line.
ids_behind() {
    local path=$1 service=$2 n=$3 ids i id
    ids=$(service_ids "$service")
    for ((i = 0; i < n; i++)); do
        id=$(get "$path" | container_id)
        grep -qx "$id" <<<"$ids" ||
            fail "GET $path was answered by $id, not by a '$service' container ($(echo $ids))"
        echo "$id"
    done | sort -u
}

balancer_identity() {
    docker inspect --format '{{.Id}} started={{.State.StartedAt}} restarts={{.RestartCount}}' \
        "$(service_ids balancer)"
}

# --- the steps ----------------------------------------------------------------

step_prerequisites() {
    local cmd
    for cmd in docker curl python3; do
        command -v "$cmd" >/dev/null || fail "'$cmd' is not installed"
    done
    docker info >/dev/null 2>&1 || fail "the Docker engine does not answer"
    compose config -q || fail "${COMPOSE_CMD[*]} cannot read compose.yaml"
    say "compose: ${COMPOSE_CMD[*]} $("${COMPOSE_CMD[@]}" version --short 2>/dev/null || true)"
    # Leftovers of an interrupted run of this very project would hold port 8080.
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    if (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null; then
        fail "port 8080 of this machine is in use"
    fi
    say "port 8080 is free"
}

step_images() {
    local image missing=0
    for image in pingora-lb/balancer:latest pingora-lb/backend:latest; do
        docker image inspect "$image" >/dev/null 2>&1 || missing=1
    done
    if [ "$missing" -eq 1 ] || [ "${E2E_BUILD:-0}" = 1 ]; then
        compose build || fail "the image build failed (see deploy/local-images.sh in the README)"
    else
        say "both images exist (E2E_BUILD=1 rebuilds them)"
    fi
}

step_up() {
    compose up -d
    wait_healthy 3 120
}

step_default_route() {
    local body ids
    body=$(get /)
    [ "$body" = "Hello World!" ] || fail "GET / answered '$body'"
    say "GET / -> $body"
    ids=$(ids_behind /info backend 5)
    say "GET /info x5 -> backend container $(echo $ids)"
}

step_api_route() {
    local body ids
    body=$(get /api/)
    [ "$body" = "Hello World!" ] || fail "GET /api/ answered '$body'"
    say "GET /api/ -> $body"
    # /info is the backend's only JSON answer: a 200 proves /api was stripped.
    ids=$(ids_behind /api/info api 5)
    say "GET /api/info x5 -> api container $(echo $ids)"
}

step_scale_api() {
    local before after ids deadline=$((SECONDS + 60))
    before=$(balancer_identity)
    compose up -d --scale api=3
    wait_healthy 5 120
    # The balancer needs a resolve and two health checks to take in a replica.
    while :; do
        ids=$(ids_behind /api/info api 30)
        [ "$(grep -c . <<<"$ids")" -eq 3 ] && break
        [ "$SECONDS" -lt "$deadline" ] ||
            fail "30 requests to /api/info saw only $(echo $ids) after 60 s; wanted 3 api containers"
        sleep 1
    done
    say "30 x GET /api/info -> 3 api containers: $(echo $ids)"
    ids=$(ids_behind /info backend 10)
    say "10 x GET /info -> still only backend $(echo $ids)"
    after=$(balancer_identity)
    [ "$before" = "$after" ] || fail "the balancer was recreated or restarted: $before -> $after"
    say "same balancer, never restarted"
}

step_down() {
    compose down -v --remove-orphans --timeout 10
    local left
    left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    left+=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    left+=$(docker network ls --format '{{.Name}}' | grep -E "^${PROJECT}_" || true)
    left+=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$left" ] || fail "left after down: $left"
    say "no container, network or volume of project $PROJECT is left"
}

started=$SECONDS
step "prerequisites and a free port 8080" step_prerequisites
step "images pingora-lb/balancer and pingora-lb/backend" step_images
step "up -d: balancer, backend and api, all healthy" step_up
step "GET / and /info reach a backend container" step_default_route
step "GET /api/ and /api/info reach an api container, /api stripped" step_api_route
step "--scale api=3: three api containers within 30 requests, same balancer" step_scale_api
step "down leaves no container, network or volume" step_down
say "total $((SECONDS - started)) s"
finish
