"""Running the collection's playbooks from tests and benchmarks, with real inventories."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]
COLLECTIONS = REPO / ".work" / "collections"
ANSIBLE_CFG = pathlib.Path(__file__).resolve().with_name("ansible.cfg")  # controller settings that cut its CPU
# The interpreter of the modules on the tests' managed hosts: the system's python3, as on a real
# Debian host (standard library only: a module that imported a package of the test environment
# would fail here as it would there), else the controller's. Debian's build also starts and
# compiles each module faster than a Python built without optimisations.
MODULE_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
BIN = pathlib.Path(sys.executable).parent
# The controller's commands: those of the virtual environment that scripts/setup.sh makes with
# Debian's /usr/bin/python3 (the same ansible-core as this Python's, on a Python built with
# optimisations: each playbook run costs less CPU: a backup of two small hosts 10.9 CPU-s instead of
# 12.4, ansible-playbook's start-up 0.36 instead of 0.53), else those beside this Python.
# A .work/controller of another ansible-core than this Python's is not used. PACS_TEST_CONTROLLER=
# <folder of ansible-playbook> chooses another one.
CONTROLLER_BIN = pathlib.Path(os.environ.get("PACS_TEST_CONTROLLER") or REPO / ".work" / "controller" / "bin")


def _release_file(folder: pathlib.Path) -> pathlib.Path | None:
    """ansible/release.py of the virtual environment whose commands are in ``folder`` (its bin/),
    None when there is not exactly one."""
    releases = sorted(folder.parent.glob("lib/python*/site-packages/ansible/release.py"))
    return releases[0] if len(releases) == 1 else None


def _same_ansible(folder: pathlib.Path) -> bool:
    """Whether the virtual environment of ``folder`` holds this Python's version of ansible-core."""
    if os.environ.get("PACS_TEST_CONTROLLER"):
        return True
    try:
        from ansible.release import __version__  # pylint: disable=import-outside-toplevel
    except ImportError:
        return True
    release = _release_file(folder)
    return release is not None and f"__version__ = '{__version__}'" in release.read_text()


def tool(name: str) -> str:
    """Ansible's command ``name`` of the controller's virtual environment, else installed beside
    this Python, not through a PATH shim (pyenv's costs a shell and a Python start per call), else
    from the PATH."""
    for folder in (CONTROLLER_BIN, BIN) if _same_ansible(CONTROLLER_BIN) else (BIN,):
        path = folder / name
        if os.access(path, os.X_OK):
            return str(path)
    return name


# tests/support/controller.py runs the commands, keeping the AnsiballZ payloads of the modules from
# one run to the next in ANSIBALLZ/<digest of the collection's plugins and of ansible-core>
# (~0.4 CPU-s saved per module that a run uses); PACS_TEST_ANSIBALLZ_CACHE=0: Ansible's own way.
CONTROLLER_SCRIPT = pathlib.Path(__file__).resolve().with_name("controller.py")
ANSIBALLZ = REPO / ".work" / "ansiballz"
_controllers: dict = {}


def _ansiballz_folder(script: pathlib.Path) -> pathlib.Path | None:
    """The payloads' folder of the ansible-core that runs ``script``, named after its version and
    every source file of the collection's plugins (a changed module gets a folder of its own)."""
    release = _release_file(script.parent)
    if release is None:
        return None
    digest = hashlib.sha256(str(release).encode() + b"\0" + release.read_bytes())
    plugins = REPO / "plugins"
    for path in sorted(plugins.rglob("*.py")):
        digest.update(str(path.relative_to(plugins)).encode() + b"\0" + path.read_bytes() + b"\0")
    return ANSIBALLZ / digest.hexdigest()[:20]


