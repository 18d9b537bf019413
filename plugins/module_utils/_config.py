# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading an Orthanc configuration as Orthanc itself reads it.

A configuration is one JSON file or a folder whose ``*.json`` files are all loaded (not
subfolders). JSON may hold ``//`` and ``/* */`` comments; ``${VAR}`` and ``${VAR:-default}``
are replaced from the environment before parsing; a top-level key in two files is an error;
relative paths are taken from the folder of the configuration."""

from __future__ import annotations

import json
import os
import re

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, owner_of

__metaclass__ = type

STEP = "read Orthanc configuration"

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Plugins recognised by the basename of their shared library (without lib prefix and suffix).
# role: index / storage plugins change where data lives; "other" plugins do not.
KNOWN_PLUGINS = {
    "orthancpostgresqlindex": ("postgresql", "index"),
    "orthancpostgresqlstorage": ("postgresql", "storage"),
    "orthancpostgresql": ("postgresql", "index+storage"),
    "orthancmysqlindex": ("mysql", "index"),
    "orthancmysqlstorage": ("mysql", "storage"),
    "orthancmysql": ("mysql", "index+storage"),
    "orthancodbcindex": ("odbc", "index"),
    "orthancodbcstorage": ("odbc", "storage"),
    "orthancawss3storage": ("aws-s3", "storage"),
    "orthancazureblobstorage": ("azure-blob", "storage"),
    "orthancgooglecloudstorage": ("google-cloud", "storage"),
    "advancedstorage": ("advanced-storage", "storage"),
    "orthancadvancedstorage": ("advanced-storage", "storage"),
    "delayeddeletion": ("delayed-deletion", "other"),
}
DATABASE_SECTIONS = {"postgresql": "PostgreSQL", "mysql": "MySQL", "odbc": "Odbc"}


def strip_comments(text: str) -> str:
    """Remove // and /* */ comments outside JSON strings, keeping line numbers intact."""
    out = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
            continue
        if c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("a /* comment is never closed")
            out.append("\n" * text.count("\n", i, end))
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def substitute(text: str, environ: dict, missing: list) -> str:
    def repl(match):
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        missing.append(name)
        return ""
    return _VARIABLE.sub(repl, text)


