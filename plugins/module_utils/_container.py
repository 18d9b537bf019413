# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one container engine library of pacs.orthanc: Docker or Podman, through their command-line
clients (run by ``_common.run_command`` / ``Program``), never through their sockets directly.

- ``Engine.choose(kind, ...)``: ``auto``, ``docker`` or ``podman``; ``DOCKER_HOST`` and
  ``CONTAINER_HOST`` (and ``CONTAINERS_CONF``) are honoured because the clients read them from the
  environment this module passes on (``Engine.env``).
- ``Engine.inspect(ref)``: a ``Container`` (state, host PID, environment, command, mounts, image and
  digest, labels, compose project and service).
- ``Engine.find(...)``: the one container named, or the one container of a compose service found by
  its labels (``com.docker.compose.project`` / ``com.docker.compose.service``, set by
  docker-compose, ``docker compose`` and podman-compose alike).
- ``Engine.exec_argv`` / ``Engine.exec``: run a program inside a container; secrets go through
  standard input or as ``-e NAME`` (the value taken from the client's environment), never on argv.
- ``Engine.stop`` / ``Engine.start``: that one container, with a stop timeout long enough that the
  engine never SIGKILLs Orthanc in the middle of a write. Nothing here ever runs ``down``, ``rm``
  or ``volume rm``.
- ``Container.host_path(path)``: the host path behind a path inside the container (by mount
  destination, longest match first), or None when the path is in the container's own layer.
- ``Container.process(name)``: a process inside the container (by default Orthanc) with its argv,
  read from the host's /proc when the engine runs on this host, else through ``exec``.
- ``Container.read_file(path)``: a file inside the container, through /proc/PID/root or ``exec cat``.
"""

from __future__ import annotations

import json
import os
import shutil

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_command

__metaclass__ = type

ENGINES = ("docker", "podman")
ENGINE_CHOICES = ("auto",) + ENGINES
# What the engines honour from the environment: passed on to every client and to the guardian.
ENGINE_VARIABLES = ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_CONFIG", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH",
                    "CONTAINER_HOST", "CONTAINER_CONNECTION", "CONTAINER_SSHKEY", "CONTAINERS_CONF",
                    "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF")
# Orthanc stops in a few seconds; a checkpoint of a large SQLite index may take minutes. The engine
# sends SIGKILL only after this many seconds (the engines' own default is 10).
STOP_TIMEOUT = 600
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_WORKDIR = "com.docker.compose.project.working_dir"
COMPOSE_FILES = "com.docker.compose.project.config_files"
COMPOSE_ONEOFF = "com.docker.compose.oneoff"
ORTHANC_PROGRAM = "Orthanc"


def _environment(overrides: dict | None = None) -> dict:
    """The engine variables of this process's environment, with ``overrides`` (None removes one)."""
    env = {name: os.environ[name] for name in ENGINE_VARIABLES if os.environ.get(name)}
    for name, value in (overrides or {}).items():
        if value in (None, ""):
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


class Container:
    """One container as the engine describes it (``inspect``), plus what is read from inside it."""

    def __init__(self, engine: "Engine", data: dict):
        self.engine = engine
        self.data = data
        config = data.get("Config") or {}
        state = data.get("State") or {}
        self.id = data.get("Id", "")
        self.name = (data.get("Name") or "").lstrip("/")
        self.status = state.get("Status", "")
        self.running = bool(state.get("Running"))
        self.pid = int(state.get("Pid") or 0)
        self.env = {}
        for item in config.get("Env") or []:
            name, _sep, value = str(item).partition("=")
            self.env[name] = value
        self.cmd = list(config.get("Cmd") or [])
        entry = config.get("Entrypoint") or []
        self.entrypoint = [entry] if isinstance(entry, str) else list(entry)
        self.labels = dict(config.get("Labels") or {})
        self.image = data.get("ImageName") or config.get("Image") or ""
        self.image_id = data.get("Image", "")
        self.image_digest = data.get("ImageDigest") or ""  # podman; docker: Engine.inspect fills it
        self.stop_timeout = config.get("StopTimeout")
        self.mounts = []
        for mount in data.get("Mounts") or []:
            self.mounts.append({"type": mount.get("Type", ""), "name": mount.get("Name") or "",
                                "source": mount.get("Source", ""), "destination": mount.get("Destination", ""),
                                "rw": bool(mount.get("RW", True))})

    # ----- compose
    @property
    def compose_project(self) -> str | None:
        return self.labels.get(COMPOSE_PROJECT)

    @property
    def compose_service(self) -> str | None:
        return self.labels.get(COMPOSE_SERVICE)

    @property
    def compose_working_dir(self) -> str | None:
        return self.labels.get(COMPOSE_WORKDIR)

    def compose_files(self) -> list:
        """The compose file(s) the project was brought up with, as absolute host paths."""
        files = [name.strip() for name in (self.labels.get(COMPOSE_FILES) or "").split(",") if name.strip()]
        base = self.compose_working_dir or ""
        return [os.path.normpath(os.path.join(base, name)) for name in files]

    # ----- paths
    def mount_for(self, path: str) -> dict | None:
        """The mount that holds ``path`` (a path inside the container): longest destination first."""
        path = os.path.normpath(path)
        best = None
        for mount in self.mounts:
            dest = os.path.normpath(mount["destination"])
            if path == dest or path.startswith(dest.rstrip("/") + "/"):
                if best is None or len(dest) > len(os.path.normpath(best["destination"])):
                    best = mount
        return best

    def host_path(self, path: str) -> str | None:
        """The host path behind ``path`` inside the container, or None if it is not on a mount."""
        mount = self.mount_for(path)
        if mount is None or not mount["source"]:
            return None
        rel = os.path.relpath(os.path.normpath(path), os.path.normpath(mount["destination"]))
        return os.path.normpath(mount["source"] if rel == "." else os.path.join(mount["source"], rel))

    # ----- inside the container
    def _proc_root(self) -> str | None:
        """/proc/PID/root of the container's first process when the engine runs on this host."""
        if not self.running or self.pid <= 0:
            return None
        root = f"/proc/{self.pid}/root"
        try:
            os.stat(os.path.join(root, "."))
        except OSError:
            return None
        return root

    def _host_descendants(self) -> list:
        """PIDs (host numbering) of the container's first process and all its descendants."""
        children: dict = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "r", encoding="utf-8", errors="replace") as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop(0)
            found.append(pid)
            todo.extend(sorted(children.get(pid, [])))
        return found

    def process(self, program: str = ORTHANC_PROGRAM) -> dict | None:
        """The first process inside the container whose program is ``program``: dict(pid (host
        PID, or None through exec), argv, cwd (inside the container), environ (dict, or None)).
        None when no such process runs."""
        step = f"find {program} in container {self.name}"
        if not self.running:
            raise PacsError(step, f"container {self.name} is not running ({self.status or 'no state'})")
        if self._proc_root():
            for pid in self._host_descendants():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        argv = [part.decode("utf-8", "replace") for part in handle.read().split(b"\0")[:-1]]
                    with open(f"/proc/{pid}/comm", "r", encoding="utf-8", errors="replace") as handle:
                        comm = handle.read().strip()
                except OSError:
                    continue
                if argv and (comm == program or os.path.basename(argv[0]) == program):
                    return {"pid": pid, "argv": argv, "cwd": self._proc_link(pid, "cwd"),
                            "environ": self._proc_environ(pid)}
            return None
        script = ('for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = "$1" ] || continue; '
                  'printf "%s\\n" "$(readlink $d/cwd)"; cat $d/cmdline; exit 0; done; exit 3')
        rc, out, _err = self.engine.exec(self, ["/bin/sh", "-c", script, "sh", program], step, check=False)
        if rc == 3:
            return None
        if rc != 0:
            raise PacsError(step, f"cannot look for {program} inside container {self.name} "
                            f"(exec exited with {rc}); the image needs /bin/sh and cat")
        cwd, _sep, cmdline = out.partition("\n")
        return {"pid": None, "argv": cmdline.split("\0")[:-1] if cmdline.endswith("\0") else cmdline.split("\0"),
                "cwd": cwd or "/", "environ": None}

    @staticmethod
    def _proc_link(pid: int, name: str) -> str:
        try:
            return os.readlink(f"/proc/{pid}/{name}")
        except OSError:
            return "/"

    @staticmethod
    def _proc_environ(pid: int) -> dict | None:
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                raw = handle.read()
        except OSError:
            return None
        env = {}
        for item in raw.split(b"\0"):
            if b"=" in item:
                name, _sep, value = item.decode("utf-8", "replace").partition("=")
                env[name] = value
        return env

    def list_dir(self, path: str) -> list | None:
        """Names in a folder inside the container (None when it is not a folder)."""
        root = self._proc_root()
        if root:
            full = os.path.join(root, path.lstrip("/"))
            return sorted(os.listdir(full)) if os.path.isdir(full) else None
        rc, out, _err = self.engine.exec(self, ["/bin/sh", "-c", '[ -d "$1" ] && ls -1A "$1"', "sh", path],
                                         f"list {path} in container {self.name}", check=False)
        return sorted(line for line in out.splitlines() if line) if rc == 0 else None

    def read_file(self, path: str) -> bytes:
        """A file inside the container (its bytes): through /proc/PID/root on this host, else exec cat."""
        step = f"read {path} in container {self.name}"
        root = self._proc_root()
        if root:
            try:
                with open(os.path.join(root, path.lstrip("/")), "rb") as handle:
                    return handle.read()
            except OSError as exc:
                raise PacsError(step, exc.strerror or str(exc))
        rc, out, err = self.engine.exec(self, ["cat", "--", path], step, check=False, binary=True)
        if rc != 0:
            raise PacsError(step, f"cat exited with {rc}: {err.strip()[-200:]}")
        return out

    def as_dict(self) -> dict:
        """What orthanc_info reports and the backup records (no environment values: secrets)."""
        return {"engine": self.engine.name, "id": self.id, "name": self.name, "status": self.status,
                "running": self.running, "image": self.image, "image_id": self.image_id,
                "image_digest": self.image_digest, "command": self.cmd, "entrypoint": self.entrypoint,
                "mounts": self.mounts, "labels": self.labels, "compose_project": self.compose_project,
                "compose_service": self.compose_service, "compose_working_dir": self.compose_working_dir,
                "compose_files": self.compose_files(), "stop_timeout": self.stop_timeout,
                "environment_names": sorted(self.env)}


