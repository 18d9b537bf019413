"""The planner of a fleet backup's batches (plugins/filter/backup_plan.py): what the playbook
pacs.orthanc.backup runs, batch after batch."""

from __future__ import annotations

import itertools
import random

import pytest
from ansible.errors import AnsibleFilterError
from ansible.utils.helpers import pct_to_int

from ansible_collections.pacs.orthanc.plugins.filter.backup_plan import backup_plan, batch_sizes, fail_percentage


def fleet(*spec):
    """Hosts and hostvars from 'name' or 'name:group' strings."""
    hosts, hostvars = [], {}
    for item in spec:
        name, group = (item.split(":", 1) + [""])[:2]
        hosts.append(name)
        hostvars[name] = {"orthanc_ha_group": group} if group else {}
    return hosts, hostvars


def ansible_serial(hosts, serial):
    """The batches Ansible itself makes of a play's hosts with this serial (as its playbook
    executor does: percentages of all the play's hosts, the last size repeated, 0 for all)."""
    hosts, total, batches, item = list(hosts), len(hosts), [], 0
    serial = serial or [-1]
    while hosts:
        size = pct_to_int(serial[item], total)
        if size <= 0:
            batches.append(hosts)
            break
        batches.append(hosts[:size])
        hosts = hosts[size:]
        item = min(item + 1, len(serial) - 1)
    return batches


def check_plan(plan, hosts, hostvars, batches):
    """Every property the playbook relies on."""
    flat = [h for batch in plan["batches"] for h in batch]
    assert sorted(flat) == sorted(hosts) and len(flat) == len(set(flat))  # every host exactly once
    assert all(plan["batches"]), plan  # no empty batch
    assert plan["batches"][0][0] == hosts[0]  # the canary: the first host of the inventory, in batch 1
    assert plan["serial"] == [len(b) for b in plan["batches"]]
    assert [e["host"] for e in plan["hosts"]] == flat  # the play's order: Ansible slices it with serial
    assert ansible_serial(flat, plan["serial"]) == plan["batches"]
    position = {h: i for i, h in enumerate(hosts)}
    sizes = batch_sizes(batches, len(hosts))
    for number, batch in enumerate(plan["batches"]):
        limit = sizes[min(number, len(sizes) - 1)]
        assert limit is None or len(batch) <= limit, (number, batch, limit)
        groups = [hostvars[h].get("orthanc_ha_group") for h in batch if hostvars[h].get("orthanc_ha_group")]
        assert len(groups) == len(set(groups)), batch  # never two members of one HA group at once
        assert batch == sorted(batch, key=position.get)
        for host in batch:
            [entry] = [e for e in plan["hosts"] if e["host"] == host]
            assert entry == {"host": host, "batch": number + 1, "batches": len(plan["batches"]), "batch_hosts": batch,
                             "serial": plan["serial"], "max_fail_percentage": plan["max_fail_percentage"]}
    for group in {v.get("orthanc_ha_group") for v in hostvars.values()} - {None, ""}:
        members = [h for h in flat if hostvars[h].get("orthanc_ha_group") == group]
        assert members == sorted(members, key=position.get)  # members go in inventory order


def test_without_ha_groups_the_batches_are_ansibles_own():
    for count in (1, 2, 3, 4, 5, 8, 9, 17, 40):
        hosts = [f"pacs-{i}" for i in range(count)]
        hostvars = {h: {} for h in hosts}
        for batches in ([1, "25%"], ["100%"], [2], [1, 3, "50%"], ["10%"], [0], [], [1, 0]):
            plan = backup_plan(hosts, hostvars, batches)
            check_plan(plan, hosts, hostvars, batches)
            assert plan["batches"] == ansible_serial(hosts, batches), (count, batches)


def test_the_default_is_a_canary_then_a_quarter():
    hosts, hostvars = fleet(*[f"pacs-{i}" for i in range(8)])
    assert backup_plan(hosts, hostvars)["serial"] == [1, 2, 2, 2, 1]
    assert backup_plan(hosts, hostvars, None)["batches"][0] == ["pacs-0"]


def test_two_pairs_and_a_broken_host_in_one_batch_setting():
    # the fleet of tests/integration/test_fleet.py
    hosts, hostvars = fleet("broken", "a1:pair-a", "b1:pair-b", "a2:pair-a", "b2:pair-b")
    plan = backup_plan(hosts, hostvars, ["100%"])
    assert plan["batches"] == [["broken", "a1", "b1"], ["a2", "b2"]]
    check_plan(plan, hosts, hostvars, ["100%"])


def test_any_number_of_members():
    members = [f"ward-{i}:ward" for i in range(7)]
    hosts, hostvars = fleet("solo", *members, "other")
    plan = backup_plan(hosts, hostvars, ["100%"])
    check_plan(plan, hosts, hostvars, ["100%"])
    # the canary batch (its size is all the hosts) takes 'solo', the first member and 'other'
    assert plan["batches"] == [["solo", "ward-0", "other"]] + [[f"ward-{i}"] for i in range(1, 7)]
    hosts, hostvars = fleet(*[f"pacs-{i}:ward" for i in range(12)])
    plan = backup_plan(hosts, hostvars, [1, "25%"])
    check_plan(plan, hosts, hostvars, [1, "25%"])
    assert plan["batches"] == [[h] for h in hosts]


