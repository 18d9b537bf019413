# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    """The database connection of the modules that dump and restore Orthanc's database."""

    DOCUMENTATION = r"""
options:
  config_path:
    description:
      - Orthanc's configuration file or folder; the database is the one its C(PostgreSQL) or C(MySQL)
        section enables (C(EnableIndex) or C(EnableStorage)), C(ConnectionUri) included. The password
        is then read on the managed host and never passes through Ansible.
    type: path
  environment:
    description: Environment that Orthanc sees, for C(${VAR}) in its configuration.
    type: dict
  engine:
    description: C(postgresql) or C(mysql). Default, the one that the configuration enables.
    type: str
    choices: [postgresql, mysql]
  host:
    description: Overrides the configuration's C(Host).
    type: str
  port:
    description: Overrides the configuration's C(Port).
    type: int
  database:
    description: Overrides the configuration's C(Database).
    type: str
  username:
    description: Overrides the configuration's C(Username) (the user Orthanc connects as).
    type: str
  password:
    description: Overrides the configuration's C(Password). Never logged nor returned.
    type: str
  unix_socket:
    description: MySQL only, overrides the configuration's C(UnixSocket).
    type: str
  bin_dir:
    description: Folder holding the engine's client programs, when they are not on the PATH.
    type: path
  timeout:
    description: Seconds after which the tool is abandoned (and what it wrote removed). No limit by default.
    type: float
  container:
    description:
      - The container (name or id) that runs the database server. Its own client programs then do the
        work, run inside it through the engine's C(exec -i), so their version is the server's, and
        O(bin_dir) is not used.
      - The tools connect to the server over TCP at C(127.0.0.1) inside the container (O(host) overrides),
        at the configuration's port, or at the container port that the engine publishes on that host port.
      - The password is the configuration's (or O(password)); without one, the container's environment's for
        that user (C(POSTGRES_PASSWORD) for C(POSTGRES_USER); C(MARIADB_PASSWORD) or C(MYSQL_PASSWORD) for
        C(MARIADB_USER) or C(MYSQL_USER); C(MARIADB_ROOT_PASSWORD) or C(MYSQL_ROOT_PASSWORD) for root), a
        C(*_FILE) variant read inside the container. It reaches the tool as the first line of its standard
        input, never on a command line (the engine's own C(exec) argv included) nor in the host's environment.
    type: str
  container_engine:
    description: The engine of O(container), or of O(compose_project); C(auto) asks every installed engine.
    type: str
    choices: [auto, docker, podman]
    default: auto
  compose_project:
    description:
      - Without O(container), the compose project in which the database runs as the service that the
        configuration's database host names (C(Host) C(db) is the service C(db)), found by the compose
        labels. The database container is then used as with O(container).
    type: str
  compose_file:
    description: Like O(compose_project), the project being the one brought up from this compose file.
    type: path
notes:
  - Passwords reach the engine's tools only through a private 0600 file in a 0700 folder (C(PGPASSFILE), or
    MySQL's C(--defaults-extra-file)), removed afterwards; never a command line, a result or a log.
  - The privileges that a restore needs (PostgreSQL C(CREATEDB), membership, C(CONNECT)/C(CREATE);
    MySQL/MariaDB the database's privileges, C(SET USER), C(SUPER) with binary logging) are listed in
    M(pacs.orthanc.db_restore)'s O(pacs.orthanc.db_restore#module:admin_username) and checked before
    anything changes. A dump needs only to read the database, as the user Orthanc connects as.
  - Needs C(postgresql-client) (C(pg_dump), C(pg_restore), C(psql)) or C(mariadb-client) (C(mysqldump),
    C(mysql)) on the managed host, unless the database runs in a container (O(container)), whose own tools
    are used.
"""