class Engine:
    """One container engine's command-line client (``docker`` or ``podman``)."""

    def __init__(self, name: str, binary: str | None = None, env: dict | None = None):
        if name not in ENGINES:
            raise PacsError("choose container engine", f"unknown engine '{name}' (one of {', '.join(ENGINES)})")
        self.name = name
        self.binary = binary or shutil.which(name) or ""
        self.env = _environment(env)
        if not self.binary:
            raise PacsError("choose container engine", f"{name} is not installed on this host (no '{name}' on PATH)")

    def __repr__(self):
        return f"Engine({self.name})"

    # ----- choice
    @classmethod
    def available(cls, env: dict | None = None) -> list:
        return [cls(name, env=env) for name in ENGINES if shutil.which(name)]

    @classmethod
    def choose(cls, kind: str = "auto", env: dict | None = None) -> list:
        """The engine(s) to ask, in order. ``auto``: DOCKER_HOST set -> docker first, CONTAINER_HOST set
        -> podman first; otherwise every installed engine (docker, then podman)."""
        step = "choose container engine"
        if kind not in ENGINE_CHOICES:
            raise PacsError(step, f"orthanc_container_engine must be one of {', '.join(ENGINE_CHOICES)}, not '{kind}'")
        if kind != "auto":
            return [cls(kind, env=env)]
        merged = _environment(env)
        engines = cls.available(env)
        if not engines:
            raise PacsError(step, "neither docker nor podman is installed on this host")
        if merged.get("CONTAINER_HOST") and not merged.get("DOCKER_HOST"):
            engines.sort(key=lambda e: e.name != "podman")
        return engines

    # ----- running the client
    def argv(self, args: list) -> list:
        return [self.binary] + [str(arg) for arg in args]

    def run(self, args: list, step: str, data: bytes | None = None, env: dict | None = None, check: bool = True,
            timeout: float | None = 120, stdin=None, stdout=None):
        """Run the client with ``args``; (rc, stdout, stderr) as _common.run_command returns them.
        A client that cannot reach its daemon raises PacsError saying so."""
        full_env = dict(self.env)
        full_env.update(env or {})
        rc, out, err = run_command(self.argv(args), step, data=data, env=full_env, check=False, timeout=timeout,
                                   stdin=stdin, stdout=stdout)
        if rc != 0:
            text = err.strip()
            if _unreachable(text):
                where = self.env.get("DOCKER_HOST" if self.name == "docker" else "CONTAINER_HOST") or "its default socket"
                raise PacsError(step, f"{self.name} is not reachable at {where}: {_last_line(text)}")
            if check:
                raise PacsError(step, f"{self.name} {args[0]} exited with {rc}: {_last_line(text) or out.strip()[-300:]}")
        return rc, out, err

    def reachable(self) -> bool:
        try:
            rc, _out, _err = self.run(["version", "--format", "{{.Server.Version}}" if self.name == "docker"
                                       else "{{.Version}}"], "ask container engine", check=False, timeout=30)
        except PacsError:
            return False
        return rc == 0

    # ----- finding containers
    def inspect(self, ref: str, step: str = "inspect container") -> Container | None:
        """The container ``ref`` (name or id), or None if this engine has no such container."""
        rc, out, err = self.run(["container", "inspect", ref], step, check=False)
        if rc != 0:
            if "no such" in err.lower() or "not found" in err.lower():
                return None
            raise PacsError(step, f"{self.name} container inspect {ref} exited with {rc}: {_last_line(err)}")
        try:
            data = json.loads(out)
        except ValueError:
            raise PacsError(step, f"{self.name} container inspect {ref} did not print JSON")
        if not data:
            return None
        container = Container(self, data[0])
        if not container.image_digest and container.image_id:
            container.image_digest = self.image_digest(container.image_id)
        return container

    def image_digest(self, image: str) -> str:
        """The repository digest (``name@sha256:...``) of an image, or its id when it has none
        (an image built or imported locally)."""
        rc, out, _err = self.run(["image", "inspect", image], "inspect image", check=False)
        if rc != 0:
            return ""
        try:
            data = json.loads(out)[0]
        except (ValueError, IndexError, KeyError, TypeError):
            return ""
        digests = data.get("RepoDigests") or []
        if digests:
            return digests[0].split("@", 1)[-1]
        return data.get("Digest") or data.get("Id") or ""

    def list_ids(self, labels: dict, step: str) -> list:
        """Ids of the containers (running or not) carrying every label of ``labels``."""
        args = ["ps", "-a", "--no-trunc", "--format", "{{.ID}}"]
        for name, value in labels.items():
            args += ["--filter", f"label={name}={value}" if value is not None else f"label={name}"]
        _rc, out, _err = self.run(args, step)
        return [line.strip() for line in out.splitlines() if line.strip()]

    def compose_containers(self, service: str, project: str | None = None, compose_file: str | None = None,
                           step: str = "find compose service") -> list:
        """The containers of compose service ``service``, in project ``project`` or in the project
        brought up from ``compose_file`` (matched on the compose labels, not on names)."""
        labels = {COMPOSE_SERVICE: service}
        if project:
            labels[COMPOSE_PROJECT] = project
        found = []
        for cid in self.list_ids(labels, step):
            container = self.inspect(cid, step)
            if container is None or container.labels.get(COMPOSE_ONEOFF, "False").lower() == "true":
                continue
            if compose_file:
                wanted = os.path.realpath(compose_file)
                if wanted not in [os.path.realpath(name) for name in container.compose_files()]:
                    continue
            found.append(container)
        return found

    # ----- exec, stop, start
    def exec_argv(self, container, argv: list, interactive: bool = False, env_names=(), user: str | None = None,
                  workdir: str | None = None) -> list:
        """The client's argv to run ``argv`` inside ``container``. ``env_names``: variables passed as
        ``-e NAME`` (no value: the client takes it from its own environment, so a secret given
        in ``env`` of ``exec`` never appears on a command line)."""
        args = ["exec"]
        if interactive:
            args.append("-i")
        for name in env_names:
            if "=" in name:
                raise PacsError("build exec command", "pass environment values through env, not as NAME=VALUE")
            args += ["-e", name]
        if user:
            args += ["-u", user]
        if workdir:
            args += ["-w", workdir]
        ref = container.id if isinstance(container, Container) else str(container)
        return self.argv(args + [ref] + [str(arg) for arg in argv])

    def exec(self, container, argv: list, step: str, data: bytes | None = None, env: dict | None = None,
             check: bool = True, timeout: float | None = None, stdin=None, stdout=None, user: str | None = None,
             binary: bool = False):
        """Run ``argv`` inside ``container`` to its end: (rc, stdout, stderr). ``data`` or ``stdin``
        feed its standard input; ``env`` (secrets welcome) reaches it as ``-e NAME`` through the
        client's environment. ``binary``: stdout as bytes."""
        env = dict(env or {})
        full = self.exec_argv(container, argv, interactive=data is not None or stdin is not None,
                              env_names=sorted(env), user=user)
        run_env = dict(self.env)
        run_env.update(env)
        if binary:
            import tempfile  # pylint: disable=import-outside-toplevel
            with tempfile.TemporaryFile() as out_file:
                rc, _out, err = run_command(full, step, data=data, env=run_env, check=False, timeout=timeout,
                                            stdin=stdin, stdout=out_file)
                out_file.seek(0)
                out = out_file.read()
        else:
            rc, out, err = run_command(full, step, data=data, env=run_env, check=False, timeout=timeout,
                                       stdin=stdin, stdout=stdout)
        if rc != 0 and _unreachable(err):
            raise PacsError(step, f"{self.name} is not reachable: {_last_line(err)}")
        if check and rc != 0:
            raise PacsError(step, f"{argv[0]} in container {getattr(container, 'name', container)} exited with "
                            f"{rc}: {_last_line(err)}")
        return rc, out, err

    def stop_argv(self, container, timeout: int = STOP_TIMEOUT) -> list:
        ref = container.id if isinstance(container, Container) else str(container)
        return self.argv(["stop", "-t", str(int(timeout)), ref])

    def start_argv(self, container) -> list:
        ref = container.id if isinstance(container, Container) else str(container)
        return self.argv(["start", ref])

    def stop(self, container, timeout: int = STOP_TIMEOUT, step: str = "stop Orthanc's container") -> None:
        """Stop that one container; the engine waits up to ``timeout`` s for it to exit before SIGKILL."""
        self.run(self.stop_argv(container, timeout)[1:], step, timeout=timeout + 60)

    def start(self, container, step: str = "start Orthanc's container", timeout: float = 300) -> None:
        self.run(self.start_argv(container)[1:], step, timeout=timeout)

    def volume_mountpoint(self, name: str) -> str | None:
        rc, out, _err = self.run(["volume", "inspect", name], "inspect volume", check=False)
        if rc != 0:
            return None
        try:
            return json.loads(out)[0].get("Mountpoint")
        except (ValueError, IndexError, TypeError, AttributeError):
            return None


