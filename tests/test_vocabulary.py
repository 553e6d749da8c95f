"""One vocabulary: the choices the modules (and the roles that pass them on) offer are rmsd's own.

rmsd validates every value the modules pass; a choice documented here but refused by rmsd, or accepted by
rmsd but missing here, is a mismatch these tests catch. A module's DOCUMENTATION (with its doc fragments)
and argument spec are read from the source (ast and YAML), so the modules are not imported.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import yaml

from rmsd import admin, keys

REPO = Path(__file__).resolve().parent.parent
MODULES = sorted((REPO / "plugins" / "modules").glob("*.py"))
FRAGMENTS = REPO / "plugins" / "doc_fragments"
COLLECTION = "rmsops.rms"


def accepted(function, parameter: str) -> tuple:
    """The values rmsd's `function` accepts for `parameter`, read from its own check of it, written
    `if parameter not in VALUES: ...` or `check_...(parameter, VALUES)`: for the parameters rmsd names no
    constant for."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))

    def is_parameter(node):
        return isinstance(node, ast.Name) and node.id == parameter

    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and is_parameter(node.left) and len(node.ops) == 1
                and isinstance(node.ops[0], ast.NotIn)):
            found.append(node.comparators[0])
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and is_parameter(node.args[0]):
            called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if called.startswith("check"):
                found.append(node.args[1])
    assert len(found) == 1, f"{function.__qualname__} has no single check of {parameter!r} to read"

    def value(node):
        if isinstance(node, ast.Name):
            return function.__globals__[node.id]
        if isinstance(node, (ast.Tuple, ast.List)):
            items = []
            for item in node.elts:
                items.extend(value(item.value) if isinstance(item, ast.Starred) else [value(item)])
            return tuple(items)
        return ast.literal_eval(node)

    return tuple(value(found[0]))


# Module option (dotted for a suboption) -> the values rmsd accepts for it.
MODULE_CHOICES = {
    ("cluster", "role"): admin.ROLES,
    ("cluster", "key_protection"): keys.PROTECTIONS,
    ("cluster", "key_size"): keys.KEY_SIZES,
    ("cluster", "state"): admin.STATES,
    ("cluster_key", "key_size"): keys.KEY_SIZES,
    ("cluster_key", "compromised_key_in_token"): admin.TOKEN_ACTIONS,
    ("trusted_publishing_domain", "state"): admin.TPD_STATES,
    ("server", "state"): accepted(admin.ensure_server, "state"),
    ("enrollment_credential", "state"): accepted(admin.ensure_enrollment_credential, "state"),
    ("rights_template", "state"): accepted(admin.ensure_rights_template, "state"),
}

# Role option -> the values rmsd accepts for the module option the role passes it to, as the role offers them.
ROLE_CHOICES = {
    ("root_cluster", "main", "root_cluster_key_protection"): keys.PROTECTIONS,
    ("root_cluster", "main", "root_cluster_key_size"): keys.KEY_SIZES,
    ("licensing_cluster", "main", "licensing_cluster_key_size"): keys.KEY_SIZES,
    # The role keeps its cluster; it never removes it.
    ("licensing_cluster", "main", "licensing_cluster_state"): tuple(s for s in admin.STATES if s != "absent"),
    ("licensing_cluster", "enrollment_credential", "licensing_cluster_credential_state"):
        accepted(admin.ensure_enrollment_credential, "state"),
    # "" leaves the option unset.
    ("key_rotation", "main", "key_rotation_compromised_key_in_token"): ("", *admin.TOKEN_ACTIONS),
}


def _constant(path: Path, name: str) -> str:
    """The string assigned to `name` at the top level of a Python file (or, in a class, of its body)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} assigns no {name}")


def _fragment(reference: str) -> dict:
    """A doc fragment of this collection: rmsops.rms.NAME (DOCUMENTATION) or rmsops.rms.NAME.VAR."""
    assert reference.startswith(COLLECTION + "."), f"{reference} is not a fragment of {COLLECTION}"
    name, _, var = reference[len(COLLECTION) + 1:].partition(".")
    return yaml.safe_load(_constant(FRAGMENTS / f"{name}.py", var.upper() or "DOCUMENTATION"))


def module_options(path: Path) -> dict:
    """The options a module documents, its doc fragments' included."""
    doc = yaml.safe_load(_constant(path, "DOCUMENTATION"))
    options = dict(doc.get("options") or {})
    for reference in doc.get("extends_documentation_fragment") or []:
        if reference.startswith("ansible.builtin."):
            continue  # ansible-core's own (files: owner, group, mode), which speak no rmsd vocabulary
        for name, spec in (_fragment(reference).get("options") or {}).items():
            options.setdefault(name, spec)
    return options


