#!/usr/bin/env bash
# Build the container image from ./Dockerfile and check that it works, without a Docker
# engine: podman and buildah with chroot isolation (as root), on a stand-in base image made
# from Debian packages, for machines that cannot reach a registry of base images.
#
#   apt-get install -y podman buildah debootstrap
#   scripts/check-image.sh            # reuses the base image of an earlier run
#   scripts/check-image.sh --fresh    # rebuilds the base image first (debootstrap, minutes)
#   scripts/check-image.sh --clean    # also removes the base image at the end
#
# The base (localhost/beaver-base): debootstrap --variant=minbase bookworm with python3 and
# python3-venv, a venv's bin first on PATH (so python and pip behave as in the python image),
# and this host's CA bundle as PIP_CERT (package traffic may go through an intercepting
# proxy). The checks: the image runs as a non-root user, the server starts with BEAVER_TOKEN
# from the environment, a /dicts write and read with the token, 401 without it, /docs, the
# dashboard's files at /ui (without the token), and the image's own HEALTHCHECK command
# (passing, then failing with a wrong token). Exit status 0 when every check passed. Everything it started is stopped and removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=localhost/beaver-base
IMAGE=localhost/beaver-check
PORT=${PORT:-18765}
TOKEN="check-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian/}
FRESH=0 CLEAN=0
for arg in "$@"; do
    case $arg in
        --fresh) FRESH=1 ;;
        --clean) CLEAN=1 ;;
        *) echo "usage: $0 [--fresh] [--clean]" >&2; exit 2 ;;
    esac
done

START=$(date +%s)
WORK=$(mktemp -d /tmp/beaver-image-check.XXXXXX)
CONTAINER="" RUNNER="" FAILED=0

