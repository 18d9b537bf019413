#!/usr/bin/env bash
# The newcomer's demo, on a fresh Debian 12 machine, as root:
#   1. installs what it needs and nothing more (scripts/setup-demo.sh): Orthanc (Debian's package),
#      dcmtk, curl, ansible-core and pydicom;
#   2. starts Debian's Orthanc service (SQLite index in /var/lib/orthanc/db-v6) if it is not running;
#   3. stores sample studies into it, over REST and over DICOM C-STORE;
#   4. backs it up with the playbook pacs.orthanc.backup, all defaults (config /etc/orthanc,
#      service "orthanc", backups in /var/backups/orthanc);
#   5. says where the backup is and what it holds.
# Run it again: it stores two more studies and takes an incremental backup.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-demo.sh

url=http://127.0.0.1:8042
if ! curl -sf "$url/system" >/dev/null; then
  echo "== starting Debian's Orthanc service"
  service orthanc start >/dev/null
  for _ in $(seq 100); do curl -sf "$url/system" >/dev/null && break; sleep 0.1; done
  curl -sf "$url/system" >/dev/null || { echo "Orthanc did not start: see /var/log/orthanc/" >&2; exit 1; }
fi

echo "== storing sample studies into $url"
python3 scripts/demo_store.py --url "$url" --studies 2

echo "== backing up with: ansible-playbook -i scripts/demo-inventory.yml pacs.orthanc.backup"
export ANSIBLE_COLLECTIONS_PATH="$PWD/.work/collections" ANSIBLE_PIPELINING=1 ANSIBLE_LOCALHOST_WARNING=0
ansible-playbook -i scripts/demo-inventory.yml pacs.orthanc.backup -e "ansible_python_interpreter=$(command -v python3)"

latest=$(readlink -f /var/backups/orthanc/latest)
python3 - "$latest" <<'PY'
import json, os, sys
path = sys.argv[1]
m = json.load(open(f"{path}/manifest.json"))
s, c = m["storage"], m["counts"]
print(f"""
== the backup is in {path}  (also /var/backups/orthanc/latest)
   Orthanc {m['orthanc']['version']}, {m['backend']} index schema {m['database_schema_version']}
   {c['patients']} patients, {c['studies']} studies, {c['series']} series, {c['instances']} instances
   storage/  {s['files']} files, {s['bytes']} bytes ({s['new_files']} new, {s['linked_files']} linked to the previous backup)
   index/    the SQLite index, consolidated and integrity-checked
   config/   {len([f for f in m['files'] if f.startswith('config/')])} configuration files from {m['source']['config_path']}
   manifest.json  counts, times, SHA-256 of every file outside storage/
   Orthanc was unavailable for {m['downtime_seconds']} s.
   Verify it at any time:
     ANSIBLE_COLLECTIONS_PATH={os.environ["ANSIBLE_COLLECTIONS_PATH"]} ansible localhost -m pacs.orthanc.backup_verify -a path={path}""")
PY
