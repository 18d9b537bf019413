# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Offline readers of a dump (no database server): what Orthanc's index lists (resource counts,
attachments with their size and MD5, the schema version) and the size and MD5 of every file kept
in the database, from ``pg_restore --list`` and the SQL it writes, or from a mysqldump file.

Each reader is a stream of events, ``("resource", type)`` (or ``("resources", {type: count})``,
a table's resources counted at once), ``("attachment", uuid, size, md5)``,
``("property", property, value)``, ``("stored", uuid, size, md5)``: ``read_dump`` gathers them
into one summary, ``stream_dump`` passes the attachments and the files kept in the database on one
by one (for verification and the storage delta pass, which hold none of them in memory)."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

from ansible_collections.pacs.orthanc.plugins.module_utils._common import PIPE, PacsError, Program, os_error_cause, run_command
from ansible_collections.pacs.orthanc.plugins.module_utils._db import container as db_container
from ansible_collections.pacs.orthanc.plugins.module_utils._db.client import Client

__metaclass__ = type

# Orthanc's resource types in the database plugins' schema (0-based, unlike the SQLite index)
PLUGIN_RESOURCE_TYPES = {0: "patients", 1: "studies", 2: "series", 3: "instances"}
SCHEMA_VERSION_PROPERTY = "1"
PATCH_LEVEL_PROPERTY = "4"  # GlobalProperty_DatabasePatchLevel: the database plugins' revision of a schema


class _Listing:
    def __init__(self):
        self.counts = {name: 0 for name in PLUGIN_RESOURCE_TYPES.values()}
        self.attachments: dict = {}   # uuid -> (compressed size, compressed md5)
        self.stored: dict = {}        # uuid -> (size, md5) of files kept in the database
        self.schema_version = None
        self.patch_level = None

    def as_dict(self) -> dict:
        return {"counts": self.counts, "attachments": self.attachments, "stored": self.stored,
                "schema_version": self.schema_version, "patch_level": self.patch_level}

    def resource(self, kind) -> None:
        name = PLUGIN_RESOURCE_TYPES.get(int(kind))
        if name:
            self.counts[name] += 1

    def attachment(self, uuid, size, md5) -> None:
        self.attachments[uuid] = (int(size) if size is not None else 0, md5 or None)

    def global_property(self, prop, value) -> None:
        if str(prop) == SCHEMA_VERSION_PROPERTY:
            self.schema_version = str(value)
        elif str(prop) == PATCH_LEVEL_PROPERTY:
            self.patch_level = str(value)

    def take(self, event: tuple) -> None:
        kind = event[0]
        if kind == "attachment":
            self.attachment(*event[1:])
        elif kind == "resources":
            for resource_type, count in event[1].items():
                name = PLUGIN_RESOURCE_TYPES.get(int(resource_type)) if resource_type.isdigit() else None
                if name:
                    self.counts[name] += count
        elif kind == "resource":
            self.resource(event[1])
        elif kind == "property":
            self.global_property(*event[1:])
        elif kind == "stored":
            self.stored[event[1]] = tuple(event[2:])

    def consume(self, events) -> dict:
        for event in events:
            self.take(event)
        return self.as_dict()


def _pg_copy_field(value: bytes):
    """One field of a COPY row (bytes): None for NULL, else its text, escapes undone."""
    if value == b"\\N":
        return None
    text = value.decode("utf-8")
    if "\\" in text:
        text = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    return text


def read_pg_dump(path: str, with_contents: bool = True, bin_dir: str | None = None,
                 container: str | None = None) -> dict:
    """What a pg_dump archive holds, read with pg_restore (no server needed): resource counts,
    attachments, and the size and MD5 of every file stored as a large object. ``container``: the
    database container that made it, whose pg_restore reads it when it runs here (the archive
    streamed to it; its data read whole, as no list file can be handed to it)."""
    return _Listing().consume(_pg_dump_events(path, with_contents, bin_dir, container))


def _pg_dump_events(path: str, with_contents: bool, bin_dir: str | None, container: str | None = None):
    step = "read the dump"
    with db_container.reader(container, bin_dir, step) as client:
        if client.container is not None:
            rc, out, err = client.run("pg_restore", ["--list"], step, source=path, auth=False, timeout=600)
            if rc != 0:
                raise PacsError(step, f"pg_restore cannot read {path}: {client.explain(err)}")
            with client.start("pg_restore", ["--data-only", "-f", "-"], step, source=path, auth=False,
                              pipe=True) as running:
                yield from _pg_events(running.stdout, with_contents)
                if running.wait() != 0:
                    raise PacsError(step, f"pg_restore cannot read {path}: {client.explain(running.errors())}")
            return
    client = Client({"engine": "postgresql"}, bin_dir, step)
    pg_restore = client.tool("pg_restore")
    rc, out, err = run_command([pg_restore, "--list", path], step, check=False, timeout=600)
    if rc != 0:
        raise PacsError(step, f"pg_restore cannot read {path}: {' '.join(err.strip().splitlines()[-2:])}")
    wanted = []
    for line in out.splitlines():
        if re.search(r" TABLE DATA \S+ (resources|attachedfiles|globalproperties|storagearea) ", line):
            wanted.append(line)
        elif with_contents and " BLOBS " in line:
            wanted.append(line)
    with tempfile.NamedTemporaryFile("w", prefix="pacs-orthanc-list-", delete=False) as handle:
        handle.write("\n".join(wanted) + "\n")
        list_file = handle.name
    try:
        with Program([pg_restore, "-L", list_file, "-f", "-", path], step, stdout=PIPE) as program:
            yield from _pg_events(program.stdout, with_contents)
            if program.wait() != 0:
                raise PacsError(step, f"pg_restore cannot read {path}: "
                                f"{' '.join(program.errors().strip().splitlines()[-2:])}")
    finally:
        os.unlink(list_file)


def parse_pg_sql(lines, with_contents: bool = True) -> dict:
    """What the SQL that pg_restore writes of Orthanc's tables and large objects holds (lines as
    bytes): the COPY data of resources, attachedfiles, globalproperties and storagearea, and the
    lo_open / lowrite / lo_close calls of the large objects."""
    return _Listing().consume(_pg_events(lines, with_contents))


def _pg_events(lines, with_contents: bool):
    """The events of the SQL that pg_restore writes. The two tables with a row per instance are
    read by their columns' positions, only the fields needed decoded: the attachments one by one,
    the resources counted by type and handed on once their table ends (at 1 M instances, 2 M
    rows: a dict per row cost about 7 s of the 9.5 s this took, benchmarks/README.md)."""
    blob_of: dict = {}  # oid -> uuid
    blobs: dict = {}    # oid -> [size, md5]
    table = None
    columns: list = []
    current = None
    field = _pg_copy_field
    resources: dict = {}
    uuid_at = size_at = type_at = 0
    md5_at = None
    for raw in lines:
        if table is not None:
            if raw.startswith(b"\\.\n"):
                if table == "resources":
                    yield ("resources", resources)
                    resources = {}
                table = None
                continue
            fields = raw.rstrip(b"\n").split(b"\t")
            if table == "attachedfiles":
                yield ("attachment", field(fields[uuid_at]), field(fields[size_at]),
                       field(fields[md5_at]) if md5_at is not None else None)
            elif table == "resources":
                kind = fields[type_at]
                resources[kind] = resources.get(kind, 0) + 1
            else:
                row = dict(zip(columns, (field(value) for value in fields)))
                if table == "globalproperties":
                    yield ("property", row["property"], row["value"])
                elif table == "storagearea":
                    blob_of[row["content"]] = row["uuid"]
            continue
        if raw.startswith(b"COPY "):
            match = re.match(rb"COPY \S+?\.?(\w+) \(([^)]*)\) FROM stdin;", raw)
            if match:
                table = match.group(1).decode()
                columns = [c.strip().strip('"') for c in match.group(2).decode().split(",")]
                if table == "attachedfiles":
                    uuid_at, size_at = columns.index("uuid"), columns.index("compressedsize")
                    md5_at = columns.index("compressedhash") if "compressedhash" in columns else None
                elif table == "resources":
                    type_at = columns.index("resourcetype")
            continue
        if raw.startswith(b"SELECT pg_catalog.lo_open('"):
            oid = raw.split(b"'")[1].decode()
            current = blobs.setdefault(oid, [0, hashlib.md5()])
        elif raw.startswith(b"SELECT pg_catalog.lowrite(0, '\\x") and current is not None:
            data = bytes.fromhex(raw[len(b"SELECT pg_catalog.lowrite(0, '\\x"):].split(b"'")[0].decode())
            current[0] += len(data)
            current[1].update(data)
        elif raw.startswith(b"SELECT pg_catalog.lo_close("):
            current = None
    for oid, uuid in blob_of.items():
        if oid in blobs:
            yield ("stored", uuid, blobs[oid][0], blobs[oid][1].hexdigest())
        elif with_contents:
            yield ("stored", uuid, None, None)  # listed in StorageArea, its large object is missing


_MYSQL_TOKEN = re.compile(rb"'(?:[^'\\]|\\.)*'|0x[0-9A-Fa-f]*|NULL|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[(),;]")
_MYSQL_ESCAPES = {b"0": b"\0", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"Z": b"\x1a", b"b": b"\b"}


def _mysql_value(token: bytes):
    if token == b"NULL":
        return None
    if token.startswith(b"'"):
        body = re.sub(rb"\\(.)", lambda m: _MYSQL_ESCAPES.get(m.group(1), m.group(1)), token[1:-1])
        return body
    if token.startswith(b"0x"):
        return bytes.fromhex(token[2:].decode())
    return token.decode()


def read_mysql_dump(path: str, with_contents: bool = True) -> dict:
    """What a mysqldump file holds, parsed offline: resource counts, attachments, and the size
    and MD5 of every file stored in the StorageArea table."""
    return _Listing().consume(_mysql_events(path, with_contents))


def _mysql_events(path: str, with_contents: bool):
    step = "read the dump"
    tables = {"Resources", "AttachedFiles", "GlobalProperties"}
    if with_contents:
        tables.add("StorageArea")
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise PacsError(step, os_error_cause(exc))
    with handle:
        table = None
        row: list = []
        depth = 0
        for line in handle:
            if table is None:
                match = re.match(rb"INSERT INTO `(\w+)` VALUES", line)
                if not match or match.group(1).decode() not in tables:
                    continue
                table = match.group(1).decode()
                line = line[match.end():]
            for token in _MYSQL_TOKEN.findall(line):
                if token == b"(":
                    depth += 1
                    row = []
                elif token == b")":
                    depth -= 1
                    yield _mysql_event(table, row)
                elif token == b";" and depth == 0:
                    table = None
                    break
                elif token != b",":
                    row.append(_mysql_value(token))


def _mysql_event(table: str, row: list) -> tuple:
    text = [v.decode("utf-8") if isinstance(v, bytes) and table != "StorageArea" else v for v in row]
    if table == "Resources":
        return ("resource", text[1])
    if table == "AttachedFiles":
        return ("attachment", text[2], text[3], text[7] if len(text) > 7 else None)
    if table == "GlobalProperties":
        return ("property", text[0], text[1])
    uuid = row[0].decode("utf-8") if isinstance(row[0], bytes) else row[0]
    content = row[1] if isinstance(row[1], bytes) else b""
    return ("stored", uuid, len(content), hashlib.md5(content).hexdigest())


def read_dump(engine: str, path: str, with_contents: bool = True, bin_dir: str | None = None,
              container: str | None = None) -> dict:
    if engine == "postgresql":
        return read_pg_dump(path, with_contents, bin_dir, container)
    return read_mysql_dump(path, with_contents)


def stream_dump(engine: str, path: str, attachment, stored, with_contents: bool = True,
                bin_dir: str | None = None, container: str | None = None) -> dict:
    """What ``read_dump`` finds, with every attachment handed to ``attachment(uuid, size, md5 or
    None)`` and every file kept in the database to ``stored(uuid, size, md5)`` as they are read,
    instead of gathered (verification streams them into SQLite): returns the counts and the
    schema version and patch level, with empty ``attachments`` and ``stored``."""
    listing = _Listing()
    events = (_pg_dump_events(path, with_contents, bin_dir, container) if engine == "postgresql"
              else _mysql_events(path, with_contents))
    for event in events:
        kind = event[0]
        if kind == "attachment":
            attachment(event[1], int(event[2]) if event[2] is not None else 0, event[3] or None)
        elif kind == "stored":
            stored(*event[1:])
        else:
            listing.take(event)
    return listing.as_dict()
