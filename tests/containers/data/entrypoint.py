"""An entrypoint in the manner of orthancteam/orthanc's: at every start it merges the JSON files of
/etc/orthanc/ (in name order, deep merge), the secrets in /run/secrets/*.json and the ORTHANC__...
environment variables (ORTHANC__HTTP_PORT=8042 -> "HttpPort": 8042; a double underscore nests:
ORTHANC__POSTGRE_SQL__HOST -> {"PostgreSQL": {"Host": ...}}) into /tmp/orthanc.json, then execs
Orthanc on that file. The effective configuration is thus nowhere on the host: only Orthanc's own
command line names it."""
import glob
import json
import os


def merge(into, other):
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def camel(word):
    special = {"POSTGRE_SQL": "PostgreSQL", "MY_SQL": "MySQL", "DICOM": "Dicom", "HTTP": "Http"}
    if word in special:
        return special[word]
    return "".join(part[:1].upper() + part[1:].lower() for part in word.split("_"))


config = {}
for name in sorted(glob.glob("/etc/orthanc/*.json")) + sorted(glob.glob("/run/secrets/*.json")):
    with open(name, encoding="utf-8") as handle:
        merge(config, json.load(handle))
for name, value in sorted(os.environ.items()):
    if not name.startswith("ORTHANC__"):
        continue
    try:
        value = json.loads(value)
    except ValueError:
        pass
    keys = [camel(part) for part in name[len("ORTHANC__"):].split("__")]
    section = config
    for key in keys[:-1]:
        section = section.setdefault(key, {})
    section[keys[-1]] = value
old = os.umask(0o077)
with open("/tmp/orthanc.json", "w", encoding="utf-8") as handle:
    json.dump(config, handle, indent=2)
os.umask(old)
os.execvp("Orthanc", ["Orthanc", "/tmp/orthanc.json"])
