# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # The connection to a cluster's configuration database, shared by every module.
    DOCUMENTATION = r"""
options:
  database_url:
    description:
      - URL of the cluster's configuration database.
      - C(sqlite:////var/lib/rmsd/corp/config.db) for a single-node cluster (the file and its folder are created
        on first use, readable by their owner only), or C(postgresql://USER@HOST:PORT/DATABASE) for a database
        shared by the members of a cluster.
      - Give the password in O(database_password), never inside the URL.
      - If not set, the value of the E(RMSD_DATABASE_URL) environment variable is used.
    type: str
    required: true
  database_password:
    description:
      - Password of the configuration database user (PostgreSQL).
      - If not set, the value of the E(RMSD_DATABASE_PASSWORD) environment variable is used.
    type: str
requirements:
  - rmsd (the RMS node software bundled with this collection) importable by the Python running the module;
    the C(rmsops.rms.server) role installs it into a virtualenv, point C(ansible_python_interpreter) at that
    virtualenv's python.
"""
