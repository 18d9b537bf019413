"""run_module: one clean message for every failure, and the traceback of an unexpected one kept
in ``exception`` (shown by Ansible at -vvv). Runs a real AnsibleModule in a child process, as
Ansible runs a module on a host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ansible.release import __version__ as ANSIBLE_VERSION

from tests.conftest import COLLECTIONS

# ansible-core 2.19 asks a module for tracebacks only when the controller shows them
# (ANSIBLE_DISPLAY_TRACEBACK=error), and then adds the pending exception itself; before 2.19,
# `exception` is returned only when the module gives it (shown at -vvv): these tests fail there
# without it (checked with ansible-core 2.16.19).
ASKS_FOR_TRACEBACKS = tuple(int(part) for part in ANSIBLE_VERSION.split(".")[:2]) >= (2, 19)

CHILD = textwrap.dedent("""
    from ansible.module_utils.basic import AnsibleModule
    from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError, run_module

    def deep_helper(kind):
        if kind == "unexpected":
            return {}["no such key"]
        if kind == "oserror":
            return open("/nonexistent/pacs-orthanc-test/file")
        if kind == "pacs":
            raise PacsError("copy index", "the disk is full")
        return {"changed": False, "fine": True}

    def action(module):
        return deep_helper(module.params["kind"])

    module = AnsibleModule(argument_spec=dict(kind=dict(type="str", required=True)))
    run_module(module, action)
""")


def run_child(tmp_path, kind: str) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = tmp_path / "args.json"
    module_args = {"kind": kind, "_ansible_module_name": "pacs_test"}
    if ASKS_FOR_TRACEBACKS:
        module_args["_ansible_tracebacks_for"] = ["error"]
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": module_args}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(COLLECTIONS)] + sys.path))
    proc = subprocess.run([sys.executable, str(script), str(args)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result: {proc.stdout!r} {proc.stderr!r}"
    return json.loads(lines[-1])


def test_unexpected_error_keeps_its_traceback_out_of_the_message(tmp_path):
    result = run_child(tmp_path, "unexpected")
    assert result["failed"] is True
    assert result["msg"] == "pacs_test: unexpected KeyError: 'no such key'"
    assert "Traceback" not in result["msg"] and "\n" not in result["msg"]
    assert result["step"] == "pacs_test"
    # the traceback names the function where it happened, for -vvv
    assert "Traceback (most recent call last)" in result["exception"]
    assert "in deep_helper" in result["exception"]
    assert "KeyError: 'no such key'" in result["exception"]


def test_oserror_is_a_clean_message_with_its_traceback(tmp_path):
    result = run_child(tmp_path, "oserror")
    assert result["failed"] is True
    assert result["msg"] == "pacs_test: No such file or directory: /nonexistent/pacs-orthanc-test/file"
    assert "in deep_helper" in result["exception"]


@pytest.mark.parametrize("kind", ["pacs", "ok"])
def test_expected_outcomes_carry_no_traceback(tmp_path, kind):
    result = run_child(tmp_path, kind)
    if kind == "pacs":
        if not ASKS_FOR_TRACEBACKS:  # 2.19 adds the pending exception's traceback itself when asked
            assert "exception" not in result
        assert result["failed"] is True
        assert result["msg"] == "copy index: the disk is full"
        assert (result["step"], result["cause"]) == ("copy index", "the disk is full")
    else:
        assert "exception" not in result
        assert result.get("failed") is not True and result["fine"] is True


ENV_CHILD = textwrap.dedent("""
    from ansible.module_utils.basic import AnsibleModule
    from ansible_collections.pacs.orthanc.plugins.module_utils._common import run_module

    def action(module):
        env = module.params["environment"]
        return {"changed": False, "seen": "password is " + env["ORTHANC_DB_PASSWORD"],
                "storage": env["ORTHANC_STORAGE"]}

    module = AnsibleModule(argument_spec=dict(environment=dict(type="dict")))
    run_module(module, action)
""")


def test_secret_environment_values_never_come_back(tmp_path):
    """orthanc_config_environment may hold a database password: neither the result nor the
    module's invocation shows it, while a path given beside it stays readable."""
    script = tmp_path / "child.py"
    script.write_text(ENV_CHILD)
    secret = "s3cr3t-pw-for-orthanc"
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
        "environment": {"ORTHANC_DB_PASSWORD": secret, "ORTHANC_STORAGE": "/srv/orthanc/storage"},
        "_ansible_module_name": "pacs_test"}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(COLLECTIONS)] + sys.path))
    proc = subprocess.run([sys.executable, str(script), str(args)], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert secret not in proc.stdout + proc.stderr
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["storage"] == "/srv/orthanc/storage"
    assert result["seen"].startswith("password is ")
    assert result["invocation"]["module_args"]["environment"]["ORTHANC_STORAGE"] == "/srv/orthanc/storage"
