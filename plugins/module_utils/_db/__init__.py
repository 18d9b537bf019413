# -*- coding: utf-8 -*-
# Copyright: pacs.orthanc contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Orthanc's PostgreSQL and MySQL/MariaDB databases, one module per job (as community.crypto's
module_utils/_acme/):

- ``connection``: where the database is (Orthanc's configuration, overrides), shown without its password;
- ``client``: the engines' clients for one connection, passwords in private files, errors explained;
- ``dump``: the hot dumps (pg_dump custom and directory formats, mysqldump) and their read-back check;
- ``listing``: offline readers of a dump (pg_restore --list and its SQL, mysqldump files);
- ``restore``: the restore, with every privilege it needs checked first.

Every external program runs through _common.Program / _common.run_command."""
