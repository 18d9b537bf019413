"""Reading Orthanc configurations: comments, variables, folders, duplicate keys, paths, backends."""

from __future__ import annotations

import json
import os

import pytest

from ansible_collections.pacs.orthanc.plugins.module_utils import _config
from ansible_collections.pacs.orthanc.plugins.module_utils._common import PacsError


def test_comments_are_removed_but_not_inside_strings():
    text = '{ // a comment\n "Url": "http://x//y", /* block\n comment */ "B": "/* kept */" }'
    assert json.loads(_config.strip_comments(text)) == {"Url": "http://x//y", "B": "/* kept */"}


def test_escaped_quote_does_not_end_a_string():
    text = '{"A": "say \\"//hi\\"" // gone\n}'
    assert json.loads(_config.strip_comments(text)) == {"A": 'say "//hi"'}


def test_unclosed_block_comment_is_an_error(tmp_path):
    (tmp_path / "o.json").write_text('{ /* never closed "A": 1 }')
    with pytest.raises(PacsError, match="never closed"):
        _config.load_configuration(str(tmp_path / "o.json"))


def test_variables_with_and_without_default(tmp_path):
    (tmp_path / "o.json").write_text('{"StorageDirectory": "${ROOT}/s", "Name": "${NAME:-fallback}", "X": "${UNSET}"}')
    conf = _config.load_configuration(str(tmp_path / "o.json"), {"ROOT": "/data"})
    assert conf["values"] == {"StorageDirectory": "/data/s", "Name": "fallback", "X": ""}
    assert conf["missing_variables"] == ["UNSET"]


def test_unset_variable_is_a_warning_and_an_empty_path_names_it(tmp_path):
    # Orthanc 1.10.1 replaces an unset ${VAR} without default by "" and says nothing: so do we,
    # with a warning; a path left empty by it is refused, naming the variable and the fix
    (tmp_path / "o.json").write_text('{"Name": "${PACS_T_NAME}", "StorageDirectory": "${PACS_T_DATA}"}')
    with pytest.raises(PacsError) as err:
        _config.describe(str(tmp_path / "o.json"), {})
    assert str(err.value) == ("read Orthanc configuration: 'StorageDirectory' must be a non-empty string "
                              "(not set for this module: PACS_T_DATA, PACS_T_NAME; give the values that "
                              "Orthanc's service sees in orthanc_config_environment)")
    described = _config.describe(str(tmp_path / "o.json"), {"PACS_T_DATA": str(tmp_path / "data")})
    assert described["storage_directory"] == str(tmp_path / "data")
    assert described["name"] == ""
    assert described["warnings"] == ["environment variable PACS_T_NAME is not set; it was replaced by an empty string"]
    assert described["unsupported"] == []


def test_folder_loads_every_json_file_but_not_subfolders(tmp_path):
    (tmp_path / "a.json").write_text('{"Name": "n"}')
    (tmp_path / "b.json").write_text('{"HttpPort": 8043}')
    (tmp_path / "notes.txt").write_text("not json")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.json").write_text('{"DicomPort": 1}')
    conf = _config.load_configuration(str(tmp_path))
    assert conf["values"] == {"Name": "n", "HttpPort": 8043}
    assert [os.path.basename(f) for f in conf["files"]] == ["a.json", "b.json"]


def test_key_in_two_files_is_an_error_naming_both(tmp_path):
    (tmp_path / "a.json").write_text('{"Name": "n"}')
    (tmp_path / "b.json").write_text('{"Name": "m"}')
    with pytest.raises(PacsError) as err:
        _config.load_configuration(str(tmp_path))
    assert "'Name'" in str(err.value) and "a.json" in str(err.value) and "b.json" in str(err.value)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('{"Name": }')
    with pytest.raises(PacsError, match="broken.json is not valid JSON"):
        _config.load_configuration(str(tmp_path))


def test_missing_configuration(tmp_path):
    with pytest.raises(PacsError, match="no Orthanc configuration"):
        _config.load_configuration(str(tmp_path / "nothing"))


def test_relative_paths_and_defaults(tmp_path):
    (tmp_path / "o.json").write_text('{"StorageDirectory": "data"}')
    info = _config.describe(str(tmp_path / "o.json"))
    assert info["storage_directory"] == str(tmp_path / "data")
    assert info["index_directory"] == str(tmp_path / "data")  # defaults to the storage folder
    (tmp_path / "o.json").write_text('{}')
    info = _config.describe(str(tmp_path))
    assert info["storage_directory"] == str(tmp_path / "OrthancStorage")
    assert info["backend"] == "sqlite" and info["storage"] == "filesystem"


def _plugin(tmp_path, name):
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"\x7fELF")
    return folder


def test_postgresql_index_needs_the_plugin(tmp_path):
    conf = {"PostgreSQL": {"EnableIndex": True, "Password": "secret", "Host": "db"}}
    (tmp_path / "o.json").write_text(json.dumps(conf))
    info = _config.describe(str(tmp_path / "o.json"))
    assert info["backend"] == "sqlite"
    assert any("no PostgreSQL plugin" in w for w in info["warnings"])
    folder = _plugin(tmp_path, "libOrthancPostgreSQLIndex.so")
    conf["Plugins"] = [str(folder)]
    (tmp_path / "o.json").write_text(json.dumps(conf))
    info = _config.describe(str(tmp_path / "o.json"))
    assert info["backend"] == "postgresql" and info["storage"] == "filesystem"
    assert info["database"]["password_set"] is True
    assert "secret" not in json.dumps(info)


def test_unknown_storage_plugin_is_flagged(tmp_path):
    folder = _plugin(tmp_path, "libOrthancAwsS3Storage.so.1.2")
    (tmp_path / "o.json").write_text(json.dumps({"Plugins": [str(folder)]}))
    info = _config.describe(str(tmp_path / "o.json"))
    assert any("aws-s3" in u for u in info["unsupported"])


def test_two_index_plugins_are_an_error(tmp_path):
    folder = _plugin(tmp_path, "libOrthancPostgreSQLIndex.so")
    _plugin(tmp_path, "libOrthancMySQLIndex.so")
    conf = {"Plugins": [str(folder)], "PostgreSQL": {"EnableIndex": True}, "MySQL": {"EnableIndex": True}}
    (tmp_path / "o.json").write_text(json.dumps(conf))
    with pytest.raises(PacsError, match="two database index plugins"):
        _config.describe(str(tmp_path / "o.json"))


def test_debian_default_configuration_reads():
    if not os.path.isdir("/etc/orthanc"):
        pytest.skip("Debian's orthanc package is not installed")
    info = _config.describe("/etc/orthanc")
    assert info["storage_directory"] == "/var/lib/orthanc/db-v6"
    assert info["index_directory"] == "/var/lib/orthanc/db-v6"
    assert info["backend"] == "sqlite"
    assert info["http_port"] == 8042
