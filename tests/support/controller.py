"""Runs ansible-playbook or ansible for the tests (tests/support/playbook.py), unchanged but for one
thing: the AnsiballZ payloads are kept from one run to the next.

    <python of ansible-core> tests/support/controller.py <path of ansible-playbook|ansible> ARGS...

Before a module runs, Ansible zips it with every module_utils file it imports (its "AnsiballZ
payload"), finding those by compiling each file's source: ~0.4 CPU-s for a module of this
collection (80 files, 0.8 MB of source), most of it compile(). Ansible keeps the payloads only for
one run (in its temporary folder ~/.ansible/tmp/ansible-local-*, made anew by every run), so each
playbook run of the tests built each module it used again. With PACS_TEST_ANSIBALLZ_CACHE set to a
folder, the payloads are kept there instead, as Ansible keeps them within a run (same files, same
lock); playbook.py names the folder after a digest of the collection's plugins and the controller's
ansible-core, so that a changed module never runs from an old payload. Everything else of the run
(the module arguments, the run's own temporary folder) is Ansible's as usual."""

from __future__ import annotations

import os
import sys

del sys.path[0]  # this folder: the tests' modules, not Ansible's


class _Constants:
    """ansible.constants as module_common sees it: the payloads' folder is the cache's."""

    def __init__(self, constants, folder: str):
        self._constants = constants
        self._folder = folder

    def __getattr__(self, name):
        return self._folder if name == "DEFAULT_LOCAL_TMP" else getattr(self._constants, name)


def main() -> int:
    command = sys.argv[1]
    if os.path.basename(command) == "ansible-playbook":
        from ansible.cli.playbook import main as cli  # pylint: disable=import-outside-toplevel
    elif os.path.basename(command) == "ansible":
        from ansible.cli.adhoc import main as cli  # pylint: disable=import-outside-toplevel
    else:
        raise SystemExit(f"controller.py: not an Ansible command: {command}")
    folder = os.environ.get("PACS_TEST_ANSIBALLZ_CACHE")
    if folder:
        from ansible import constants  # pylint: disable=import-outside-toplevel
        from ansible.executor import module_common  # pylint: disable=import-outside-toplevel
        module_common.C = _Constants(constants, folder)
    sys.argv = [command] + sys.argv[2:]
    return cli()


if __name__ == "__main__":
    sys.exit(main())