def controller(name: str) -> tuple:
    """(argv, environment) that run Ansible's command ``name`` for the tests."""
    if name not in _controllers:
        command, argv, env = tool(name), [tool(name)], {}
        if os.path.isabs(command) and os.environ.get("PACS_TEST_ANSIBALLZ_CACHE") != "0":
            with open(command, "rb") as script:
                first = script.readline()
            folder = _ansiballz_folder(pathlib.Path(command))
            if first.startswith(b"#!") and len(first.split()) == 1 and folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                argv = [first[2:].decode().strip(), str(CONTROLLER_SCRIPT), command]
                env = {"PACS_TEST_ANSIBALLZ_CACHE": str(folder)}
        _controllers[name] = (argv, env)
    return _controllers[name]


def link_collection() -> pathlib.Path:
    target = COLLECTIONS / "ansible_collections" / "pacs" / "orthanc"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_symlink():
        try:
            target.symlink_to(REPO)
        except FileExistsError:  # another pytest-xdist worker made it just now
            pass
    return COLLECTIONS


def local_host(server, backup_root, **extra) -> dict:
    """Host variables for an OrthancServer reached with the local connection."""
    hostvars = {
        "ansible_connection": "local",
        "ansible_python_interpreter": MODULE_PYTHON,
        "orthanc_config_path": str(server.config_path),
        "orthanc_url": server.url,
        "orthanc_backup_root": str(backup_root),
        "orthanc_stop_command": server.stop_command(),
        "orthanc_start_command": server.start_command(),
    }
    hostvars.update(extra)
    return hostvars


def write_inventory(path: pathlib.Path, hosts: dict, group: str = "orthanc") -> pathlib.Path:
    inventory = {"all": {"children": {group: {"hosts": hosts}}}}
    path.write_text(json.dumps(inventory, indent=2))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ANSIBLE_CFG),
        "ANSIBLE_COLLECTIONS_PATH": str(link_collection()),
        "ANSIBLE_HOST_KEY_CHECKING": "0",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0",
        "ANSIBLE_PYTHON_INTERPRETER": MODULE_PYTHON,
        "PYTHONUNBUFFERED": "1",
        # marks the processes of this run, the async modules that async_wrapper detaches too
        # (procs.play_processes)
        "PACS_TEST_PLAY": uuid.uuid4().hex,
    })
    return env


def run_module(module: str, args: dict, check: bool = False) -> dict:
    """Run one module of the collection on localhost (ad hoc); returns its result."""
    env = _env()
    env.update({"ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.minimal"})
    command, extra = controller("ansible")
    env.update(extra)
    argv = [*command, "localhost", "-c", "local", "-m", f"pacs.orthanc.{module}", "-a", json.dumps(args)]
    if check:
        argv.append("--check")
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=300, check=False)
    # minimal callback: "localhost | SUCCESS => {json}" (or CHANGED, FAILED!)
    try:
        marker = proc.stdout.index(" => {")
        result = json.loads(proc.stdout[marker + 4:])
        result["failed"] = proc.stdout[:marker].rstrip().endswith("FAILED!")
        result["_stderr"] = proc.stderr  # Ansible's own warnings (deprecations) go there
        return result
    except ValueError:
        raise AssertionError(f"no result from {module}: {proc.stdout}\n{proc.stderr}")


def run_playbook(inventory: pathlib.Path, playbook: str = "backup.yml", extra_vars: dict | None = None,
                 pipelining: bool = True, timeout: float = 600, popen: bool = False, verbosity: int = 0,
                 check: bool = False, limit: str | None = None):
    """Run playbooks/<playbook>; returns CompletedProcess (stdout+stderr in .stdout), or the
    Popen when ``popen`` is set."""
    env = _env()
    env["ANSIBLE_PIPELINING"] = "1" if pipelining else "0"
    command, extra = controller("ansible-playbook")
    env.update(extra)
    argv = [*command, "-i", str(inventory), str(REPO / "playbooks" / playbook)]
    if check:
        argv.append("--check")
    if limit:
        argv += ["--limit", limit]
    if verbosity:
        argv.append("-" + "v" * verbosity)
    if extra_vars:
        argv += ["-e", json.dumps(extra_vars)]
    if popen:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, check=False)