def _unreachable(text: str) -> bool:
    lowered = text.lower()
    return any(words in lowered for words in (
        "cannot connect to the docker daemon", "is the docker daemon running", "unable to connect to podman",
        "connection refused", "error during connect", "no such file or directory: unix"))


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def find_container(engine: str = "auto", container: str | None = None, compose_project: str | None = None,
                   compose_file: str | None = None, compose_service: str = "orthanc",
                   env: dict | None = None, step: str = "find Orthanc's container") -> Container:
    """The one container named (``container``) or the one container of a compose service, asked of
    the engine(s) ``engine`` selects. Clear errors: engine missing or unreachable, nothing found,
    several matches."""
    if not (container or compose_project or compose_file):
        raise PacsError(step, "name a container (orthanc_container) or a compose project "
                        "(orthanc_compose_project or orthanc_compose_file)")
    if compose_file and not os.path.isfile(compose_file):
        raise PacsError(step, f"no compose file at {compose_file}")
    engines = Engine.choose(engine, env)
    found, errors = [], []
    for candidate in engines:
        try:
            if container:
                one = candidate.inspect(container, step)
                found.extend([one] if one else [])
            else:
                found.extend(candidate.compose_containers(compose_service, compose_project, compose_file, step))
        except PacsError as exc:
            if engine != "auto":
                raise
            errors.append(exc.cause)
    what = (f"container '{container}'" if container else
            f"compose service '{compose_service}' of " +
            (f"project '{compose_project}'" if compose_project else f"the project of {compose_file}"))
    names = ", ".join(e.name for e in engines)
    if not found:
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise PacsError(step, f"{what} not found by {names}{detail}")
    if len(found) > 1:
        listed = ", ".join(f"{c.engine.name}:{c.name}" for c in found)
        raise PacsError(step, f"{what} matches {len(found)} containers ({listed}); name one with orthanc_container "
                        "(and orthanc_container_engine)")
    return found[0]


