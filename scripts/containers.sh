#!/usr/bin/env bash
# Runs the container tests (tests/containers/) against real engines on this machine (as root):
#   bash scripts/containers.sh                 # every container test
#   bash scripts/containers.sh -k podman       # arguments go to pytest
# Idempotent preparation, each step skipped when already done:
#   1. the podman image localhost/pacs-orthanc-debian12 (scripts/molecule-image.sh);
#   2. a Docker daemon without systemd, bridge or iptables (TEST-HOSTS.md): data, exec root,
#      socket and pidfile under DOCKER_DIR (default .work/docker of this checkout; point several
#      checkouts at one folder to share one daemon); a daemon already answering on that socket is
#      reused, and it is left running at the end. Storage driver overlay2 (a container starts in
#      about a second); when overlay2 cannot start, vfs (which copies the whole image for every
#      container: minutes more);
#   3. the same image in Docker (`podman save | docker load`), unless Docker already has an image
#      with the same recipe label;
#   4. DOCKER_HOST exported, then `python3 -m pytest -v tests/containers "$@"`.
# SKIP_DOCKER=1 skips 2-3 (the Docker tests then skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=localhost/pacs-orthanc-debian12
LABEL=pacs.orthanc.recipe
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/extensions/molecule/containers.conf}"
DOCKER_DIR=${DOCKER_DIR:-$PWD/.work/docker}

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/setup.sh" >&2; exit 1; }
done

t=$SECONDS
bash scripts/molecule-image.sh
echo "== podman image: $((SECONDS - t)) s"

if [ "${SKIP_DOCKER:-0}" != 1 ]; then
  for tool in dockerd docker; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/setup.sh" >&2; exit 1; }
  done
  export DOCKER_HOST="unix://$DOCKER_DIR/docker.sock"
  if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    t=$SECONDS
    mkdir -p "$DOCKER_DIR/data" "$DOCKER_DIR/exec"
    # a pidfile left by a daemon that died makes dockerd refuse to start
    if [ -f "$DOCKER_DIR/docker.pid" ] && ! kill -0 "$(cat "$DOCKER_DIR/docker.pid")" 2>/dev/null; then
      rm -f "$DOCKER_DIR/docker.pid"
    fi
    # setsid: the daemon outlives this script (and may be shared with other checkouts' runs)
    start_dockerd() {
      echo "== starting dockerd ($DOCKER_HOST, storage driver $1, log $DOCKER_DIR/dockerd.log)"
      setsid dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver="$1" \
        --data-root "$DOCKER_DIR/data-$1" --exec-root "$DOCKER_DIR/exec" -H "$DOCKER_HOST" \
        --pidfile "$DOCKER_DIR/docker.pid" </dev/null >>"$DOCKER_DIR/dockerd.log" 2>&1 &
      local pid=$! _
      for _ in $(seq 1 150); do
        docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.2
      done
      return 1
    }
    start_dockerd overlay2 || start_dockerd vfs \
      || { tail -20 "$DOCKER_DIR/dockerd.log" >&2; echo "dockerd did not come up" >&2; exit 1; }
    echo "== dockerd $(docker version --format '{{.Server.Version}}') up in $((SECONDS - t)) s"
  else
    echo "== dockerd already answers at $DOCKER_HOST"
  fi
  want=$(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$IMAGE")
  have=$(docker image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    t=$SECONDS
    echo "== loading $IMAGE into docker (recipe $want)"
    podman save "$IMAGE" | docker load -q
    echo "== loaded in $((SECONDS - t)) s"
  fi
fi

exec python3 -m pytest -v tests/containers "$@"
