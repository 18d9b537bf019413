#!/bin/sh
# A MariaDB container as the official mariadb image makes one: at the first start, root with
# MARIADB_ROOT_PASSWORD (from anywhere), the database MARIADB_DATABASE (utf8mb4) and its user
# MARIADB_USER with MARIADB_PASSWORD; here with Debian 12's MariaDB on DB_PORT (the test image runs
# with --network host, so not on the host's own 3306).
set -eu
D=/var/lib/mysql
mkdir -p /run/mysqld && chown mysql /run/mysqld
if [ ! -e "$D/.initialised" ]; then
  rm -rf "${D:?}"/* && chown mysql "$D"
  mariadb-install-db --user=mysql --datadir="$D" --skip-test-db >/dev/null
  mariadbd --user=mysql --datadir="$D" --skip-networking --socket=/run/mysqld/init.sock &
  i=0
  until mariadb --socket=/run/mysqld/init.sock -e 'SELECT 1' >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 300 ] || exit 1; sleep 0.1
  done
  q() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e "s/'/''/g"; }
  mariadb --socket=/run/mysqld/init.sock <<SQL
CREATE USER 'root'@'%' IDENTIFIED BY '$(q "$MARIADB_ROOT_PASSWORD")';
GRANT ALL ON *.* TO 'root'@'%' WITH GRANT OPTION;
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password
  USING PASSWORD('$(q "$MARIADB_ROOT_PASSWORD")');
CREATE DATABASE \`$MARIADB_DATABASE\` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE USER '$MARIADB_USER'@'%' IDENTIFIED BY '$(q "$MARIADB_PASSWORD")';
GRANT ALL ON \`$MARIADB_DATABASE\`.* TO '$MARIADB_USER'@'%';
SQL
  mariadb-admin --socket=/run/mysqld/init.sock shutdown
  wait
  touch "$D/.initialised"
fi
exec mariadbd --user=mysql --datadir="$D" --port="$DB_PORT" --bind-address=127.0.0.1
