"""The shape of the code, checked on its source: rmsd's modules import each other without a cycle, only
rmsd.clusters touches the configuration database's tables, the node's operations know nothing of HTTP,
and rmsd knows nothing of Ansible."""

import ast
from pathlib import Path

import rmsd

PACKAGE = Path(rmsd.__file__).parent
TABLE_MODULE = "rmsd.clusters"
# What other modules may take from rmsd.schema: the clock and column types, not tables.
SCHEMA_HELPERS = {"utcnow", "UTCDateTime", "metadata"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every rmsd import in the file, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [alias.name for alias in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for module, names in _imports(path):
            if not module.startswith("rmsd"):
                continue
            targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES} or {module}
            graph[name] |= {t for t in targets if t in MODULES and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph, or None (depth-first search, colouring the path being walked)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_rmsd_imports_have_no_cycle():
    graph = _graph()
    assert "rmsd.admin.cluster" in graph and "rmsd.keys.pkcs11" in graph  # the packages were walked
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_only_one_module_touches_the_tables():
    offenders = {
        name: sorted(set(names) - SCHEMA_HELPERS)
        for name, path in MODULES.items() if name not in (TABLE_MODULE, "rmsd.schema")
        for module, names in _imports(path) if module == "rmsd.schema" and set(names) - SCHEMA_HELPERS
    }
    assert offenders == {}


def test_the_node_knows_nothing_of_http_and_rmsd_nothing_of_ansible():
    for name in ("rmsd.node", *[m for m in MODULES if m.startswith(("rmsd.admin", "rmsd.keys"))]):
        imported = {module.split(".")[0] for module, _ in _imports(MODULES[name])}
        assert not imported & {"fastapi", "starlette", "uvicorn", "pydantic"}, (name, imported)
    for name, path in MODULES.items():
        imported = {module.split(".")[0] for module, _ in _imports(path)}
        assert "ansible" not in imported and "ansible_collections" not in imported, name
        assert "rmsops.rms" not in path.read_text(), f"{name} speaks of the Ansible collection"


def test_admin_modules_stay_small():
    sizes = {name: len(MODULES[name].read_text().splitlines()) for name in MODULES if name.startswith("rmsd.admin")}
    assert max(sizes.values()) <= 300, sizes
