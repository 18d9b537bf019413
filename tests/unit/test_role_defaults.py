"""The settings the backup and restore roles share are defined once, in pacs.orthanc.common, and
each role's argument spec documents the default its role really gets."""

from __future__ import annotations

import pathlib

import yaml

ROLES = pathlib.Path(__file__).resolve().parents[2] / "roles"


def load(path: pathlib.Path):
    return yaml.safe_load(path.read_text()) if path.exists() else None


def defaults(role: str) -> dict:
    return load(ROLES / role / "defaults" / "main.yml") or {}


def dependencies(role: str) -> list:
    return [d["role"] if isinstance(d, dict) else d for d in load(ROLES / role / "meta" / "main.yml")["dependencies"]]


def test_the_shared_settings_are_defined_once_in_common():
    common = defaults("common")
    assert {"orthanc_config_path", "orthanc_url", "orthanc_username", "orthanc_password", "orthanc_service_name",
            "orthanc_stop_command", "orthanc_start_command", "orthanc_backup_root"} <= set(common)
    for role in ("backup", "restore"):
        assert dependencies(role) == ["pacs.orthanc.common"], role
        assert not set(defaults(role)) & set(common), f"{role} defines again what common defines"
    # no main tasks: depending on it runs nothing (tasks/progress*.yml are included by name)
    assert not (ROLES / "common" / "tasks" / "main.yml").exists()


def test_each_argument_spec_default_is_the_one_the_role_gets():
    for role in ("backup", "restore"):
        seen = dict(defaults("common"))
        seen.update(defaults(role))
        spec = load(ROLES / role / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
        for name, option in spec.items():
            if "default" not in option:
                continue
            assert name in seen, f"{role}: {name} has a documented default but no default variable"
            if isinstance(seen[name], str) and "{{" in seen[name]:
                continue  # computed default, documented in words
            if option.get("type") in ("str", "path") and isinstance(option["default"], str) and "<" in option["default"]:
                continue  # a default described in words
            assert option["default"] == seen[name], f"{role}: {name} documented {option['default']!r}, is {seen[name]!r}"