# ----- what a backup keeps of a container's configuration (inside the backup's config/)
EFFECTIVE = "effective"        # config/effective/<path in the container>: the files Orthanc runs with
ETC_ORTHANC = "etc-orthanc"    # config/etc-orthanc/: the container's /etc/orthanc (the entrypoint's sources)
SECRETS = "secrets"            # config/secrets/: the container's /run/secrets (Docker/compose secrets)
COMPOSE = "compose"            # config/compose/: the compose file(s) and .env of the project
DESCRIPTION = "container"      # config/container/: inspect.json, environment, image.json


def _write_private(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _copy_folder_inside(container: Container, inside: str, dest: str) -> list:
    """The files directly in folder ``inside`` of the container, into ``dest`` (0600)."""
    names = container.list_dir(inside) or []
    written = []
    for name in names:
        path = os.path.join(inside, name)
        try:
            data = container.read_file(path)
        except PacsError:
            continue  # a subfolder, or unreadable: Orthanc and the entrypoint read files only
        _write_private(os.path.join(dest, name), data)
        written.append(path)
    return written


def save_configuration(container: Container, effective_files: list, dest: str, orthanc_environ: dict | None) -> dict:
    """Write into ``dest`` (a backup's config/ folder) everything that makes up the configuration of
    the Orthanc in ``container``: the effective file(s) Orthanc runs with, the container's
    /etc/orthanc and /run/secrets, the compose file(s) and .env, the inspect output, Orthanc's
    environment and the image reference and digest. Every file 0600 (they hold passwords).
    Returns what was written, by kind."""
    saved = {"effective": [], "etc_orthanc": [], "secrets": [], "compose": [], "description": []}
    os.makedirs(dest, mode=0o700, exist_ok=True)
    os.chmod(dest, 0o700)
    for inside in effective_files:
        _write_private(os.path.join(dest, EFFECTIVE, inside.lstrip("/")), container.read_file(inside))
        saved["effective"].append(inside)
    saved["etc_orthanc"] = _copy_folder_inside(container, "/etc/orthanc", os.path.join(dest, ETC_ORTHANC))
    saved["secrets"] = _copy_folder_inside(container, "/run/secrets", os.path.join(dest, SECRETS))
    sources = list(container.compose_files())
    if container.compose_working_dir:
        sources.append(os.path.join(container.compose_working_dir, ".env"))
    for path in sources:
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                _write_private(os.path.join(dest, COMPOSE, os.path.basename(path)), handle.read())
            saved["compose"].append(path)
    described = os.path.join(dest, DESCRIPTION)
    _write_private(os.path.join(described, "inspect.json"), json.dumps(container.data, indent=2).encode())
    environ = orthanc_environ if orthanc_environ is not None else container.env
    _write_private(os.path.join(described, "environment"),
                   "".join(f"{name}={value}\n" for name, value in sorted(environ.items())).encode())
    image = {"engine": container.engine.name, "image": container.image, "image_id": container.image_id,
             "image_digest": container.image_digest, "container": container.name, "id": container.id,
             "compose_project": container.compose_project, "compose_service": container.compose_service,
             "compose_files": container.compose_files(), "compose_working_dir": container.compose_working_dir}
    _write_private(os.path.join(described, "image.json"), json.dumps(image, indent=2).encode())
    saved["description"] = ["inspect.json", "environment", "image.json"]
    return saved
