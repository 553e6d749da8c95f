# -*- coding: utf-8 -*-
# Copyright: rmsops.rms contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""What the rmsops.rms modules share: the guarded rmsd import, the database connection options and
the call into rmsd's admin API. All RMS logic lives in rmsd; the modules only translate."""

from __future__ import annotations

import re
import traceback

from ansible.module_utils.basic import AnsibleModule, env_fallback, missing_required_lib

try:
    import rmsd.admin as rmsd_admin
    from rmsd.errors import RmsdError
except ImportError:
    rmsd_admin = None
    RmsdError = Exception
    RMSD_IMPORT_ERROR = traceback.format_exc()
else:
    RMSD_IMPORT_ERROR = None

# Completes missing_required_lib's "This is required ..." sentence.
RMSD_HINT = (
    "by the rmsops.rms modules; the rmsops.rms.server role (tasks_from: install) installs rmsd into a "
    "virtualenv: point ansible_python_interpreter at its python (server_venv_dir/bin/python)"
)


def database_argument_spec():
    """The connection options every module takes; documented by the rmsops.rms.database fragment."""
    return dict(
        database_url=dict(type="str", required=True, fallback=(env_fallback, ["RMSD_DATABASE_URL"])),
        database_password=dict(
            type="str", no_log=True, fallback=(env_fallback, ["RMSD_DATABASE_PASSWORD"]),
        ),
    )


def pkcs11_argument_spec():
    """The token option of clusters with key_protection=pkcs11; documented by the rmsops.rms.pkcs11 fragment."""
    return dict(
        pkcs11=dict(
            type="dict",
            options=dict(
                module=dict(type="path", required=True),
                # A label, not a secret (validate-modules asks because of the name).
                token_label=dict(type="str", required=True, no_log=False),
                pin=dict(type="str", required=True, no_log=True),
            ),
        ),
    )


def enrollment_argument_spec():
    """How a licensing cluster reaches its root cluster to enroll a key; documented by the rmsops.rms.enrollment
    fragment."""
    return dict(
        enrollment_url=dict(type="str"),
        enrollment_credential=dict(type="str", no_log=True),
        enrollment_ca_path=dict(type="path"),
    )


def require_rmsd(module):
    """Fail with a hint on how to install rmsd rather than with a traceback."""
    if RMSD_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("rmsd", reason=RMSD_HINT), exception=RMSD_IMPORT_ERROR)


def call_admin(module, function, /, **kwargs):
    """Run rmsd.admin.<function>(**kwargs); rmsd's refusals become fail_json with rmsd's message, which
    says how to proceed and that nothing was changed."""
    require_rmsd(module)
    try:
        return getattr(rmsd_admin, function)(**kwargs)
    except TypeError as err:
        # An rmsd older than this collection lacks an option the module passes.
        if "unexpected keyword argument" not in str(err):
            raise
        module.fail_json(msg=f"the rmsd installed on this host is older than the rmsops.rms collection ({err}); "
                             "install the rmsd bundled with it first (the rmsops.rms.server role, tasks_from: install)")
    except RmsdError as err:
        module.fail_json(msg=for_ansible_users(str(err)))


# rmsd speaks of its own operations; where a message asks for one of them, name the module that does it.
HINTS = (
    (re.compile(r"^cluster '[^']*' does not exist in .*; provision it first\b"), "rmsops.rms.cluster"),
    (re.compile(r"create (a fresh|an) enrollment credential on the root cluster", re.IGNORECASE),
     "rmsops.rms.enrollment_credential"),
    (re.compile(r"as cluster information lists them"), "rmsops.rms.cluster_info"),
)


def for_ansible_users(message):
    """rmsd's message, with the module that does what it asks for named (once, in parentheses)."""
    for pattern, module_name in HINTS:
        match = pattern.search(message)
        if match and module_name not in message:
            end = match.end()
            message = f"{message[:end]} (with {module_name}){message[end:]}"
    return message


def result_to_module(result):
    """changed and diff of an rmsd admin Result (the diff holds metadata only, never secrets)."""
    return dict(changed=bool(result.changed), diff=result.diff)


def rmsd_module(argument_spec, **kwargs):
    """An AnsibleModule with the database options added, check mode supported and rmsd importable."""
    spec = dict(argument_spec)
    spec.update(database_argument_spec())
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True, **kwargs)
    require_rmsd(module)
    return module


def run_ensure(module, function, *facts, **defaults):
    """Call rmsd.admin.<function> with the module's parameters (their names are the function's keyword
    arguments) and exit with changed, the metadata-only diff, rmsd's warnings and the named facts
    (a fact rmsd did not return is `defaults[fact]`, else an empty dict; a fact whose default is a bool
    is returned as a bool)."""
    result = call_admin(module, function, check_mode=module.check_mode, **module.params)
    for warning in result.warnings:
        module.warn(warning)
    returned = {}
    for fact in facts:
        default = defaults.get(fact, {})
        value = result.facts.get(fact, default)
        returned[fact] = bool(value) if isinstance(default, bool) else value
    module.exit_json(**returned, **result_to_module(result))
