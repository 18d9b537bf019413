#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: orthanc_control
short_description: Stop or start Orthanc and wait until it really is stopped or answering
version_added: 0.1.0
description:
  - C(stopped) stops Orthanc through its service or a given command, then waits until its REST
    API no longer answers and no process holds its SQLite index (naming the process that still
    does when O(timeout) runs out).
  - C(started) starts Orthanc unless it answers already, then waits until its REST API answers.
    Orthanc that still answers is given O(grace) seconds to finish a stop in progress before it
    is taken to be running.
  - Without O(command) and without systemd, the service's init script stops Orthanc. When that
    script stops by program rather than by PID file (Debian's C(/etc/init.d/orthanc) runs
    C(start-stop-daemon --stop --exec /usr/sbin/Orthanc)), it would also end every other process
    of that program on the host, private instances and Orthancs in containers included, and
    nothing would start them again. C(stopped) then refuses, in check mode too, and stops nothing,
    when such processes run other than this Orthanc (the one in the script's PID file, the one
    listening on O(url)'s port when that URL is local, the holder of O(index_file)'s lock); the message names them (PID and command line, or another mount
    namespace) and the command that stops only this Orthanc, and the result lists their PIDs in
    C(bystanders).
  - Any HTTP answer counts as answering, a 401 or 403 too. Such an Orthanc runs and refuses the
    credentials; a warning says so, and RV(orthanc_state) is C(refused).
  - Both return the time they began and ended, measured on the host, so that the downtime of a
    backup is measured where it happens.
options:
  state:
    description: C(stopped) or C(started).
    type: str
    choices: [stopped, started]
    required: true
  service_name:
    description: The service that runs Orthanc, used when no command is given (C(systemctl) with systemd, else C(service)).
    type: str
    default: orthanc
  command:
    description: Shell command that stops (state C(stopped)) or starts (state C(started)) Orthanc instead of the service.
    type: str
  index_file:
    description: With C(stopped), Orthanc's SQLite index, whose lock must be released.
    type: path
  timeout:
    description: Seconds to wait for Orthanc to stop or to answer.
    type: float
    default: 60
  grace:
    description: With C(started), seconds an answering Orthanc is given to finish stopping.
    type: float
    default: 3
attributes:
  check_mode:
    support: full
    description: Says whether it would stop or start Orthanc; does neither.
extends_documentation_fragment:
  - pacs.orthanc.rest
  - pacs.orthanc.container
author:
  - pacs.orthanc developers (@pacs-orthanc)
"""

EXAMPLES = r"""
- name: Stop Orthanc and wait for its index
  pacs.orthanc.orthanc_control:
    state: stopped
    index_file: /var/lib/orthanc/db-v6/index

- name: Start a private instance with its own command
  pacs.orthanc.orthanc_control:
    state: started
    command: /opt/orthanc/start.sh
    url: http://127.0.0.1:8043

- name: Start Orthanc's container (docker or podman, whichever has it)
  pacs.orthanc.orthanc_control:
    state: started
    container: orthanc-orthanc-1
"""

RETURN = r"""
began_at:
  description: When the stop or start began (UTC, ISO 8601).
  type: str
  returned: always
began_ts:
  description: The same as seconds since the epoch.
  type: float
  returned: always
ended_at:
  description: When Orthanc was stopped, or answered (UTC, ISO 8601).
  type: str
  returned: always
ended_ts:
  description: The same as seconds since the epoch.
  type: float
  returned: always
seconds:
  description: How long it took.
  type: float
  returned: always
orthanc_state:
  description:
    - What the last look at Orthanc's REST API saw (C(answering), C(refused), C(http error),
      C(not answering)); see M(pacs.orthanc.orthanc_probe).
  type: str
  returned: when Orthanc's API was asked
orthanc_http_status:
  description: The HTTP status of that last answer, or null when nothing answered.
  type: int
  returned: when Orthanc's API was asked
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pacs.orthanc.plugins.module_utils import _control, _rest, _specs
from ansible_collections.pacs.orthanc.plugins.module_utils._common import run_module


def control(module):
    p = module.params
    controller = _control.Controller(p["url"], p["username"], p["password"], p["service_name"],
                                     stop_command=p["command"], start_command=p["command"],
                                     container=p["container"], container_engine=p["container_engine"])
    if p["state"] == "stopped":
        return controller.stop(p["index_file"], p["timeout"], module.check_mode)
    result = controller.start(p["timeout"], p["grace"], module.check_mode)
    if not module.check_mode:
        _control.release_guardian(p["url"])  # a guardian left by a killed stopped_capture may go
    refused = controller.refused()
    if refused is not None:  # started, and it runs: but what comes next cannot use its API
        module.warn(f"Orthanc runs, but {refused.cause}")
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["stopped", "started"], required=True),
            service_name=dict(type="str", default="orthanc"),
            command=dict(type="str"),
            **_rest.ARGUMENT_SPEC,
            index_file=dict(type="path"),
            timeout=dict(type="float", default=60),
            grace=dict(type="float", default=3),
            **_specs.CONTAINER,
        ),
        supports_check_mode=True,
    )
    run_module(module, control)


if __name__ == "__main__":
    main()
