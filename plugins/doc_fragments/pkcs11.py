# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # The PKCS#11 token of a cluster whose keys are protected by an HSM (key_protection=pkcs11).
    DOCUMENTATION = r"""
options:
  pkcs11:
    description:
      - The PKCS#11 token that holds the cluster keys of a cluster with C(key_protection=pkcs11) (an HSM partition;
        SoftHSM2 in tests). Every member of the cluster uses the same token.
      - Keys are generated inside the token, sensitive and not extractable; the configuration database holds only
        their public keys and labels.
      - Not for a cluster whose keys are protected by a password.
    type: dict
    suboptions:
      module:
        description:
          - Path of the PKCS#11 module (shared library) on the managed host, for example
            C(/usr/lib/softhsm/libsofthsm2.so).
        type: path
        required: true
      token_label:
        description:
          - Label of the token (or HSM partition) the keys live in.
        type: str
        required: true
      pin:
        description:
          - The token's user PIN. A secret; never shown in output or diff.
        type: str
        required: true
"""
