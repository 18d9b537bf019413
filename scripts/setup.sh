#!/usr/bin/env bash
# Installs what the tests, the molecule scenarios and the benchmarks need on a Debian 12 machine
# (as root), on top of the demo's packages (scripts/setup-demo.sh, run first): sqlite3, rsync,
# btrfs-progs and xfsprogs (loop-mounted filesystems of the snapshot and reflink tests), OpenSSH's server and client, podman with runc and catatonit, debootstrap, restic and
# rclone (off-site tests), Docker's daemon (docker.io), docker-compose and podman-compose (container
# tests, scripts/containers.sh) from Debian; pytest, pytest-xdist, molecule and testinfra from PyPI (requirements-test.txt);
# .work/controller: the tests' ansible-playbook, the same ansible-core on Debian's /usr/bin/python3.
# PostgreSQL and MariaDB: scripts/databases.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-demo.sh

need_apt=()
for pair in sqlite3:sqlite3 rsync:rsync mkfs.btrfs:btrfs-progs mkfs.xfs:xfsprogs sshd:openssh-server ssh:openssh-client \
    podman:podman runc:runc catatonit:catatonit debootstrap:debootstrap restic:restic rclone:rclone \
    dockerd:docker.io docker-compose:docker-compose podman-compose:podman-compose; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import pytest, xdist, molecule, molecule_plugins.podman, testinfra' >/dev/null 2>&1; then
  echo "== installing Python packages from requirements-test.txt"
  python3 -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
fi
# The tests' controller (tests/support/playbook.py): the same ansible-core as python3's, in a virtual
# environment of Debian's /usr/bin/python3, which is built with optimisations (pyenv's python3 is
# not): each ansible-playbook run of the tests costs less CPU. Made again when the versions differ.
version=$(python3 -c 'from ansible.release import __version__; print(__version__)')
controller=.work/controller
if [ "$("$controller/bin/python" -c 'from ansible.release import __version__; print(__version__)' 2>/dev/null)" != "$version" ]; then
  echo "== making $controller: ansible-core $version on /usr/bin/python3"
  if ! /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$controller"
  /usr/bin/python3 -m venv "$controller"
  "$controller/bin/python" -m pip install --quiet --disable-pip-version-check "ansible-core==$version"
fi
echo "== ready for the tests: pytest $(python3 -c 'import pytest; print(pytest.__version__)'), $(podman --version)"
