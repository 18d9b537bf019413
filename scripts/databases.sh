#!/usr/bin/env bash
# Installs (when missing) and starts Debian's PostgreSQL 15 and MariaDB servers, and Orthanc's
# database plugins, for the tests of the database strategy. As root; no systemd needed.
set -euo pipefail
need_apt=()
for pair in pg_ctlcluster:postgresql mariadbd:mariadb-server mysqldump:mariadb-client \
            /usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so:orthanc-postgresql \
            /usr/share/orthanc/plugins/libOrthancMySQLIndex.so:orthanc-mysql; do
  name="${pair%%:*}"
  if [ "${name#/}" != "$name" ]; then [ -e "$name" ] || need_apt+=("${pair#*:}")
  else command -v "$name" >/dev/null 2>&1 || [ -x "/usr/sbin/$name" ] || need_apt+=("${pair#*:}"); fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! runuser -u postgres -- psql -XAtqc 'SELECT 1' >/dev/null 2>&1; then
  echo "== starting PostgreSQL"
  pg_ctlcluster 15 main start
fi
if ! mysql -NBe 'SELECT 1' >/dev/null 2>&1; then
  echo "== starting MariaDB"
  service mariadb start >/dev/null
fi
for _ in $(seq 1 60); do
  runuser -u postgres -- psql -XAtqc 'SELECT 1' >/dev/null 2>&1 && mysql -NBe 'SELECT 1' >/dev/null 2>&1 && break
  sleep 0.5
done
echo "== databases ready: PostgreSQL $(runuser -u postgres -- psql -XAtqc 'SHOW server_version'), MariaDB $(mysql -NBe 'SELECT VERSION()')"