say() { printf '[%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
check() {   # check NAME COMMAND...: run a check, report it, remember a failure
    local name=$1; shift
    if "$@"; then say "ok    $name"; else say "FAIL  $name"; FAILED=1; fi
}

descendants() {   # every process below PID (chroot isolation shares the host's PID space)
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

stop_server() {
    [ -n "$RUNNER" ] || return 0
    local pids
    pids=$(descendants "$RUNNER")
    # `buildah run` ending does not end the server inside: stop the processes by their id
    [ -n "$pids" ] && kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$RUNNER" 2>/dev/null || break
        sleep 0.1
    done
    pids="$(descendants "$RUNNER") $RUNNER"
    kill -KILL $pids 2>/dev/null || true
    wait "$RUNNER" 2>/dev/null || true
    RUNNER=""
}

cleanup() {
    stop_server
    [ -n "$CONTAINER" ] && buildah rm "$CONTAINER" >/dev/null 2>&1 || true
    podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    [ "$CLEAN" = 1 ] && podman rmi -f "$BASE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

for tool in podman buildah debootstrap curl; do
    command -v "$tool" >/dev/null || { echo "$0: needs $tool (apt-get install -y podman buildah debootstrap curl)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "$0: run as root (chroot isolation)" >&2; exit 2; }

# -- 1. the stand-in base image -------------------------------------------------------------
if [ "$FRESH" = 1 ] || ! podman image exists "$BASE"; then
    say "building $BASE with debootstrap (bookworm, minbase)"
    podman rmi -f "$BASE" >/dev/null 2>&1 || true      # --fresh: no dangling old base left
    ROOT="$WORK/root"
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$ROOT" "$MIRROR" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    chroot "$ROOT" python3 -m venv /opt/venv
    mkdir -p "$ROOT/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*
    tar -C "$ROOT" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$ROOT"
else
    say "reusing $BASE (--fresh rebuilds it)"
fi

# -- 2. the image ---------------------------------------------------------------------------
say "podman build --isolation chroot --build-arg BASE=$BASE"
# docker format: the OCI format has no HEALTHCHECK
podman build --isolation chroot --format docker --build-arg BASE="$BASE" -t "$IMAGE" . \
    > "$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
say "image built: $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) bytes"

HEALTH=$(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$IMAGE")
IMAGE_USER=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
check "HEALTHCHECK present ($HEALTH)" test "$HEALTH" != null -a "$HEALTH" != '""'
check "image USER is not root ($IMAGE_USER)" test -n "$IMAGE_USER" -a "$IMAGE_USER" != root -a "$IMAGE_USER" != 0

# -- 3. the server in the image -------------------------------------------------------------
CONTAINER=$(buildah from "$IMAGE")
mapfile -t COMMAND < <(podman image inspect --format '{{range .Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
say "starting ${COMMAND[*]} with BEAVER_TOKEN on port $PORT"
buildah run --isolation chroot --env BEAVER_TOKEN="$TOKEN" --env BEAVER_PORT="$PORT" \
    "$CONTAINER" -- "${COMMAND[@]}" > "$WORK/server.log" 2>&1 &
RUNNER=$!

URL="http://127.0.0.1:$PORT"
for _ in $(seq 300); do     # up to 30 s
    curl -fs -o /dev/null -H "Authorization: Bearer $TOKEN" "$URL/docs" && break
    kill -0 "$RUNNER" 2>/dev/null || { cat "$WORK/server.log"; echo "the server exited" >&2; exit 1; }
    sleep 0.1
done
say "server answering"

SERVER_PID=$(for pid in $(descendants "$RUNNER"); do
    ps -o args= -p "$pid" | grep -q beaver_server && echo "$pid"; done | tail -1)
SERVER_USER=$(ps -o uid= -p "${SERVER_PID:-0}" | tr -d ' ')
check "server process runs as a non-root uid ($SERVER_USER)" test -n "$SERVER_USER" -a "$SERVER_USER" != 0

status() { curl -s -o "$WORK/body" -w '%{http_code}' "$@"; }
auth=(-H "Authorization: Bearer $TOKEN")
check "PUT /dicts/check/greeting with the token -> 204" \
    test "$(status -X PUT "${auth[@]}" -H 'Content-Type: application/json' \
                 --data '{"hello": "wörld"}' "$URL/dicts/check/greeting")" = 204
check "GET /dicts/check/greeting with the token -> the value" \
    test "$(status "${auth[@]}" "$URL/dicts/check/greeting")" = 200 -a \
         "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["hello"])' "$WORK/body")" = wörld
check "GET /dicts/check/greeting without a token -> 401" \
    test "$(status "$URL/dicts/check/greeting")" = 401
check "GET /dicts/check/greeting with a wrong token -> 401" \
    test "$(status -H 'Authorization: Bearer wrong' "$URL/dicts/check/greeting")" = 401
check "GET /docs with the token -> 200 (OpenAPI page)" \
    test "$(status "${auth[@]}" "$URL/docs")" = 200 -a -n "$(grep -il swagger "$WORK/body")"
check "GET /ui without a token -> 200 (the dashboard's page, no data)" \
    test "$(status "$URL/ui")" = 200 -a -n "$(grep -l dashboard.js "$WORK/body")"
check "GET /ui/dashboard.js -> 200 (shipped in the image)" \
    test "$(status "$URL/ui/dashboard.js")" = 200

# the image's own HEALTHCHECK command, run inside the image with its environment
mapfile -t PROBE < <(python3 -c 'import json,sys; t=json.loads(sys.argv[1]); print("\n".join(t[1:]))' "$HEALTH")
probe() { buildah run --isolation chroot --env BEAVER_TOKEN="$1" --env BEAVER_PORT="$PORT" \
              "$CONTAINER" -- "${PROBE[@]}" > /dev/null 2>&1; }
check "HEALTHCHECK command passes" probe "$TOKEN"
check "HEALTHCHECK command fails with a wrong token" eval '! probe wrong'

stop_server
check "HEALTHCHECK command fails once the server is stopped" eval '! probe "$TOKEN"'
check "no process of the check left" test -z "$(ps -o pid= -p "${SERVER_PID:-0}" 2>/dev/null)"

if [ "$FAILED" = 0 ]; then
    say "all checks passed"
else
    say "some checks FAILED; server log:"; cat "$WORK/server.log"
fi
exit "$FAILED"
