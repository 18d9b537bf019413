# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The batches of a fleet backup: a canary first, never two members of one HA group at once."""

from __future__ import annotations

from collections import deque

DOCUMENTATION = r"""
name: backup_plan
short_description: Plan the batches of a fleet backup (a canary first, HA groups never at once)
version_added: 0.1.0
description:
  - Takes the hosts of a run (in inventory order), their variables and the batch sizes, and
    returns the batches in which the playbook C(pacs.orthanc.backup) backs them up, one batch after
    the other.
  - Two members of one HA group (hosts with the same C(orthanc_ha_group)) are never in the same
    batch, whatever the number of members. Hosts without C(orthanc_ha_group) (or with an empty one)
    belong to no group.
  - The first host (in inventory order) is the canary, always in the first batch.
  - Each batch holds at most its size (the sizes of I(batches), the last one repeated). Within
    that limit a batch takes one waiting member of each HA group that has the most members still
    waiting, then the hosts of smaller groups and without group, in inventory order; so a large
    group spreads over the run instead of trailing at its end, and the run takes as few batches as
    the sizes and the groups allow. A batch may be smaller than its size when only members of groups
    already in it are left; no batch is empty.
  - Within each batch, and for the members of each group, hosts keep their inventory order.
positional: _input, hostvars, batches, max_fail_percentage
options:
  _input:
    description: The hosts of the run, in inventory order (C(ansible_play_hosts_all)).
    type: list
    elements: str
    required: true
  hostvars:
    description: The variables of every host (C(hostvars)); only C(orthanc_ha_group) is read.
    type: dict
    required: true
  batches:
    description:
      - The batch sizes, as Ansible's C(serial) takes them (C(orthanc_backup_batches)) - a number
        of hosts, or a percentage (C("25%")) of all the hosts of the run, rounded down and at
        least 1; the last size is repeated until every host is in a batch. A size of 0 or less,
        or an empty list, means all the remaining hosts (still one member per HA group).
      - A single number or percentage is taken as a list of one.
    type: raw
    default: [1, "25%"]
  max_fail_percentage:
    description:
      - When more than this percentage of a batch's hosts were not backed up, no later batch starts
        (C(orthanc_backup_max_fail_percentage)); a number from 0 to 100 (a C(%) sign is allowed).
        The plan only checks it and hands it on to every host.
    type: raw
    default: 50
"""

EXAMPLES = r"""
- name: Plan the batches
  ansible.builtin.debug:
    msg: "{{ ansible_play_hosts_all | pacs.orthanc.backup_plan(hostvars, [1, '25%']) }}"
"""

RETURN = r"""
_value:
  description: The plan.
  type: dict
  contains:
    batches:
      description: The batches, in the order they run; each a list of host names.
      type: list
      elements: list
    serial:
      description: The size of each batch, for the play's C(serial).
      type: list
      elements: int
    hosts:
      description: >-
        One entry per host, in the order the play must list them: C(host), C(batch) (its batch's
        number, from 1), C(batches) (how many batches there are), C(batch_hosts) (the hosts of its
        batch), and the run's C(serial) and C(max_fail_percentage).
      type: list
      elements: dict
    max_fail_percentage:
      description: I(max_fail_percentage), as a number.
      type: float
"""

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # the planner is plain Python: usable without Ansible too
    AnsibleFilterError = ValueError

DEFAULT_BATCHES = (1, "25%")


def batch_sizes(batches, total: int) -> list:
    """The sizes of ``batches`` (Ansible's serial) for ``total`` hosts, each an int; None stands
    for "all the remaining hosts". Raises AnsibleFilterError on a value that is not a size."""
    if batches is None:
        batches = list(DEFAULT_BATCHES)
    elif isinstance(batches, (str, int)) and not isinstance(batches, bool):
        batches = [batches]
    elif not isinstance(batches, (list, tuple)):
        raise AnsibleFilterError(f"orthanc_backup_batches must be a list of batch sizes, such as [1, '25%'], "
                                 f"not {batches!r}")
    sizes = []
    for value in batches:
        text = str(value).strip() if not isinstance(value, bool) else ""
        percent = text.endswith("%")
        digits = text[:-1].strip() if percent else text
        try:
            number = int(digits)
        except ValueError:
            raise AnsibleFilterError(f"orthanc_backup_batches: {value!r} is not a batch size: give a number of hosts "
                                     f"(3) or a percentage of the hosts (\"25%\")") from None
        if percent:
            number = int(number / 100.0 * total) or 1  # as Ansible's serial: rounded down, at least 1
        sizes.append(number if number > 0 else None)
    return sizes or [None]


def fail_percentage(value) -> float:
    """orthanc_backup_max_fail_percentage as a number from 0 to 100."""
    text = "" if isinstance(value, bool) or value is None else str(value).strip()
    try:
        number = float(text[:-1] if text.endswith("%") else text)
    except ValueError:
        number = -1.0
    if not 0 <= number <= 100:
        raise AnsibleFilterError(f"orthanc_backup_max_fail_percentage must be a number from 0 to 100, not {value!r}")
    return number


def _group_of(host: str, hostvars) -> tuple:
    """The key of the host's HA group: its orthanc_ha_group, or the host alone."""
    variables = hostvars[host] if host in hostvars else {}
    group = variables["orthanc_ha_group"] if "orthanc_ha_group" in variables else None
    group = "" if group is None else str(group).strip()
    return ("group", group) if group else ("host", host)


def plan_batches(hosts, groups: dict, batches=None) -> list:
    """The batches (lists of hosts) for ``hosts`` (inventory order), ``groups`` mapping each host to
    the key of its HA group (hosts without a group each have a key of their own)."""
    hosts = list(dict.fromkeys(hosts))
    position = {host: index for index, host in enumerate(hosts)}
    waiting: dict = {}
    for host in hosts:
        waiting.setdefault(groups[host], deque()).append(host)
    sizes = batch_sizes(batches, len(hosts))
    planned = []
    while waiting:
        size = sizes[min(len(planned), len(sizes) - 1)]
        # the largest groups first, then inventory order (of each group's next waiting member)
        keys = sorted(waiting, key=lambda key: (-len(waiting[key]), position[waiting[key][0]]))
        if not planned:  # the canary: the first host of the inventory
            keys.remove(groups[hosts[0]])
            keys.insert(0, groups[hosts[0]])
        chosen = []
        for key in keys[:size]:
            chosen.append(waiting[key].popleft())
            if not waiting[key]:
                del waiting[key]
        planned.append(sorted(chosen, key=position.__getitem__))
    return planned


def backup_plan(hosts, hostvars, batches=None, max_fail_percentage=50) -> dict:
    """The plan of a fleet backup; see DOCUMENTATION."""
    if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)):
        raise AnsibleFilterError(f"backup_plan takes the list of hosts of the run, not {hosts!r}")
    hosts = [str(host) for host in hosts]
    groups = {host: _group_of(host, hostvars) for host in hosts}
    max_fail = fail_percentage(max_fail_percentage)
    planned = plan_batches(hosts, groups, batches)
    serial = [len(batch) for batch in planned]
    entries = [{"host": host, "batch": number, "batches": len(planned), "batch_hosts": batch, "serial": serial,
                "max_fail_percentage": max_fail}
               for number, batch in enumerate(planned, start=1) for host in batch]
    return {"batches": planned, "serial": serial, "hosts": entries, "max_fail_percentage": max_fail}


class FilterModule:
    def filters(self):
        return {"backup_plan": backup_plan}
