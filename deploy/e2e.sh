#!/usr/bin/env bash
# End-to-end test of the compose deployment: builds both images from
# deploy/Dockerfile through compose, runs the stack on port 80 of this machine,
# and checks what a user would see: health, answers, scaling while requests
# flow, a backend stopped under load, and a clean `down`.
#
#   deploy/e2e.sh
#
# Needs a running Docker engine, `docker compose` or `docker-compose`, curl,
# python3, and a free port 80. Every wait is bounded; the stack is taken down
# on exit, whatever happens. The last line is `N passed, M failed`; the exit
# status is 0 only when every step passed. A failed step ends the run (the
# later ones build on it) after printing the state of the stack.
#
# The test never writes into the checkout: the balancer's configuration and
# certificates are a copy of deploy/'s TOML files in a temporary directory,
# mounted over /etc/balancer by an override file of the test's own, so that
# the user's deploy/ (their certificates in deploy/tls/ included) is left
# exactly as it was.
#
# Environment:
#   E2E_PROJECT   compose project name (default pingora-lb-e2e)
#   E2E_URL       where the balancer answers (default http://localhost)
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROJECT=${E2E_PROJECT:-pingora-lb-e2e}
URL=${E2E_URL:-http://localhost}
INFO_KEYS=(connecting_ip container_id host proxy_ip user-agent)
ADMIN=http://127.0.0.1:9000
# compose.yaml passes it to the balancer: PURGE on the admin port needs it.
export BALANCER_ADMIN_TOKEN=e2e-$RANDOM$RANDOM

if docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
else
    COMPOSE_CMD=(docker-compose)
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pingora-lb-e2e.XXXXXX")
# What the containers mount on /etc/balancer: the shipped TOML files, copied.
# The balancer runs as a non-root user, so the copy is world-readable.
CONFIG_DIR=$WORK/etc-balancer
mkdir -p "$CONFIG_DIR/tls"
cp "$REPO"/deploy/*.toml "$CONFIG_DIR/"
# And the Lua script balancer.toml names (the quick start's /hello).
cp -r "$REPO/deploy/scripts" "$CONFIG_DIR/scripts"
chmod 755 "$WORK" "$CONFIG_DIR" "$CONFIG_DIR/tls" "$CONFIG_DIR/scripts"
chmod 644 "$CONFIG_DIR"/*.toml "$CONFIG_DIR"/scripts/*
# Compose merges volumes by their path in the container: this one replaces
# compose.yaml's ./deploy mount, in v2 and in 1.29 alike.
cat >"$WORK/compose.e2e.yaml" <<YAML
services:
  balancer:
    volumes:
      - $CONFIG_DIR:/etc/balancer:ro
YAML
COMPOSE=("${COMPOSE_CMD[@]}" -f "$REPO/compose.yaml" -f "$WORK/compose.e2e.yaml" -p "$PROJECT")
PASSED=0
FAILED=0
STARTED_ANYTHING=0

# --- plumbing -----------------------------------------------------------------

say() { printf '    %s\n' "$*"; }
fail() { printf '    FAIL: %s\n' "$*" >&2; return 1; }
compose() { "${COMPOSE[@]}" "$@"; }

cleanup() {
    local rc=$?
    stop_load
    if [ "$STARTED_ANYTHING" -eq 1 ]; then
        compose down -v --remove-orphans --timeout 10 >"$WORK/cleanup.log" 2>&1 ||
            cat "$WORK/cleanup.log" >&2
        # The ACME step's named volume, which compose.yaml does not declare.
        docker volume rm "${PROJECT}_acme" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one step in a subshell with errexit on, so that any failing command
# fails the step; counts it and stops the run at the first failure.
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
    else
        FAILED=$((FAILED + 1))
        printf '    FAILED (%d s)\n' $((SECONDS - started))
        diagnostics
        finish
    fi
}

finish() {
    printf '%d passed, %d failed\n' "$PASSED" "$FAILED"
    [ "$FAILED" -eq 0 ] && exit 0
    exit 1
}

diagnostics() {
    [ "$STARTED_ANYTHING" -eq 1 ] || return 0
    echo "--- state of the stack ---"
    project_ps -a --format '{{.Names}}\t{{.Status}}' || true
    local id
    for id in $(project_ps -a -q --filter label=com.docker.compose.service=balancer 2>/dev/null); do
        echo "--- last lines of the balancer's log ---"
        docker logs --tail 40 "$id" 2>&1 || true
    done
    echo "---"
}

# `docker ps` restricted to this project's containers.
project_ps() { docker ps --filter "label=com.docker.compose.project=$PROJECT" "$@"; }

service_ids() { project_ps -q --filter "label=com.docker.compose.service=$1"; }

balancer_identity() {
    local id
    id=$(service_ids balancer)
    [ "$(echo "$id" | wc -w)" -eq 1 ] || fail "expected one running balancer container, found: ${id:-none}"
    docker inspect --format '{{.Id}} started={{.State.StartedAt}} restarts={{.RestartCount}}' "$id"
}

# Waits until exactly $1 containers of the project run and all are healthy.
wait_healthy() {
    local want=$1 deadline=$((SECONDS + $2)) running healthy
    while :; do
        running=$(project_ps -q | wc -l)
        healthy=$(project_ps -q --filter health=healthy | wc -l)
        if [ "$running" -eq "$want" ] && [ "$healthy" -eq "$want" ]; then
            project_ps --format '{{.Names}}\t{{.Status}}' | sed 's/^/    /'
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            project_ps -a --format '{{.Names}}\t{{.Status}}' | sed 's/^/    /'
            fail "$healthy of $running running containers healthy after $2 s; wanted $want of $want"
        fi
        sleep 1
    done
}

# GET $URL$1 into file $2; prints the status code (000 when no response).
http_get() {
    : >"$2"
    curl -s -o "$2" -w '%{http_code}' --max-time 10 "$URL$1" || true
}

# The container_id of every JSON line in file $1, one a line.
container_ids() {
    python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.strip():
        print(json.loads(line)["container_id"])
' "$1"
}

# Rounds of $2 requests to /info until one round sees exactly $1 distinct
# container ids (none of them $4 when given), for at most $3 seconds: the
# balancer needs a resolve and a health check to take in new replicas.
# Every request must succeed.
wait_distinct_ids() {
    local want=$1 per_round=$2 deadline=$((SECONDS + $3)) exclude=${4:-} round=0 i code ids n
    while :; do
        round=$((round + 1))
        : >"$WORK/round"
        for ((i = 0; i < per_round; i++)); do
            code=$(http_get /info "$WORK/body")
            [ "$code" = 200 ] || fail "GET /info answered $code: $(head -c 200 "$WORK/body" 2>/dev/null)"
            cat "$WORK/body" >>"$WORK/round"
        done
        ids=$(container_ids "$WORK/round" | sort -u)
        n=$(echo "$ids" | grep -c . || true)
        if [ -n "$exclude" ] && echo "$ids" | grep -qx "$exclude"; then
            n=-1
        fi
        if [ "$n" -eq "$want" ]; then
            say "round $round of $per_round requests saw $want distinct container ids: $(echo "$ids" | tr "\n" " ")"
            return 0
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "after $round rounds of $per_round requests, the last one saw: $(echo "$ids" | tr "\n" " ")${exclude:+ (must not include $exclude)}; wanted $want distinct"
        fi
        sleep 1
    done
}

# A background loop of requests to / (bounded: stops on the stop file or
# after $1 seconds); each status code goes on a line of $WORK/load.
start_load() {
    local limit=$1
    rm -f "$WORK/load.stop"
    : >"$WORK/load"
    (
        set +e
        deadline=$((SECONDS + limit))
        while [ ! -e "$WORK/load.stop" ] && [ "$SECONDS" -lt "$deadline" ]; do
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$URL/" 2>/dev/null)
            echo "${code:-000}" >>"$WORK/load"
            sleep 0.05
        done
    ) &
    echo $! >"$WORK/load.pid"
}

stop_load() {
    [ -f "$WORK/load.pid" ] || return 0
    touch "$WORK/load.stop"
    local pid
    pid=$(cat "$WORK/load.pid")
    # The loop ends within one request (at most 10 s).
    local deadline=$((SECONDS + 15))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    kill "$pid" 2>/dev/null || true
    rm -f "$WORK/load.pid"
}

# Fails unless the load loop made requests and every one answered 200.
check_load() {
    local total bad
    total=$(grep -c . "$WORK/load" || true)
    bad=$(grep -vcx 200 "$WORK/load" || true)
    [ "$total" -gt 0 ] || fail "the request loop made no request"
    if [ "$bad" -ne 0 ]; then
        say "failed requests (status or curl exit): $(grep -vx 200 "$WORK/load" | sort | uniq -c | tr '\n' ' ')"
        fail "$bad of $total requests of the loop failed"
    fi
    say "request loop: $total requests, all answered 200"
}

# --- the steps ----------------------------------------------------------------

step_prerequisites() {
    local cmd
    for cmd in docker curl python3; do
        command -v "$cmd" >/dev/null || fail "'$cmd' is not installed"
    done
    "${COMPOSE_CMD[@]}" version >/dev/null 2>&1 || fail "neither 'docker compose' nor 'docker-compose' works"
    docker info >/dev/null 2>&1 || fail "the Docker engine does not answer (is dockerd running?)"
    say "compose: ${COMPOSE_CMD[*]} $("${COMPOSE_CMD[@]}" version --short 2>/dev/null || true)"
    # Leftovers of an interrupted run of this very project would hold port 80.
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
    local holders
    holders=$(docker ps --filter publish=80 --format '{{.Names}}' | tr '\n' ' ')
    [ -z "$holders" ] || fail "port 80 of this machine is taken by the container(s) $holders; stop them first"
    if command -v ss >/dev/null; then
        if [ -n "$(ss -Htln 'sport = :80')" ]; then
            fail "port 80 of this machine is in use: $(ss -Htlnp 'sport = :80' | tr -s ' ' | head -n 3)"
        fi
    elif (exec 3<>/dev/tcp/127.0.0.1/80) 2>/dev/null; then
        fail "port 80 of this machine is in use (something accepts connections on 127.0.0.1:80)"
    fi
    say "port 80 is free"
    # vendor/ (made by deploy/local-images.sh) must hold the crates of the
    # current Cargo.lock, or the offline image build fails.
    local stamp=$REPO/vendor/.cargo-lock.sha256
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$(sha256sum "$REPO/Cargo.lock" | cut -d' ' -f1)" ]; then
        fail "vendor/ was made for another Cargo.lock: run deploy/local-images.sh again"
    fi
    [ -d "$REPO/vendor" ] ||
        say "note: no vendor/ in this clone; on a machine that cannot pull images or reach crates.io, run deploy/local-images.sh once per clone (as root) first"
}

step_build() {
    compose build ||
        fail "the image build failed; on a machine that cannot pull images or reach crates.io, run deploy/local-images.sh once per clone (as root), then this again"
    local image
    for image in pingora-lb/balancer:latest pingora-lb/backend:latest; do
        docker image inspect "$image" >/dev/null || fail "compose build made no $image"
        say "$image: $(docker image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.1f MB", $1 / 1000000 }')"
    done
}

step_up() {
    compose up -d
    wait_healthy 2 120
}

step_hello() {
    local code body
    code=$(http_get / "$WORK/body")
    body=$(cat "$WORK/body")
    [ "$code" = 200 ] || fail "GET / answered $code: $body"
    [ "$body" = "Hello World!" ] || fail "GET / answered '$body', not 'Hello World!'"
    say "GET / -> 200 $body"
}

step_info() {
    local code
    code=$(http_get /info "$WORK/body")
    [ "$code" = 200 ] || fail "GET /info answered $code: $(cat "$WORK/body")"
    say "GET /info -> $(cat "$WORK/body")"
    python3 - "$WORK/body" "${INFO_KEYS[@]}" <<'EOF'
import json, sys
body = json.load(open(sys.argv[1]))
missing = [k for k in sys.argv[2:] if k not in body]
if not isinstance(body, dict) or missing:
    sys.exit(f"    FAIL: /info lacks the keys {missing}")
empty = [k for k in ("container_id", "connecting_ip") if not body[k]]
if empty:
    sys.exit(f"    FAIL: /info has empty {empty}")
EOF
}

step_cache() {
    local first second
    curl -s -D "$WORK/h1" -o "$WORK/b1" --max-time 10 "$URL/cache-me"
    curl -s -D "$WORK/h2" -o "$WORK/b2" --max-time 10 "$URL/cache-me"
    first=$(tr -d '\r' < "$WORK/h1" | awk -F': ' 'tolower($1) == "x-cache-status" {print $2}')
    second=$(tr -d '\r' < "$WORK/h2" | awk -F': ' 'tolower($1) == "x-cache-status" {print $2}')
    say "GET /cache-me -> X-Cache-Status: $first, then $second"
    [ "$first" = MISS ] || fail "the first /cache-me was '$first', not MISS"
    [ "$second" = HIT ] || fail "the second /cache-me was '$second', not HIT"
    cmp -s "$WORK/b1" "$WORK/b2" || fail "the cached body differs from the first"
    say "same body twice: $(cat "$WORK/b1")"
}

# Edits the mounted balancer.toml on the host the way editors do (a new file
# renamed over the old): the running balancer must follow, without a restart.
step_live_edit() {
    local before after config=$CONFIG_DIR/balancer.toml
    before=$(balancer_identity)
    cp "$config" "$WORK/balancer.toml.orig"
    sed 's|^\[\[cache.rule\]\]$|[[cache.rule]]\npath = "/info"\nttl = "5s"\n\n[[cache.rule]]|' \
        "$WORK/balancer.toml.orig" > "$config.edit"
    grep -q '^path = "/info"' "$config.edit" || fail "the edit did not apply"
    chmod 644 "$config.edit"
    mv "$config.edit" "$config"
    wait_header /info x-cache-status 30 || fail "the edited config (a cache rule for /info) did not take effect"
    say "after the edit, /info carries X-Cache-Status"
    restore_config
    wait_no_header /info x-cache-status 30 || fail "the restored config did not take effect"
    after=$(balancer_identity)
    [ "$before" = "$after" ] || fail "the balancer was restarted"
    say "restored, and the balancer was never restarted"
}

# The quick start's script: its edit (in the test's copy of deploy/, as an
# editor saves it) is run by the next request, without a restart.
step_script_edit() {
    local script=$CONFIG_DIR/scripts/hello.lua code before edited
    before=$(balancer_identity)
    code=$(http_get /hello "$WORK/body")
    [ "$code" = 200 ] || fail "GET /hello answered $code: $(cat "$WORK/body")"
    grep -q '^Hello from Lua!' "$WORK/body" || fail "GET /hello answered '$(cat "$WORK/body")'"
    say "GET /hello -> $(cat "$WORK/body")"
    sed 's/Hello from Lua!/Hello again, edited!/' "$script" >"$script.edit"
    grep -q 'Hello again, edited!' "$script.edit" || fail "the edit did not apply"
    chmod 644 "$script.edit"
    mv "$script.edit" "$script"
    edited=$SECONDS
    until [ "$(http_get /hello "$WORK/body")" = 200 ] && grep -q '^Hello again, edited!' "$WORK/body"; do
        [ $((SECONDS - edited)) -lt 30 ] || fail "the edited script did not take effect within 30 s: $(cat "$WORK/body")"
        sleep 0.2
    done
    say "after the edit, within $((SECONDS - edited)) s: GET /hello -> $(cat "$WORK/body")"
    [ "$before" = "$(balancer_identity)" ] || fail "the balancer was restarted"
}

restore_config() {
    cp "$WORK/balancer.toml.orig" "$CONFIG_DIR/balancer.toml.edit"
    mv "$CONFIG_DIR/balancer.toml.edit" "$CONFIG_DIR/balancer.toml"
}

has_header() {
    curl -s -D - -o /dev/null --max-time 5 "$URL$1" | tr -d '\r' | grep -qi "^$2:"
}
wait_header() {
    local deadline=$((SECONDS + $3))
    until has_header "$1" "$2"; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.5; done
}
wait_no_header() {
    local deadline=$((SECONDS + $3))
    while has_header "$1" "$2"; do [ $SECONDS -lt $deadline ] || return 1; sleep 0.5; done
}

# The containers run hardened: read-only root, no new privileges, no
# capabilities, non-root users.
step_hardening() {
    local id service
    for service in balancer backend; do
        id=$(service_ids "$service" | sed -n 1p)
        local facts
        facts=$(docker inspect --format '{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.CapDrop}} {{.HostConfig.SecurityOpt}} {{.Config.User}}' "$id")
        say "$service: read-only, cap_drop, security_opt, user = $facts"
        [[ $facts == "true [ALL] [no-new-privileges:true] "* ]] || fail "$service is not hardened: $facts"
        [ "$(docker exec "$id" id -u)" != 0 ] || fail "$service runs as root"
    done
}

# The admin port is published on the host's loopback only; reading is open,
# PURGE needs the token.
step_admin() {
    local id mapping code
    id=$(service_ids balancer | sed -n 1p)
    mapping=$(docker port "$id" 9000/tcp)
    say "admin port published on: $mapping"
    [ "$mapping" = "127.0.0.1:9000" ] || fail "the admin port is published on '$mapping', not only on 127.0.0.1:9000"
    code=$(curl -s -o "$WORK/status" -w '%{http_code}' --max-time 5 "$ADMIN/status")
    [ "$code" = 200 ] || fail "GET $ADMIN/status answered $code"
    grep -q '"upstreams"' "$WORK/status" || fail "/status is not the status JSON: $(head -c 200 "$WORK/status")"
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$ADMIN/")
    [ "$code" = 200 ] || fail "the status page answered $code"
    say "GET $ADMIN/ and /status -> 200"
    code=$(curl -s -o "$WORK/purge" -w '%{http_code}' --max-time 5 -X PURGE "$ADMIN/cache-me")
    [ "$code" = 401 ] || fail "PURGE without the token answered $code: $(cat "$WORK/purge")"
    say "PURGE without the token -> 401 $(cat "$WORK/purge")"
    code=$(curl -s -o "$WORK/purge" -w '%{http_code}' --max-time 5 -X PURGE \
        -H "Authorization: Bearer $BALANCER_ADMIN_TOKEN" "$ADMIN/cache-me")
    [ "$code" = 200 ] || fail "PURGE with the token answered $code: $(cat "$WORK/purge")"
    say "PURGE with the token -> 200 $(cat "$WORK/purge")"
}

# The README's way to check an edit: the balancer in its image, not on the host.
step_check_in_image() {
    local out
    out=$(compose run --rm --no-deps balancer --config /etc/balancer/balancer.toml --check 2>&1)
    say "$out"
    grep -q 'configuration is valid' <<<"$out" || fail "the check in the image said: $out"
}

# docker stop: a clean, quick stop that logs no error; Docker's health
# probes are not in the access log.
step_clean_stop() {
    local started=$SECONDS logs
    compose stop --timeout 10 balancer
    say "balancer stopped in $((SECONDS - started)) s"
    logs=$(compose logs --no-color balancer 2>&1)
    grep -q 'graceful stop, grace period 5s' <<<"$logs" || fail "no graceful stop line in the balancer's log"
    if grep -q ' ERROR ' <<<"$logs"; then
        fail "the balancer logged errors: $(grep ' ERROR ' <<<"$logs" | head -n 3)"
    fi
    if grep -q '"GET /health-check"' <<<"$logs"; then
        fail "Docker's health probes are in the access log"
    fi
    say "no ERROR line, no health probe in the access log"
}

step_down() {
    compose down -v --remove-orphans --timeout 10
    [ -z "$(project_ps -aq)" ] || fail "containers left after down: $(project_ps -a --format '{{.Names}}' | tr '\n' ' ')"
}

step_scale_3() {
    compose up -d --scale backend=3
    wait_healthy 4 120
    wait_distinct_ids 3 30 30
}

step_scale_5_under_load() {
    local before after
    before=$(balancer_identity)
    say "balancer before: $before"
    start_load 180
    compose up -d --no-recreate --scale backend=5
    wait_healthy 6 120
    wait_distinct_ids 5 30 30
    stop_load
    after=$(balancer_identity)
    say "balancer after:  $after"
    [ "$before" = "$after" ] || fail "the balancer container was recreated or restarted"
    check_load
}

step_stop_backend_under_load() {
    local victim id
    victim=$(service_ids backend | sed -n 1p)
    [ -n "$victim" ] || fail "no backend container to stop"
    # /info reports HOSTNAME, which Docker sets to the short container id.
    id=$(docker inspect --format '{{.Config.Hostname}}' "$victim")
    start_load 180
    # Let the loop run a moment before and after the stop: the balancer must
    # route around the stopping backend until discovery drops it.
    sleep 2
    say "docker stop $id"
    docker stop --time 10 "$victim" >/dev/null
    wait_distinct_ids 4 30 30 "$id"
    sleep 3
    stop_load
    check_load
    [ "$(service_ids backend | wc -l)" -eq 4 ] || fail "expected 4 running backends after the stop"
}

# HTTPS with the override file: a development certificate made by the
# balancer's own image, HTTP/2 to curl, and 50 WebSockets echoed over wss.
step_tls() {
    local tls=$CONFIG_DIR/tls out version
    compose run --rm --no-deps --user 0 -v "$tls:/out" balancer \
        cert --self-signed --host localhost --out /out
    [ -s "$tls/cert.pem" ] && [ -s "$tls/key.pem" ] && [ -s "$tls/ca.pem" ] || fail "balancer cert wrote no certificate"
    "${COMPOSE_CMD[@]}" -f "$REPO/compose.yaml" -f "$REPO/compose.tls.yaml" -f "$WORK/compose.e2e.yaml" \
        -p "$PROJECT" up -d
    local deadline=$((SECONDS + 60))
    until out=$(curl -s --http2 --cacert "$tls/ca.pem" -w ' %{http_version}' --max-time 5 https://localhost/ 2>/dev/null) &&
        [ "$out" = "Hello World! 2" ]; do
        [ $SECONDS -lt $deadline ] || fail "https://localhost/ over HTTP/2 answered '${out:-nothing}'"
        sleep 1
    done
    say "curl --http2 --cacert ca.pem https://localhost/ -> $out"
    /usr/bin/python3 - "$tls/ca.pem" <<'PY' || fail "the WebSocket echo over wss failed"
import sys, websocket
# No retry: the balancer carries WebSockets itself, and none may be cut.
for n in range(50):
    ws = websocket.create_connection("wss://localhost/ws", timeout=10, sslopt={"ca_certs": sys.argv[1]})
    for m in range(3):
        text = f"socket {n}, message {m} over wss"
        ws.send(text)
        echo = ws.recv()
        if echo != text:
            sys.exit(f"    FAIL: socket {n} echoed {echo!r} for {text!r}")
    ws.close()
print("    50 WebSockets over wss://localhost/ws, three messages each, none cut")
PY
    version=$(curl -s -o /dev/null -w '%{http_version}' --max-time 5 http://localhost/)
    [ "$version" = 1.1 ] || fail "plain http://localhost/ answered over HTTP/$version"
    say "http://localhost/ still answers over HTTP/1.1"
}

# Automatic HTTPS with compose.acme.yaml and the shipped balancer-acme.toml,
# pointed at Debian's pebble (an ACME server with its own CA) run as a
# container of the project, its binary mounted from this machine. pebble
# finds the balancer by the name www.acme.test (a network alias, through
# Docker's DNS) and fetches the HTTP-01 answer from its port 80; the
# certificate lands in the named volume and is verified from this machine.
step_acme() {
    command -v pebble >/dev/null || fail "pebble is needed: apt-get install pebble"
    local acme=$WORK/acme root=$WORK/acme/root.pem out status
    mkdir -p "$acme"
    compose run --rm --no-deps --user 0 -v "$acme:/out" balancer \
        cert --self-signed --host pebble --host 127.0.0.1 --out /out
    chmod 755 "$acme"
    chmod 644 "$acme"/*.pem
    cp "$acme/ca.pem" "$CONFIG_DIR/pebble-ca.pem"
    cat >"$acme/pebble.json" <<'JSON'
{"pebble": {"listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
  "certificate": "/acme/cert.pem", "privateKey": "/acme/key.pem", "httpPort": 80, "tlsPort": 443,
  "ocspResponderURL": "", "externalAccountBindingRequired": false}}
JSON
    # The shipped file with only the CA and the name changed.
    sed -e 's|^directory = .*|directory = "https://pebble:14000/dir"\nca_file = "/etc/balancer/pebble-ca.pem"|' \
        -e 's|^domains = .*|domains = ["www.acme.test"]|' \
        "$REPO/deploy/balancer-acme.toml" >"$CONFIG_DIR/balancer-acme.toml"
    cat >"$WORK/compose.acme-e2e.yaml" <<YAML
services:
  balancer:
    networks:
      default:
        aliases: [www.acme.test]
  pebble:
    image: debian:bookworm-slim
    command: ["/usr/bin/pebble", "-config", "/acme/pebble.json", "-dnsserver", "127.0.0.11:53"]
    environment:
      PEBBLE_VA_NOSLEEP: "1"
      PEBBLE_WFE_NONCEREJECT: "0"
    volumes:
      - /usr/bin/pebble:/usr/bin/pebble:ro
      - $acme:/acme:ro
    ports:
      - "127.0.0.1:15000:15000"
YAML
    ACME_COMPOSE=("${COMPOSE_CMD[@]}" -f "$REPO/compose.yaml" -f "$REPO/compose.acme.yaml"
        -f "$WORK/compose.e2e.yaml" -f "$WORK/compose.acme-e2e.yaml" -p "$PROJECT")
    "${ACME_COMPOSE[@]}" up -d
    local deadline=$((SECONDS + 60))
    until curl -sf --cacert "$acme/ca.pem" -o "$root" --max-time 5 https://127.0.0.1:15000/roots/0; do
        [ $SECONDS -lt $deadline ] || fail "pebble's management interface did not answer"
        sleep 1
    done
    deadline=$((SECONDS + 90))
    until out=$(curl -s --cacert "$root" --resolve www.acme.test:443:127.0.0.1 --max-time 5 https://www.acme.test/ 2>&1) &&
        [ "$out" = "Hello World!" ]; do
        [ $SECONDS -lt $deadline ] || {
            "${ACME_COMPOSE[@]}" logs --no-color --tail 20 balancer pebble >&2
            fail "https://www.acme.test/ against pebble's root answered '${out:-nothing}'"
        }
        sleep 1
    done
    say "curl --cacert <pebble's root> https://www.acme.test/ -> $out"
    status=$(curl -s --max-time 5 http://127.0.0.1:9000/status)
    grep -Eq '"state": ?"valid"' <<<"$status" || fail "/status has no valid ACME certificate: $status"
    say "/status: www.acme.test is valid"
    docker volume ls -q | grep -qx "${PROJECT}_acme" || fail "no named volume ${PROJECT}_acme"
    "${ACME_COMPOSE[@]}" down -v --remove-orphans --timeout 10
}

step_final_down() {
    compose down -v --remove-orphans --timeout 10
    local containers networks volumes
    containers=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    networks=$(docker network ls -q --filter "label=com.docker.compose.project=$PROJECT")
    networks+=$(docker network ls --format '{{.Name}}' | grep -E "^${PROJECT}_" || true)
    volumes=$(docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$containers" ] || fail "containers left: $containers"
    [ -z "$networks" ] || fail "networks left: $networks"
    [ -z "$volumes" ] || fail "volumes left: $volumes"
    say "no container, network or volume of project $PROJECT is left"
}

cd "$REPO"
step "prerequisites and a free port 80" step_prerequisites
# From here on, the exit trap takes the stack down.
STARTED_ANYTHING=1
step "build both images from deploy/Dockerfile (compose build)" step_build
step "up -d: two containers, both healthy" step_up
step "GET / answers Hello World!" step_hello
step "GET /info answers JSON with ${INFO_KEYS[*]}" step_info
step "GET /cache-me twice: MISS then HIT, same body" step_cache
step "an edit of the mounted balancer.toml on the host takes effect live" step_live_edit
step "an edit of the mounted Lua script (deploy/scripts/hello.lua) is run by the next request" step_script_edit
step "containers are hardened" step_hardening
step "the admin port is on the host's loopback; PURGE needs the token" step_admin
step "compose run --rm --no-deps balancer ... --check validates the mounted TOML" step_check_in_image
step "docker stop: the balancer stops cleanly, with no ERROR line" step_clean_stop
step "down" step_down
step "up -d --scale backend=3: three container ids within 30 requests" step_scale_3
step "scale to 5 under a request loop: five ids, same balancer, no failed request" step_scale_5_under_load
step "docker stop one backend under a request loop: no failed request" step_stop_backend_under_load
step "HTTPS override: a dev certificate, HTTP/2 over TLS, a WebSocket over wss" step_tls
step "ACME override: a certificate from pebble by HTTP-01 into the named volume, verified" step_acme
step "down leaves no container or network behind" step_final_down
finish