def documented_choices(options: dict, prefix: str = "") -> dict:
    """Option (dotted for a suboption) -> its documented choices, for every option that has any."""
    found = {}
    for name, spec in options.items():
        if "choices" in spec:
            found[prefix + name] = spec["choices"]
        found.update(documented_choices(spec.get("suboptions") or {}, f"{prefix}{name}."))
    return found


def _spec_entries(node):
    """(name, spec node) of an argument spec written as dict(name=...) or {"name": ...}."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return [(kw.arg, kw.value) for kw in node.keywords if kw.arg is not None]
    if isinstance(node, ast.Dict):
        return [(k.value, v) for k, v in zip(node.keys, node.values)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


def coded_choices(spec_node, prefix: str = "") -> dict:
    """Option (dotted for a suboption) -> the choices of an argument spec in the module's code."""
    found = {}
    for name, option in _spec_entries(spec_node):
        for key, value in _spec_entries(option):
            if key == "choices":
                found[prefix + name] = ast.literal_eval(value)
            elif key == "options":
                found.update(coded_choices(value, f"{prefix}{name}."))
    return found


def module_argument_spec(path: Path):
    """The argument spec the module passes to rmsd_module() (or AnsibleModule(argument_spec=...))."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "rmsd_module" and node.args:
                return node.args[0]
            if node.func.id == "AnsibleModule":
                return next(kw.value for kw in node.keywords if kw.arg == "argument_spec")
    raise AssertionError(f"{path.name} builds no module")


def _same(a, b) -> bool:
    return len(a) == len(set(a)) and len(b) == len(set(b)) and set(a) == set(b)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_documented_choices_are_rmsd_vocabulary(path):
    module = path.stem
    documented = documented_choices(module_options(path))
    expected = {option: rmsd for (name, option), rmsd in MODULE_CHOICES.items() if name == module}
    assert set(documented) == set(expected), (
        f"{module}: options with choices {sorted(documented)}, but rmsd's vocabulary is known for "
        f"{sorted(expected)}: name the rmsd constant of a new option with choices in MODULE_CHOICES"
    )
    for option, choices in documented.items():
        assert _same(choices, expected[option]), (
            f"{module}: {option} documents choices {choices}, rmsd accepts {list(expected[option])}"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_coded_choices_are_documented(path):
    documented = documented_choices(module_options(path))
    coded = coded_choices(module_argument_spec(path))
    # The argument specs shared through module_utils (database, pkcs11, enrollment) have no choices.
    assert set(coded) == set(documented), f"{path.stem}: choices in the code {coded}, documented {documented}"
    for option, choices in coded.items():
        assert _same(choices, documented[option]), f"{path.stem}: {option} code {choices}, docs {documented[option]}"


def test_every_known_vocabulary_belongs_to_a_module():
    modules = {path.stem for path in MODULES}
    assert {name for name, _ in MODULE_CHOICES} <= modules


@pytest.mark.parametrize("role, entry_point, option", list(ROLE_CHOICES), ids=lambda v: v)
def test_role_choices_are_rmsd_vocabulary(role, entry_point, option):
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    choices = specs["argument_specs"][entry_point]["options"][option]["choices"]
    expected = ROLE_CHOICES[(role, entry_point, option)]
    assert _same(choices, expected), f"{role}: {option} offers {choices}, rmsd accepts {list(expected)}"


def test_accepted_reads_the_check():
    # The helper finds a named constant as well as a literal.
    assert accepted(admin.ensure_cluster, "state") == tuple(admin.STATES)
    assert accepted(admin.ensure_trusted_publishing_domain, "state") == tuple(admin.TPD_STATES)
