#!/usr/bin/env bash
# Installs what the demo (scripts/demo.sh) needs on a Debian 12 machine (as root), and nothing else:
# Debian's Orthanc, dcmtk (storescu: the demo stores a study over DICOM) and curl; ansible-core and
# pydicom from PyPI (requirements-demo.txt). Links this checkout as the collection pacs.orthanc
# under .work/collections. The tests need more: scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in Orthanc:orthanc storescu:dcmtk curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! python3 -c 'import ansible, pydicom' >/dev/null 2>&1; then
  echo "== installing Python packages from requirements-demo.txt"
  python3 -m pip install --quiet --disable-pip-version-check -r requirements-demo.txt
fi

mkdir -p .work/collections/ansible_collections/pacs
ln -sfn "$PWD" .work/collections/ansible_collections/pacs/orthanc
echo "== ready for the demo: $(Orthanc --version | sed -n 1p), $(ansible --version | sed -n 1p)"
