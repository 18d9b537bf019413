#!/usr/bin/env bash
# ansible-test sanity on a copy of this checkout laid out as ansible_collections/pacs/orthanc.
# ansible-test downloads a get-pip script from the internet at its first run; here a stand-in
# installs pip 24.2 from PyPI's wheel instead. shellcheck is not installed: that test is skipped.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="$HOME/.ansible/test/cache"
mkdir -p "$cache"
if [ ! -f "$cache/get_pip_24_2.py" ]; then
  python3 -m pip download --quiet --disable-pip-version-check --no-deps pip==24.2 -d "$cache"
  cat > "$cache/get_pip_24_2.py" <<'PY'
"""Stand-in for get-pip.py: installs pip 24.2 from the wheel beside this file."""
import glob, os, sys
wheel = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pip-24.2-*.whl"))[0]
sys.path.insert(0, wheel)
from pip._internal.cli.main import main
args = [a for a in sys.argv[1:] if not a.startswith(("pip", "--no-setuptools", "--no-wheel"))]
sys.exit(main(["install", "--no-index", wheel] + args))
PY
fi
work="$repo/.work/sanity/ansible_collections/pacs/orthanc"
rm -rf "$work"
mkdir -p "$work"
# the files git tracks, as they are in the working tree
(cd "$repo" && git ls-files -z | rsync -a --from0 --files-from=- ./ "$work/")
cd "$work"
git init -q
git add -A >/dev/null
ansible-test sanity --python "$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  --skip-test shellcheck --color no 2>&1 | grep -vE "^(WARNING: Location|Collecting|  Downloading|Processing|Looking in|Requirement already)"

# ---- ansible-lint --profile production and the changelog (any finding fails) ----------------
# In a venv of their own (.work/lint-venv, from requirements-lint.txt) so that the ansible-core
# the tests use stays as it is. The skipped rules, and why, are in .ansible-lint.
cd "$repo"
lint_venv="$repo/.work/lint-venv"
if [ ! -f "$lint_venv/.installed" ] || [ requirements-lint.txt -nt "$lint_venv/.installed" ]; then
  rm -rf "$lint_venv"
  python3 -m venv "$lint_venv"
  if ! "$lint_venv/bin/pip" install --quiet --disable-pip-version-check -r requirements-lint.txt \
      > "$lint_venv/install.log" 2>&1; then
    grep -v "^WARNING: Location" "$lint_venv/install.log" >&2
    exit 1
  fi
  touch "$lint_venv/.installed"
fi
# its own home and collections path: ansible-lint installs the collection it lints into
# ~/.ansible/collections, where it would shadow (and be shadowed by) other copies of pacs.orthanc
mkdir -p "$repo/.work/lint-home"
HOME="$repo/.work/lint-home" ANSIBLE_COLLECTIONS_PATH="$repo/.ansible/collections" \
  PATH="$lint_venv/bin:$PATH" ansible-lint --nocolor -q
"$lint_venv/bin/antsibull-changelog" lint
echo "ansible-lint --profile production and antsibull-changelog lint: clean"
