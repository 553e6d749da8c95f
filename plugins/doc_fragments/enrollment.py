# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations


class ModuleDocFragment:
    # How a licensing cluster reaches its root cluster to enroll a key (get its SLC), shared by the
    # modules that enroll. Each module's description says when it enrolls.
    DOCUMENTATION = r"""
options:
  enrollment_url:
    description:
      - For a licensing cluster, URL of the root cluster (its load balancer) that enrolls the licensing cluster's key
        and issues its server licensor certificate (SLC).
    type: str
  enrollment_credential:
    description:
      - For a licensing cluster, the secret of an enrollment credential the root cluster holds for it
        (M(rmsops.rms.enrollment_credential)). Needed only when a key is enrolled.
    type: str
  enrollment_ca_path:
    description:
      - CA bundle to verify an https O(enrollment_url) with; the system CAs when omitted.
    type: path
"""