def _parse_file(path: str, environ: dict, missing: list) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            raw = handle.read()
    except OSError as exc:
        raise PacsError(STEP, f"cannot read {path}: {exc.strerror}")
    except UnicodeDecodeError:
        raise PacsError(STEP, f"{path} is not UTF-8 text")
    try:
        data = json.loads(strip_comments(substitute(raw, environ, missing)))
    except ValueError as exc:
        raise PacsError(STEP, f"{path} is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise PacsError(STEP, f"{path} does not hold a JSON object")
    return data


def load_configuration(config_path: str, environ: dict | None = None) -> dict:
    """Load a configuration file or folder. Returns dict(path, base_dir, files, values,
    missing_variables)."""
    environ = dict(os.environ if environ is None else environ)
    path = os.path.abspath(config_path)
    missing: list = []
    if os.path.isdir(path):
        try:
            names = sorted(name for name in os.listdir(path)
                           if name.lower().endswith(".json") and os.path.isfile(os.path.join(path, name)))
        except OSError as exc:
            raise PacsError(STEP, f"cannot list {path}: {exc.strerror}")
        if not names:
            raise PacsError(STEP, f"no *.json file in the configuration folder {path}")
        files = [os.path.join(path, name) for name in names]
        base_dir = path
    elif os.path.isfile(path):
        files = [path]
        base_dir = os.path.dirname(path)
    else:
        raise PacsError(STEP, f"no Orthanc configuration at {path} (neither a file nor a folder)")
    values: dict = {}
    origin: dict = {}
    for name in files:
        for key, value in _parse_file(name, environ, missing).items():
            if key in values:
                raise PacsError(STEP, f"the key '{key}' is defined both in {origin[key]} and in {name}")
            values[key] = value
            origin[key] = name
    return {"path": path, "base_dir": base_dir, "files": files, "values": values,
            "missing_variables": sorted(set(missing))}


def resolve_path(base_dir: str, value: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _plugin_key(filename: str) -> str:
    base = os.path.basename(filename)
    base = base.split(".so")[0].split(".dll")[0].split(".dylib")[0]
    if base.startswith("lib"):
        base = base[3:]
    return base.lower()


def list_plugins(values: dict, base_dir: str, root: str = "") -> list:
    """The shared libraries that Orthanc would load from ``Plugins``: files, and the shared
    libraries directly inside listed folders. ``root``: where the file system Orthanc sees is
    (a container's /proc/PID/root); the paths returned are as Orthanc sees them."""
    found = []
    entries = values.get("Plugins", [])
    if not isinstance(entries, list):
        raise PacsError(STEP, "'Plugins' must be a list of paths")
    for entry in entries:
        if not isinstance(entry, str):
            raise PacsError(STEP, "'Plugins' must be a list of paths")
        path = resolve_path(base_dir, entry)
        seen = root + path if root else path
        if os.path.isdir(seen):
            for name in sorted(os.listdir(seen)):
                full = os.path.join(path, name)
                if os.path.isfile(os.path.join(seen, name)) and re.search(r"\.(so(\.[0-9.]+)?|dll|dylib)$", name):
                    found.append(full)
        elif os.path.exists(seen):
            found.append(path)
        else:
            found.append(path)  # Orthanc fails to start on a missing plugin; still report it
    return found


def _enabled(section: dict, key: str) -> bool:
    value = section.get(key, False)
    return value is True or (isinstance(value, str) and value.lower() == "true")


def describe(config_path: str, environ: dict | None = None, base_dir: str | None = None, root: str = "",
             conf: dict | None = None) -> dict:
    """Everything a backup needs to know from the configuration alone. ``base_dir`` resolves
    relative paths from another folder (a configuration read from a backup, for its target).
    ``root``: the file system Orthanc sees (a container's), where plugins are looked for; ``conf``:
    an already loaded configuration (load_configuration's result)."""
    conf = conf or load_configuration(config_path, environ)
    values, base_dir = conf["values"], base_dir or conf["base_dir"]
    warnings: list = []
    unsupported: list = []
    for name in conf["missing_variables"]:
        warnings.append(f"environment variable {name} is not set; it was replaced by an empty string")

    # an empty path is most often a ${VAR} that the service's environment sets and ours does not
    unset = ""
    if conf["missing_variables"]:
        unset = (f" (not set for this module: {', '.join(conf['missing_variables'])}; give the values "
                 "that Orthanc's service sees in orthanc_config_environment)")
    storage_value = values.get("StorageDirectory", "OrthancStorage")
    if not isinstance(storage_value, str) or not storage_value:
        raise PacsError(STEP, f"'StorageDirectory' must be a non-empty string{unset}")
    index_value = values.get("IndexDirectory", storage_value)
    if not isinstance(index_value, str) or not index_value:
        raise PacsError(STEP, f"'IndexDirectory' must be a non-empty string{unset}")
    storage_dir = resolve_path(base_dir, storage_value)
    index_dir = resolve_path(base_dir, index_value)

    plugins = []
    for path in list_plugins(values, base_dir, root):
        known = KNOWN_PLUGINS.get(_plugin_key(path))
        plugins.append({"path": path, "exists": os.path.exists(root + path if root else path),
                        "kind": known[0] if known else "other",
                        "role": known[1] if known else "other"})
    loaded = {p["kind"] for p in plugins}

    backend = "sqlite"
    storage = "filesystem"
    database = None
    for kind, section_name in DATABASE_SECTIONS.items():
        section = values.get(section_name)
        if not isinstance(section, dict):
            continue
        index_on, storage_on = _enabled(section, "EnableIndex"), _enabled(section, "EnableStorage")
        if not (index_on or storage_on):
            continue
        if kind not in loaded:
            warnings.append(f"{section_name}.EnableIndex/EnableStorage is true but no {section_name} "
                            "plugin is listed in 'Plugins': Orthanc ignores that section")
            continue
        if index_on:
            if backend != "sqlite":
                raise PacsError(STEP, f"two database index plugins are enabled ({backend} and {kind})")
            backend = kind
        if storage_on:
            storage = kind
        shown = ("Host", "Port", "Database", "Username", "UnixSocket", "EnableSsl", "Lock", "Schema")
        database = {key: section[key] for key in shown if key in section}
        database["engine"] = kind
        database["password_set"] = bool(section.get("Password"))
        database["connection_uri_set"] = bool(section.get("ConnectionUri"))
    for plugin in plugins:
        if plugin["role"] == "storage" and plugin["kind"] not in DATABASE_SECTIONS:
            unsupported.append(f"storage plugin {plugin['path']} ({plugin['kind']}) keeps files where "
                               "this collection cannot back them up")
        if plugin["kind"] == "odbc":
            unsupported.append(f"ODBC plugin {plugin['path']}: ODBC databases are not supported")
        if plugin["kind"] == "delayed-deletion":
            warnings.append("DelayedDeletion plugin: files queued for deletion stay in the storage "
                            "folder and are reported as orphans")
        if not plugin["exists"]:
            warnings.append(f"plugin {plugin['path']} does not exist: Orthanc will not start with it")
    if storage in ("postgresql", "mysql") and backend == "sqlite":
        unsupported.append(f"files in {storage} with a SQLite index: the two cannot be captured consistently "
                           "together; use the database for the index too")
    for key in ("MaximumStorageSize", "MaximumPatientCount"):
        if values.get(key, 0) not in (0, None, "0"):
            warnings.append(f"{key} is set: Orthanc recycles (deletes) old patients when it is reached")

    return {
        "storage_owner": owner_of(storage_dir) if not root and os.path.exists(storage_dir) else None,
        "config_path": conf["path"],
        "config_is_folder": os.path.isdir(conf["path"]),
        "config_files": conf["files"],
        "name": values.get("Name", "MyOrthanc"),
        "http_port": values.get("HttpPort", 8042),
        "dicom_port": values.get("DicomPort", 4242),
        "storage_directory": storage_dir,
        "index_directory": index_dir,
        "index_file": os.path.join(index_dir, "index"),
        "storage_compression": bool(values.get("StorageCompression", False)),
        "store_md5": bool(values.get("StoreMD5ForAttachments", True)),
        "backend": backend,
        "storage": storage,
        "database": database,
        "plugins": plugins,
        "authentication_enabled": bool(values.get("AuthenticationEnabled", False)),
        "warnings": warnings,
        "unsupported": unsupported,
    }


def orthanc_config_argument(argv: list) -> str | None:
    """The configuration (file or folder) named on Orthanc's command line: its last argument that
    is not an option; None when Orthanc runs without one (its built-in defaults)."""
    named = [arg for arg in argv[1:] if not arg.startswith("-")]
    return named[-1] if named else None


def describe_container(container) -> dict:
    """``describe`` for the Orthanc running in ``container`` (a _container.Container): the
    configuration named on Orthanc's own command line inside it (whatever produced it: an
    entrypoint that merges /etc/orthanc/*.json and ORTHANC__ variables, a bind-mounted file, the
    image's own), read through the container's file system with Orthanc's own environment for
    ${VAR}; its storage and index folders mapped to host folders through the container's mounts
    (by destination). A folder Orthanc writes to that is on no volume is refused (``unsupported``):
    it lives in the container's own layer and goes with the next ``rm``."""
    step = "read Orthanc's configuration in its container"
    where = f"{container.engine.name} container {container.name}"
    if not container.running:
        raise PacsError(step, f"{where} is not running ({container.status or 'no state'}): start it, so that "
                        "the configuration Orthanc runs with can be read")
    process = container.process()
    if process is None:
        raise PacsError(step, f"no Orthanc process runs in {where}")
    if process["pid"] is None or container._proc_root() is None:
        raise PacsError(step, f"{where} runs on another host ({container.engine.name} is remote): run the backup "
                        "on the host where the container and its volumes are")
    root = f"/proc/{process['pid']}/root"
    cwd = process["cwd"] or "/"
    named = orthanc_config_argument(process["argv"])
    environ = process["environ"] if process["environ"] is not None else dict(container.env)
    if named is None:
        conf = {"path": None, "base_dir": cwd, "files": [], "values": {}, "missing_variables": []}
    else:
        inside = os.path.normpath(os.path.join(cwd, named))
        conf = load_configuration(root + inside, environ)
        # as Orthanc sees them (inside the container), not through /proc
        conf["files"] = [name[len(root):] for name in conf["files"]]
        conf["path"] = inside
        conf["base_dir"] = conf["base_dir"][len(root):] or "/"
    info = describe(conf["path"] or cwd, environ, base_dir=conf["base_dir"], root=root, conf=conf)
    info["config_path"] = conf["path"]
    info["config_is_folder"] = bool(conf["path"]) and os.path.isdir(root + conf["path"])
    inside_paths = {"storage": info["storage_directory"], "index": info["index_directory"]}
    needed = []
    if info["storage"] == "filesystem":
        needed.append("storage")
    if info["backend"] == "sqlite":
        needed.append("index")
    volumes = []
    for role in ("storage", "index"):
        path = inside_paths[role]
        mount = container.mount_for(path)
        host = container.host_path(path) if mount and mount["type"] in ("volume", "bind") else None
        if role in needed:
            if host is None:
                kind = f"a {mount['type']} mount" if mount else "no volume"
                info["unsupported"].append(
                    f"Orthanc's {role} folder {path} in {where} is on {kind}: it lives in the container's own "
                    f"layer (or memory) and would be lost by the next 'rm' of the container; put it on a volume "
                    f"(e.g. -v orthanc-db:{path})")
            elif not mount["rw"]:
                info["unsupported"].append(f"Orthanc's {role} folder {path} in {where} is on a read-only mount")
            else:
                volumes.append({"role": role, "path": path, "host_path": host, "type": mount["type"],
                                "name": mount["name"], "destination": mount["destination"],
                                "source": mount["source"]})
        info[f"{role}_directory_in_container"] = path
        info[f"{role}_directory"] = host or path
    info["index_file"] = os.path.join(info["index_directory"], "index")
    if info["storage"] == "filesystem" and os.path.isdir(info["storage_directory"]) and info["storage_directory"] != \
            inside_paths["storage"]:
        info["storage_owner"] = owner_of(info["storage_directory"])
    record = container.as_dict()
    record.update({"orthanc_pid": process["pid"], "orthanc_argv": process["argv"], "orthanc_cwd": cwd,
                   "effective_config": conf["path"], "effective_config_files": conf["files"], "volumes": volumes,
                   "keep_folders": sorted({v["source"] for v in volumes}),
                   # what a restore into this container needs (backup_restore's container option)
                   "described": {key: info[key] for key in ("backend", "storage", "index_directory",
                                                            "storage_directory")}})
    info["container"] = record
    return info