def test_a_large_group_spreads_over_the_run_instead_of_trailing():
    # 8 hosts without group, then a group of 4 at the end of the inventory; 12 hosts: 1, then 3 at a time
    hosts, hostvars = fleet(*[f"s{i}" for i in range(1, 9)], *[f"g{i}:g" for i in range(1, 5)])
    plan = backup_plan(hosts, hostvars, [1, "25%"])
    check_plan(plan, hosts, hostvars, [1, "25%"])
    assert plan["batches"] == [["s1"], ["s2", "s3", "g1"], ["s4", "s5", "g2"], ["s6", "s7", "g3"], ["s8", "g4"]]


def test_a_member_as_canary_and_groups_given_as_numbers():
    hosts = ["h1", "h2", "h3", "h4", "h5"]
    hostvars = {"h1": {"orthanc_ha_group": 7}, "h2": {"orthanc_ha_group": None}, "h3": {"orthanc_ha_group": "7"},
                "h4": {"orthanc_ha_group": ""}, "h5": {"orthanc_ha_group": 7}}
    plan = backup_plan(hosts, hostvars, [2])
    assert plan["batches"][0][0] == "h1"
    for batch in plan["batches"]:
        assert len([h for h in batch if h in ("h1", "h3", "h5")]) <= 1, plan  # 7 and "7" are one group
    assert len(plan["batches"]) == 3
    assert backup_plan(["x"], {"x": {}}, [1, "25%"])["batches"] == [["x"]]
    assert backup_plan([], {}, [1, "25%"]) == {"batches": [], "serial": [], "hosts": [], "max_fail_percentage": 50}


def min_batches(counts: list, canary: int, sizes: list) -> int:
    """The fewest batches any plan can take (breadth-first over every choice): ``counts`` are the
    hosts of each group (a host without group is a group of one), ``canary`` the canary's group."""
    frontier = {tuple(counts)}
    steps = 0
    while True:
        if any(sum(state) == 0 for state in frontier):
            return steps
        limit = sizes[min(steps, len(sizes) - 1)]
        following = set()
        for state in frontier:
            open_groups = [i for i, n in enumerate(state) if n]
            top = len(open_groups) if limit is None else min(limit, len(open_groups))
            for k in range(1, top + 1):
                for chosen in itertools.combinations(open_groups, k):
                    if steps == 0 and canary not in chosen:
                        continue
                    following.add(tuple(n - (i in chosen) for i, n in enumerate(state)))
        frontier = following
        steps += 1


def test_as_few_batches_as_any_plan_could_take():
    rng = random.Random(12)
    for _case in range(250):
        count = rng.randint(1, 9)
        labels = [rng.choices(["", "", "a", "a", "b", "c"])[0] for _host in range(count)]
        hosts = [f"h{i}" for i in range(count)]
        hostvars = {h: ({"orthanc_ha_group": g} if g else {}) for h, g in zip(hosts, labels)}
        batches = rng.choice([[1, "25%"], [1, 2], [2], ["50%"], [1, 3, 1], ["100%"], [1, "30%", 2]])
        plan = backup_plan(hosts, hostvars, batches)
        check_plan(plan, hosts, hostvars, batches)
        keys = [g or h for h, g in zip(hosts, labels)]
        unique = list(dict.fromkeys(keys))
        counts = [keys.count(k) for k in unique]
        best = min_batches(counts, unique.index(keys[0]), batch_sizes(batches, count))
        assert len(plan["batches"]) == best, (hosts, labels, batches, plan["batches"])


def test_batch_sizes_as_ansibles_serial_reads_them():
    assert batch_sizes([1, "25%"], 10) == [1, 2]
    assert batch_sizes(["25%"], 3) == [1]  # rounded down, at least one
    assert batch_sizes("50%", 10) == [5] and batch_sizes(3, 10) == [3] and batch_sizes("4", 10) == [4]
    assert batch_sizes([0], 5) == [None] and batch_sizes([], 5) == [None] and batch_sizes(None, 8) == [1, 2]
    for wrong in (["a quarter"], ["2.5"], [True], [None], {"size": 2}, [[1]]):
        with pytest.raises(AnsibleFilterError, match="orthanc_backup_batches"):
            batch_sizes(wrong, 10)
    with pytest.raises(AnsibleFilterError, match="list of hosts"):
        backup_plan("pacs-1", {})


def test_the_failure_threshold_is_checked_before_anything_runs():
    assert fail_percentage(50) == 50.0 and fail_percentage("100") == 100.0 and fail_percentage("0%") == 0.0
    assert fail_percentage(12.5) == 12.5
    assert backup_plan(["a"], {"a": {}}, [1], "30")["hosts"][0]["max_fail_percentage"] == 30.0
    for wrong in ("half", 101, -1, None, True, "", [50]):
        with pytest.raises(AnsibleFilterError, match="orthanc_backup_max_fail_percentage must be a number from 0 to 100"):
            backup_plan(["a"], {"a": {}}, [1], wrong)
