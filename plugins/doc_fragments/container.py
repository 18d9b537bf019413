# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """Orthanc in a container, stopped and started alone (argument spec: _specs.CONTAINER)."""

    DOCUMENTATION = r"""
options:
  container:
    description:
      - The container (name or id) that runs Orthanc. When set, Orthanc is stopped and started as
        that one container (C(docker stop -t N) / C(podman stop -t N), then C(start)), never with
        C(down); the engine waits at least 600 s before it would SIGKILL Orthanc. Service names and
        commands are then ignored.
      - The engine's client honours C(DOCKER_HOST) and C(CONTAINER_HOST) from the module's environment.
    type: str
  container_engine:
    description: The engine of O(container); C(auto) asks every installed engine.
    type: str
    choices: [auto, docker, podman]
    default: auto
"""
