#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: orthanc_probe
short_description: Tell whether Orthanc answers, refuses the credentials, does not answer, or is not running
version_added: 0.2.0
description:
  - Asks C(GET /system) once. Any HTTP answer means Orthanc runs. C(answering) is a 200 with
    Orthanc's answer; C(refused) a 401 or 403 (it runs and refused the credentials, or none were
    given); C(http error) any other answer.
  - When nothing answers (connection refused, timeout), looks for the Orthanc processes started on
    O(config_path) (and the one holding O(index_file)). It is C(not answering) when one runs (or
    when that cannot be told), C(not running) when none is left.
  - The roles use it after a failure to say what Orthanc is doing; never changes anything and
    never fails because of what it finds.
options:
  config_path:
    description:
      - Orthanc's configuration file or folder, as given to the C(Orthanc) program; its processes
        are found by it. Without it, any Orthanc process on the host counts.
    type: path
  index_file:
    description: Orthanc's SQLite index; a process that holds it is Orthanc running.
    type: path
  timeout:
    description: Seconds to wait for the answer.
    type: float
    default: 5
  service_name:
    description: The service that runs Orthanc, for the command that starts it (RV(start_hint)).
    type: str
    default: orthanc
  start_command:
    description: The command that starts Orthanc when it is not a service, for RV(start_hint).
    type: str
extends_documentation_fragment:
  - pacs.orthanc.rest
  - pacs.orthanc.rest.READ_ONLY
  - pacs.orthanc.container
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Ask what Orthanc is doing
  pacs.orthanc.orthanc_probe:
    url: http://127.0.0.1:8042
    config_path: /etc/orthanc
  register: orthanc

- name: Say it
  ansible.builtin.debug:
    msg: "{{ orthanc.message }}"
"""

RETURN = r"""
state:
  description: C(answering), C(refused), C(http error), C(not answering) or C(not running).
  type: str
  returned: always
  sample: refused
orthanc_running:
  description: Whether Orthanc answered HTTP at all (C(answering), C(refused), C(http error)).
  type: bool
  returned: always
http_status:
  description: The HTTP status Orthanc answered, or null when nothing answered.
  type: int
  returned: always
  sample: 401
reason:
  description: The HTTP reason, or why nothing answered (C(Connection refused), C(no answer within 5 s)).
  type: str
  returned: always
pids:
  description: The Orthanc processes found when nothing answered; null when not looked for or when that cannot be told.
  type: list
  elements: int
  returned: always
url:
  description: The URL asked.
  type: str
  returned: always
credentials:
  description: Whether a username was sent.
  type: bool
  returned: always
start_hint:
  description: The command that starts Orthanc on this host.
  type: str
  returned: always
  sample: service orthanc start
message:
  description: One sentence on Orthanc's state, for a person.
  type: str
  returned: always
  sample: "Orthanc answered HTTP 401 at http://127.0.0.1:8042: it refused the credentials"
"""

import shlex

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _control, _probe, _rest, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module


def start_hint(service_name: str, start_command, container=None, container_engine=None) -> str:
    if container:
        engine = container_engine if container_engine in ("docker", "podman") else "docker"
        return f"{engine} start {container}"
    if start_command:
        return start_command
    try:
        argv = _control.service_argv(service_name, "start")
    except PacsError:
        return f"service {service_name} start"
    if argv[0].endswith(("/systemctl", "/service")):
        argv[0] = argv[0].rsplit("/", 1)[1]
    return shlex.join(argv)


def probe(module):
    p = module.params
    record = _probe.probe(p["url"], p["username"], p["password"], p["timeout"], p["config_path"], p["index_file"])
    record.pop("system", None)
    record["start_hint"] = start_hint(p["service_name"], p["start_command"], p["container"], p["container_engine"])
    record["message"] = _probe.sentence(record)
    record["changed"] = False
    return record


def main():
    module = AnsibleModule(
        argument_spec=dict(
            **_rest.ARGUMENT_SPEC,
            config_path=dict(type="path"),
            index_file=dict(type="path"),
            timeout=dict(type="float", default=5),
            service_name=dict(type="str", default="orthanc"),
            start_command=dict(type="str"),
            **_specs.CONTAINER,
        ),
        supports_check_mode=True,
    )
    run_module(module, probe)


if __name__ == "__main__":
    main()
