#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: orthanc_info
short_description: What a backup needs to know about a host's Orthanc
version_added: 0.1.0
description:
  - Reads the Orthanc configuration as Orthanc does (one file or a folder of C(*.json) files,
    JSON with comments, C(${VAR}) and C(${VAR:-default}) substitution, a key defined in two
    files is an error, relative paths taken from the configuration's folder).
  - Finds the index backend (SQLite, PostgreSQL, MySQL), where the files are stored, the index and
    storage folders, compression and plugins, and flags what this collection cannot back up safely.
  - Asks the REST API for the version, database schema version and statistics when Orthanc
    answers (and fails when it answers but refuses the credentials); otherwise reads the schema version from the SQLite index and the version from the
    C(Orthanc) program.
  - Never changes anything.
options:
  config_path:
    description: Orthanc's configuration file or folder.
    type: path
    default: /etc/orthanc
  timeout:
    description: Seconds to wait for the REST API.
    type: float
    default: 5
  environment:
    description:
      - Variables that Orthanc's service sees, used for C(${VAR}) substitution in the
        configuration. Without it, the module's own environment is used.
    type: dict
  orthanc_binary:
    description: The Orthanc program, asked for its version when the REST API does not answer.
    type: str
    default: Orthanc
  require_config:
    description:
      - When false, a missing configuration is reported (C(config_found=false)) instead of failing,
        as on a fresh host before a restore.
    type: bool
    default: true
  container:
    description:
      - The container (name or id) that runs Orthanc. The configuration is then the one named on
        Orthanc's own command line inside the container (whatever generated it), read with Orthanc's
        own environment; O(config_path) and O(environment) are ignored. The storage and index
        folders are reported as the host folders behind the container's volumes or bind mounts,
        and a folder on no volume is reported in RV(unsupported).
    type: str
  compose_project:
    description: A compose project whose service O(compose_service) runs Orthanc (found by the labels
      C(com.docker.compose.project) and C(com.docker.compose.service)), instead of O(container).
    type: str
  compose_file:
    description: The compose file the project was brought up with, instead of O(compose_project).
    type: path
  compose_service:
    description: The compose service that runs Orthanc.
    type: str
    default: orthanc
  container_engine:
    description: C(docker), C(podman) or C(auto) (every installed engine is asked; C(DOCKER_HOST) and
      C(CONTAINER_HOST) are honoured).
    type: str
    choices: [auto, docker, podman]
    default: auto
extends_documentation_fragment:
  - pacs.orthanc.rest
  - pacs.orthanc.rest.READ_ONLY
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Describe the Orthanc of this host
  pacs.orthanc.orthanc_info:
    config_path: /etc/orthanc
    url: http://127.0.0.1:8042
  register: orthanc

- name: Describe the Orthanc of a compose project (Docker or Podman)
  pacs.orthanc.orthanc_info:
    compose_project: pacs
    compose_service: orthanc
    url: http://127.0.0.1:8042
  register: orthanc

- name: Refuse what cannot be backed up
  ansible.builtin.assert:
    that: orthanc.unsupported | length == 0
    fail_msg: "{{ orthanc.unsupported | join('; ') }}"
"""

RETURN = r"""
backend:
  description: Where the index lives.
  type: str
  returned: always
  sample: sqlite
storage:
  description: Where the DICOM files live (C(filesystem), C(postgresql) or C(mysql)).
  type: str
  returned: always
  sample: filesystem
storage_directory:
  description: Absolute storage folder.
  type: str
  returned: always
  sample: /var/lib/orthanc/db-v6
index_directory:
  description: Absolute folder of the SQLite index.
  type: str
  returned: always
  sample: /var/lib/orthanc/db-v6
config_found:
  description: Whether the configuration exists (always true unless O(require_config=false)).
  type: bool
  returned: always
storage_owner:
  description: Owner, group and mode of the storage folder, or null when it does not exist.
  type: dict
  returned: always
  sample: {"owner": "orthanc", "group": "orthanc", "mode": "0750"}
config_files:
  description: The configuration files Orthanc reads, in order.
  type: list
  elements: str
  returned: always
running:
  description: Whether the REST API answered with Orthanc's version and statistics.
  type: bool
  returned: always
orthanc_state:
  description:
    - What C(GET /system) saw (C(answering), C(http error) or C(not answering)); an Orthanc that
      refuses the credentials (HTTP 401 or 403) fails the module, saying that it answered and refused
      them. See M(pacs.orthanc.orthanc_probe).
  type: str
  returned: always
orthanc_http_status:
  description: The HTTP status of that answer, or null when nothing answered.
  type: int
  returned: always
rest_error:
  description: Why the REST API gave no usable answer, or null.
  type: str
  returned: always
version:
  description: Orthanc's version, from the REST API or the program.
  type: str
  returned: always
  sample: 1.10.1
database_version:
  description: The database schema version, from the REST API or the SQLite index.
  type: str
  returned: always
  sample: "6"
plugin_versions:
  description:
    - The plugins Orthanc has loaded and their versions (C(GET /plugins), C(/plugins/<id>)), when the
      REST API answered; null otherwise.
  type: dict
  returned: always
  sample: {postgresql-index: "4.0", dicom-web: "1.13"}
statistics:
  description: C(GET /statistics) when the REST API answered, else empty.
  type: dict
  returned: always
index_lock_holder:
  description: PID of the process holding the SQLite index, or null.
  type: int
  returned: always
storage_compression:
  description: Whether StorageCompression is on (files are zlib data, not plain DICOM).
  type: bool
  returned: always
plugins:
  description: Plugins Orthanc loads, each with path, kind and role.
  type: list
  elements: dict
  returned: always
database:
  description: Connection settings of a database plugin, without any password.
  type: dict
  returned: when a database plugin is enabled
unsupported:
  description: What this collection cannot back up safely; a backup refuses to run while not empty.
  type: list
  elements: str
  returned: always
container:
  description:
    - For a container, what the engine and the container say - engine, id, name, status, image,
      image_id, image_digest, mounts, labels, compose_project, compose_service, compose_files,
      effective_config (the configuration Orthanc runs with, as a path inside the container),
      effective_config_files, orthanc_argv, volumes (what holds the storage and the index - role,
      path in the container, host_path, type, name), keep_folders (mount sources, which a restore
      empties and refills but never moves) and environment_names (names only, never values).
    - Null when no container is named.
  type: dict
  returned: always
warnings_found:
  description: Things worth knowing that do not stop a backup.
  type: list
  elements: str
  returned: always
"""

import os
import re
import urllib.error

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _config, _container, _probe, _rest, _sqlite
from ansible_collections.pacs.orthanc.plugins.module_utils._common import run_command, run_module


def find_container(p):
    """The container named by the module's options, or None when none is named."""
    if not (p["container"] or p["compose_project"] or p["compose_file"]):
        return None
    return _container.find_container(p["container_engine"], container=p["container"],
                                     compose_project=p["compose_project"], compose_file=p["compose_file"],
                                     compose_service=p["compose_service"])


def describe_host(module):
    p = module.params
    container = find_container(p)
    if container is not None:
        info = _config.describe_container(container)
        info["config_found"] = True
    elif not p["require_config"] and not os.path.exists(p["config_path"]):
        info = {"config_found": False, "config_path": p["config_path"], "backend": None, "storage": None,
                "warnings": [], "unsupported": [], "plugins": [], "index_file": ""}
    else:
        info = _config.describe(p["config_path"], p["environment"])
        info["config_found"] = True
    info.setdefault("container", None)
    info.update({"running": False, "version": None, "database_version": None, "plugin_versions": None,
                 "statistics": {},
                 "system": {}, "index_lock_holder": None, "rest_error": None})
    answer = _probe.ask(p["url"], p["username"], p["password"], p["timeout"])
    info.update({"orthanc_state": answer["state"], "orthanc_http_status": answer["http_status"]})
    if answer["state"] == _probe.REFUSED:
        raise _probe.refused_error(answer)
    if answer["state"] == _probe.ANSWERING:
        system = answer["system"]
        try:
            info["statistics"] = _rest.get(p["url"], "/statistics", p["username"], p["password"], p["timeout"])
            info.update({"running": True, "system": system, "version": system.get("Version"),
                         "database_version": str(system.get("DatabaseVersion")),
                         "plugin_versions": _rest.plugin_versions(p["url"], p["username"], p["password"],
                                                                  p["timeout"])})
        except urllib.error.HTTPError as exc:
            info["rest_error"] = f"Orthanc answered HTTP {exc.code} to GET /statistics"
        except (OSError, ValueError) as exc:
            info["rest_error"] = f"GET /statistics: {getattr(exc, 'reason', exc)}"
    elif answer["state"] == _probe.HTTP_ERROR:
        info["rest_error"] = _probe.sentence(answer)
    else:
        info["rest_error"] = f"nothing answers at {p['url']} ({answer['reason']})"
    if info["backend"] == "sqlite" and os.path.exists(info["index_file"]):
        info["index_lock_holder"] = _sqlite.lock_holder(info["index_file"])
        if info["database_version"] is None and info["index_lock_holder"] is None:
            info["database_version"] = _sqlite.read_summary(info["index_file"])["schema_version"]
    if info["version"] is None and container is not None:
        rc, out, _err = container.engine.exec(container, ["Orthanc", "--version"], "ask Orthanc its version",
                                              check=False)
        match = re.search(r"Orthanc\s+(\S+)", out) if rc == 0 else None
        info["version"] = match.group(1) if match else None
    elif info["version"] is None:
        binary = module.get_bin_path(p["orthanc_binary"]) if "/" not in p["orthanc_binary"] else p["orthanc_binary"]
        if binary:
            _rc, out, _err = run_command([binary, "--version"], "ask the Orthanc program its version", check=False)
            match = re.search(r"Orthanc\s+(\S+)", out)
            info["version"] = match.group(1) if match else None
    info["warnings_found"] = info.pop("warnings")
    for warning in info["warnings_found"]:
        module.warn(warning)
    info["changed"] = False
    return info


def main():
    module = AnsibleModule(
        argument_spec=dict(
            config_path=dict(type="path", default="/etc/orthanc"),
            **_rest.ARGUMENT_SPEC,
            timeout=dict(type="float", default=5),
            environment=dict(type="dict"),
            orthanc_binary=dict(type="str", default="Orthanc"),
            require_config=dict(type="bool", default=True),
            container=dict(type="str"),
            compose_project=dict(type="str"),
            compose_file=dict(type="path"),
            compose_service=dict(type="str", default="orthanc"),
            container_engine=dict(type="str", choices=["auto", "docker", "podman"], default="auto"),
        ),
        mutually_exclusive=[("container", "compose_project", "compose_file")],
        supports_check_mode=True,
    )
    run_module(module, describe_host)


if __name__ == "__main__":
    main()
