"""Finding the processes a test started (never others): descendants and command lines."""

from __future__ import annotations

import os


def descendants(pid: int) -> set:
    """Every process below ``pid``, read from /proc."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def module_processes(play_pid: int, module: str) -> list:
    """The processes running an Ansible module (its python and the shell around it) below a
    play started without pipelining, so that the module's file name is on their command line."""
    return sorted((pid for pid in descendants(play_pid) if f"AnsiballZ_{module}" in cmdline(pid)), reverse=True)


def keepers_of(root) -> list:
    """The backup lock's keepers (processes tagged pacs-orthanc-lock-keeper) whose lock is
    ``<root>/.lock``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            line = cmdline(int(entry))
            if "pacs-orthanc-lock-keeper" in line and f" {root}/.lock " in line + " ":
                found.append(int(entry))
    return found
