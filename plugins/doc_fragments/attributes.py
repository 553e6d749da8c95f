# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # What every module supports: check mode, diff mode and the rmsops.rms.rmsd action group of
    # meta/runtime.yml. A module adds its own details (what its diff shows) or support (an info module
    # has no diff) under attributes; those take precedence over these.
    DOCUMENTATION = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check mode), when in diff mode.
    support: full
  action_group:
    description: Use C(group/rmsops.rms.rmsd) in C(module_defaults) to set defaults for this module.
    support: full
    membership:
      - rmsops.rms.rmsd
"""
