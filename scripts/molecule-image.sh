#!/usr/bin/env bash
# Builds the podman image that every molecule scenario runs (localhost/pacs-orthanc-debian12),
# from Debian's packages only (no container registry is needed):
#   debootstrap --variant=minbase bookworm from the machine's own Debian mirror, then Orthanc with
#   its PostgreSQL and MySQL plugins, PostgreSQL 15 and MariaDB servers and clients, dcmtk, sqlite3,
#   rsync, python3, sshd and sudo; then `podman import`.
# The image carries the SHA-256 of this script as the label pacs.orthanc.recipe: when an image with
# the same label exists, nothing is done (a rerun takes well under a second). --force rebuilds.
# Needs root, podman, debootstrap. The root file system is built under .work/molecule/ and removed
# once imported.
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."

IMAGE=localhost/pacs-orthanc-debian12
LABEL=pacs.orthanc.recipe
PACKAGES=(
  python3 openssh-server sudo curl ca-certificates procps iproute2 rsync sqlite3 less
  orthanc orthanc-postgresql orthanc-mysql dcmtk
  postgresql-15 postgresql-client mariadb-server mariadb-client
)
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/extensions/molecule/containers.conf}"

recipe=$(sha256sum "$SELF" | cut -c1-16)
if [ "${1:-}" != "--force" ] \
   && [ "$(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$IMAGE" 2>/dev/null)" = "$recipe" ]; then
  echo "== $IMAGE is up to date (recipe $recipe)"
  exit 0
fi

# The Debian mirror this machine already uses (deb822 .sources files or one-line sources.list).
mirror_for() {  # suite -> the URIs serving it, in the order apt reads them
  local suite=$1 f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    awk -v suite="$suite" '
      function flush() { if (uri != "" && hit) print uri; uri = ""; hit = 0 }
      /^[[:space:]]*$/ { flush(); next }
      /^URIs:/   { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
      END        { flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -e "$f" ] || continue
    sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
  done
}
MIRROR=$(mirror_for bookworm | sed -n 1p)
SECURITY=$(mirror_for bookworm-security | sed -n 1p)
[ -n "$MIRROR" ] || { echo "no Debian bookworm mirror found in /etc/apt/sources.list{,.d}" >&2; exit 1; }

WORK=$PWD/.work/molecule
ROOTFS=$WORK/rootfs
cleanup() {
  umount "$ROOTFS/proc" 2>/dev/null || true
  rm -rf "$ROOTFS"
}
trap cleanup EXIT
cleanup
mkdir -p "$WORK"

t0=$SECONDS
echo "== debootstrap bookworm from $MIRROR into $ROOTFS"
debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }

# Before any package is installed: no package script may start a daemon (it would run on this
# machine's network, beside the host's own services).
printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"
{
  echo "deb $MIRROR bookworm main"
  echo "deb $MIRROR bookworm-updates main"
  [ -z "$SECURITY" ] || echo "deb $SECURITY bookworm-security main"
} >"$ROOTFS/etc/apt/sources.list"
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
  >"$ROOTFS/etc/apt/apt.conf.d/90pacs-no-recommends"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"

echo "== installing ${#PACKAGES[@]} packages into the root file system"
in_root() { DEBIAN_FRONTEND=noninteractive LC_ALL=C chroot "$ROOTFS" "$@"; }
in_root apt-get update -qq
in_root apt-get install -y -qq --download-only "${PACKAGES[@]}" >/dev/null
# Installed without a network: the PostgreSQL package probes which port is free when it creates
# its cluster, and would take 5433 if this machine's own PostgreSQL listens on 5432.
DEBIAN_FRONTEND=noninteractive LC_ALL=C unshare --net chroot "$ROOTFS" \
  apt-get install -y -qq "${PACKAGES[@]}" >"$WORK/apt.log" 2>&1 \
  || { tail -30 "$WORK/apt.log" >&2; exit 1; }
in_root apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS/etc/resolv.conf"
umount "$ROOTFS/proc"

grep -q '^port = 5432' "$ROOTFS/etc/postgresql/15/main/postgresql.conf" \
  || { echo "the image's PostgreSQL cluster is not on port 5432" >&2; exit 1; }
# Containers have no systemd: Orthanc, PostgreSQL and MariaDB are started with `service` (their
# init scripts); policy-rc.d stays in the image so that nothing starts on its own.
echo "root:root" | chroot "$ROOTFS" chpasswd

echo "== importing into podman as $IMAGE"
previous=$(podman image inspect --format '{{ .Id }}' "$IMAGE" 2>/dev/null || true)
tar -C "$ROOTFS" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' \
  --change "LABEL $LABEL=$recipe" - "$IMAGE" >/dev/null
# The image it replaces (untagged now) goes, unless a container still uses it.
[ -z "$previous" ] || podman rmi "$previous" >/dev/null 2>&1 || true
echo "== $IMAGE built in $((SECONDS - t0)) s (recipe $recipe)"
