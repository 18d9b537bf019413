#!/usr/bin/env bash
# Runs the molecule scenarios of extensions/molecule/ on podman containers (as root):
#   bash scripts/molecule.sh                  # every scenario (READY below): what CI runs
#   bash scripts/molecule.sh fleet           # one scenario, full `molecule test`
#   MOLECULE_COMMAND=converge bash scripts/molecule.sh fleet   # any molecule subcommand
#   MOLECULE_ANSIBLE_ARGS="-e x=y -vv" bash scripts/molecule.sh fleet   # passed to ansible-playbook
# Builds the image localhost/pacs-orthanc-debian12 first when it is missing or out of date
# (scripts/molecule-image.sh), and puts the containers.podman collection (which molecule's podman
# driver needs) into .work/collections, taken from PyPI's `ansible` package: Galaxy is not
# reachable here, and of that 50 MB package only containers/podman (under 1 MB) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

READY=(fleet)
ANSIBLE_PACKAGE=ansible==12.3.0        # its containers.podman supports ansible-core 2.19
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${READY[@]}")

for tool in podman runc debootstrap molecule; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run scripts/setup.sh" >&2; exit 1; }
done

export CONTAINERS_CONF=$PWD/extensions/molecule/containers.conf
export ANSIBLE_COLLECTIONS_PATH=$PWD/.work/collections
export ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0 PY_COLORS=0 NO_COLOR=1
mkdir -p .work/collections/ansible_collections/pacs
ln -sfn "$PWD" .work/collections/ansible_collections/pacs/orthanc

podman_collection=.work/collections/ansible_collections/containers/podman
if [ ! -f "$podman_collection/MANIFEST.json" ]; then
  echo "== containers.podman from PyPI's $ANSIBLE_PACKAGE"
  dl=$(mktemp -d)
  python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dl" "$ANSIBLE_PACKAGE"
  python3 - "$dl"/ansible-*.whl .work/collections <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "ansible_collections/containers/podman/"
with zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(prefix)]
    z.extractall(dest, members)
print(f"   {len(members)} files into {dest}/{prefix}")
PY
  rm -rf "$dl"
fi

t=$SECONDS
bash scripts/molecule-image.sh
echo "== image: $((SECONDS - t)) s"

failed=()
for scenario in "${scenarios[@]}"; do
  t=$SECONDS
  echo "== molecule ${MOLECULE_COMMAND:-test} -s $scenario"
  # shellcheck disable=SC2086  # MOLECULE_ANSIBLE_ARGS is split into words on purpose
  if molecule "${MOLECULE_COMMAND:-test}" -s "$scenario" ${MOLECULE_ANSIBLE_ARGS:+-- $MOLECULE_ANSIBLE_ARGS}; then
    echo "== scenario $scenario passed in $((SECONDS - t)) s"
  else
    echo "== scenario $scenario FAILED after $((SECONDS - t)) s"
    failed+=("$scenario")
  fi
done
[ ${#failed[@]} -eq 0 ] || { echo "== failed scenarios: ${failed[*]}" >&2; exit 1; }
