#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks need on a Debian 12 machine (as root):
# Debian's Orthanc, dcmtk, sqlite3 and rsync; ansible-core, pytest and pydicom from PyPI.
# Links this checkout as the collection pacs.orthanc under .work/collections.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in Orthanc:orthanc storescu:dcmtk sqlite3:sqlite3 rsync:rsync curl:curl mkfs.btrfs:btrfs-progs \
    podman:podman runc:runc catatonit:catatonit debootstrap:debootstrap sshd:openssh-server ssh:openssh-client; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import ansible, pytest, pydicom, molecule, molecule_plugins.podman, testinfra' >/dev/null 2>&1; then
  echo "== installing Python packages from requirements-test.txt"
  python3 -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
fi

mkdir -p .work/collections/ansible_collections/pacs
ln -sfn "$PWD" .work/collections/ansible_collections/pacs/orthanc
echo "== ready: $(Orthanc --version | sed -n 1p), $(ansible --version | sed -n 1p)"
