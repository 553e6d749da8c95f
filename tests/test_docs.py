"""The collection's documentation as a user reads it.

antsibull-docs lints and renders the module and role docs and the guides (docs/docsite/); every module's
EXAMPLES, every role README's example and every playbook in a guide passes `ansible-playbook --syntax-check`
and has its module options checked against the module's documented argument spec (ansible-doc), and its role
variables against the role's meta/argument_specs.yml, so a misspelled option or variable fails here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COLLECTION = "rmsops.rms"
MODULES = sorted(path.stem for path in (REPO / "plugins" / "modules").glob("*.py"))
ROLES = sorted(path.parent.parent.name for path in (REPO / "roles").glob("*/meta/argument_specs.yml"))
GUIDES = REPO / "docs" / "docsite" / "rst"
# Where rmsd lives on a managed host: the server role's virtualenv.
RMSD_PYTHON = "/opt/rmsd/venv/bin/python"
# The configuration databases every example names, as the example inventory and the guides do.
DATABASES = {
    "corp": ("postgresql://rms@pg.corp.example.com:5432/drms_config_corp?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem",
             "sqlite:////var/lib/rmsd/corp/config.db"),
    "finance": ("postgresql://rms@pg.corp.example.com:5432/drms_config_finance?sslmode=verify-full&sslrootcert=/etc/ssl/certs/corp-ca.pem",),
    "lab": ("sqlite:////var/lib/rmsd/lab/config.db",),
}
TASK_LISTS = ("tasks", "pre_tasks", "post_tasks", "handlers", "block", "rescue", "always")
NOT_MODULE = {"name", "vars", "register", "when", "become", "become_user", "environment", "loop",
              "loop_control", "module_defaults", "check_mode", "changed_when", "failed_when", "no_log",
              "delegate_to", "run_once", "tags", "notify", "ignore_errors", *TASK_LISTS}
ROLE_PREFIXES = re.compile(r"^(root_cluster|licensing_cluster|server|load_balancer|key_rotation|backup_key)_")


def env() -> dict:
    """The collection from this checkout (build/collections, as the Makefile and conftest set it)."""
    # antsibull-docs runs `ansible` and `ansible-doc` from PATH.
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1",
                ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
                ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_DEPRECATION_WARNINGS="false")


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(part) for part in cmd], check=False, capture_output=True, text=True,
                          timeout=600, env=env(), **kwargs)


# ---------------------------------------------------------------- what the docs say, read from the sources


def module_examples(module: str) -> list:
    source = (REPO / "plugins" / "modules" / f"{module}.py").read_text()
    match = re.search(r'^EXAMPLES = r"""(.*?)^"""', source, re.MULTILINE | re.DOTALL)
    assert match, f"{module} has no EXAMPLES"
    return yaml.safe_load(match.group(1))


def readme_examples(role: str) -> list:
    """The YAML blocks of a role's README: each a playbook."""
    text = (REPO / "roles" / role / "README.md").read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    return [yaml.safe_load(block) for block in blocks]


def rst_blocks(path: Path, language: str) -> list[str]:
    """The bodies of a guide's `.. code-block:: LANGUAGE` directives, dedented."""
    blocks = []
    lines = path.read_text().splitlines()
    for index, line in enumerate(lines):
        match = re.match(rf"^(\s*)\.\. code-block:: {language}$", line)
        if not match:
            continue
        indent = len(match.group(1))
        body = []
        for following in lines[index + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        text = "\n".join(body).strip("\n")
        width = min(len(part) - len(part.lstrip()) for part in text.splitlines() if part.strip())
        blocks.append("\n".join(part[width:] for part in text.splitlines()))
    return blocks


def is_playbook(document) -> bool:
    return isinstance(document, list) and all(
        isinstance(play, dict) and ("hosts" in play or "ansible.builtin.import_playbook" in play)
        for play in document)


def guide_playbooks() -> dict:
    return {f"{path.name}#{index}": document
            for path in sorted(GUIDES.glob("*.rst"))
            for index, document in enumerate(map(yaml.safe_load, rst_blocks(path, "yaml")))
            if is_playbook(document)}


def tasks_of(items, inherited=None):
    """Every task of a task list, with the vars and module_defaults of the blocks around it."""
    inherited = inherited or {"vars": {}, "module_defaults": {}}
    for task in items or []:
        scope = {"vars": {**inherited["vars"], **(task.get("vars") or {})},
                 "module_defaults": {**inherited["module_defaults"], **(task.get("module_defaults") or {})}}
        if "block" in task:
            for key in ("block", "rescue", "always"):
                yield from tasks_of(task.get(key), scope)
        else:
            yield task, scope


def play_tasks(play):
    for key in ("pre_tasks", "tasks", "post_tasks", "handlers"):
        yield from tasks_of(play.get(key), {"vars": play.get("vars") or {}, "module_defaults": {}})


def action_of(task) -> str:
    actions = [key for key in task if key not in NOT_MODULE]
    assert len(actions) == 1, f"task {task.get('name')!r} names no single action: {actions}"
    return actions[0]


# ---------------------------------------------------------------- argument specs


@pytest.fixture(scope="module")
def module_docs():
    """Each module's documented options (with its doc fragments), as ansible-doc reads them."""
    proc = run([BIN / "ansible-doc", "--json", "-t", "module", *(f"{COLLECTION}.{name}" for name in MODULES)])
    assert proc.returncode == 0, proc.stderr
    docs = json.loads(proc.stdout)
    return {name.rsplit(".", 1)[1]: entry["doc"]["options"] for name, entry in docs.items()}


def spec_from_doc(options: dict) -> dict:
    spec = {}
    for name, option in options.items():
        entry = {key: option[key] for key in ("type", "required", "choices", "elements", "aliases", "no_log")
                 if key in option}
        if "suboptions" in option:
            entry["options"] = spec_from_doc(option["suboptions"])
        spec[name] = entry
    return spec


def role_spec(role: str, entry_point: str) -> dict:
    specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
    return specs["argument_specs"][entry_point]["options"]


PLACEHOLDERS = {"str": "x", "path": "/x", "int": 1, "float": 1.0, "bool": True, "list": [], "dict": {},
                "raw": "x"}


def untemplated(value, spec: dict):
    """The value with every templated part replaced by a value of the type the spec asks for, so that the
    validator checks names, types and choices of what is literal."""
    if isinstance(value, str) and "{{" in value:
        if spec.get("choices"):
            return spec["choices"][0]
        return PLACEHOLDERS[spec.get("type", "str")]
    if isinstance(value, dict) and "options" in spec:
        return {key: untemplated(item, spec["options"].get(key, {})) for key, item in value.items()}
    if isinstance(value, list) and spec.get("elements") == "dict" and "options" in spec:
        return [untemplated(item, {"type": "dict", "options": spec["options"]}) for item in value]
    return value


def validate(spec: dict, params: dict, *, check_required: bool = True) -> list[str]:
    if not check_required:
        spec = {name: {**entry, "required": False} for name, entry in spec.items()}
    params = {name: untemplated(value, spec.get(name, {})) for name, value in params.items()}
    result = ArgumentSpecValidator(spec).validate(params)
    return [str(error) for error in result.errors]


def check_module_task(task, scope, module_docs) -> list[str]:
    """What is wrong with one task of an example: unknown or misspelled options, wrong types, a missing
    required option, an rmsops.rms module run without the python rmsd lives under, another database."""
    action = action_of(task)
    name = task.get("name", "?")
    if not action.startswith(f"{COLLECTION}."):
        assert action.startswith("ansible.builtin."), f"{name}: {action} is not a fully qualified name"
        return []
    module = action.split(".")[-1]
    if module not in module_docs:
        return [f"{name}: {action} is no module of {COLLECTION}"]
    params = dict(task[action] or {})
    for group, defaults in scope["module_defaults"].items():
        if group in (f"group/{COLLECTION}.rmsd", action):
            params = {**defaults, **params}
    problems = [f"{name}: {error}" for error in validate(spec_from_doc(module_docs[module]), params)]
    interpreter = {**scope["vars"], **(task.get("vars") or {})}.get("ansible_python_interpreter")
    if interpreter not in (RMSD_PYTHON, "{{ server_rmsd_python }}"):
        problems.append(f"{name}: runs {action} without ansible_python_interpreter: {RMSD_PYTHON}")
    cluster = params.get("cluster", params.get("name"))
    if isinstance(cluster, str) and cluster in DATABASES and params.get("database_url") not in DATABASES[cluster]:
        problems.append(f"{name}: cluster {cluster} with database {params.get('database_url')}, "
                        f"not one of {DATABASES[cluster]}")
    return problems


def check_role_vars(play) -> list[str]:
    """Variables given to a role of this collection must be variables of that role's entry point."""
    problems = []
    for entry in play.get("roles", []):
        role = entry["role"] if isinstance(entry, dict) else entry
        if role.startswith(f"{COLLECTION}."):
            spec = role_spec(role.split(".")[-1], "main")
            given = (entry.get("vars") if isinstance(entry, dict) else None) or {}
            problems += [f"{role}: {error}" for error in validate(spec, given, check_required=False)]
    for task, _ in play_tasks(play):
        included = task.get("ansible.builtin.include_role") or task.get("ansible.builtin.import_role")
        if included and included["name"].startswith(f"{COLLECTION}."):
            spec = role_spec(included["name"].split(".")[-1], included.get("tasks_from", "main"))
            problems += [f"{included['name']}: {error}" for error in validate(spec, task.get("vars") or {},
                                                                              check_required=False)]
    return problems


def syntax_check(tmp_path: Path, name: str, plays: list) -> None:
    playbook = tmp_path / f"{name}.yml"
    playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    proc = run([BIN / "ansible-playbook", "-i", "localhost,", "--syntax-check", playbook], cwd=tmp_path)
    assert proc.returncode == 0, f"{name} fails --syntax-check:\n{proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------- module examples


def test_every_module_example_is_a_playbook_fragment_that_passes_syntax_check(tmp_path):
    plays = [{"name": f"Examples of {COLLECTION}.{module}", "hosts": "localhost", "gather_facts": False,
              "tasks": module_examples(module)} for module in MODULES]
    syntax_check(tmp_path, "module-examples", plays)


@pytest.mark.parametrize("module", MODULES)
def test_module_example_options_match_the_modules_argument_spec(module, module_docs):
    tasks = list(tasks_of(module_examples(module)))
    assert any(action_of(task) == f"{COLLECTION}.{module}" for task, _ in tasks)
    problems = [problem for task, scope in tasks for problem in check_module_task(task, scope, module_docs)]
    assert problems == []


def test_a_misspelled_option_or_a_missing_interpreter_is_caught(module_docs):
    """The checks above fail on what makes an example break when pasted."""
    task = module_examples("cluster_info")[0]
    args = task["rmsops.rms.cluster_info"]

    def problems(broken):
        return check_module_task(broken, {"vars": {}, "module_defaults": {}}, module_docs)

    assert problems(task) == []
    assert any("databse_url" in problem
               for problem in problems({**task, "rmsops.rms.cluster_info": {**args, "databse_url": "x"}}))
    bare = {key: value for key, value in task.items() if key != "vars"}
    assert any("ansible_python_interpreter" in problem for problem in problems(bare))
    provision = module_examples("cluster")[0]
    assert problems(provision) == []
    for wrong in ({"key_size": 1234}, {"key_size": "large"}, {"state": "gone"}):
        assert problems({**provision, "rmsops.rms.cluster": {**provision["rmsops.rms.cluster"], **wrong}}), wrong
    elsewhere = {**task, "rmsops.rms.cluster_info": {**args, "database_url": "sqlite:////tmp/other.db"}}
    assert any("other.db" in problem for problem in problems(elsewhere))


# ---------------------------------------------------------------- role READMEs and guides


@pytest.mark.parametrize("role", ROLES)
def test_role_readme_example_passes_syntax_check_with_the_roles_variables(role, tmp_path, module_docs):
    playbooks = readme_examples(role)
    assert playbooks, f"roles/{role}/README.md has no example"
    plays = [play for playbook in playbooks for play in playbook]
    fqcn = f"{COLLECTION}.{role}"
    assert any(entry == fqcn or (isinstance(entry, dict) and entry.get("role") == fqcn)
               for play in plays for entry in play.get("roles", []))
    problems = [problem for play in plays for problem in check_role_vars(play)]
    problems += [problem for play in plays for task, scope in play_tasks(play)
                 for problem in check_module_task(task, scope, module_docs)]
    assert problems == []
    syntax_check(tmp_path, f"{role}-readme", plays)


def test_every_playbook_in_the_guides_passes_syntax_check(tmp_path, module_docs):
    playbooks = guide_playbooks()
    assert len(playbooks) >= 4
    problems = []
    for name, plays in playbooks.items():
        for play in plays:
            if "hosts" in play:
                problems += [f"{name}: {problem}" for problem in check_role_vars(play)]
                problems += [f"{name}: {problem}" for task, scope in play_tasks(play)
                             for problem in check_module_task(task, scope, module_docs)]
    assert problems == []
    syntax_check(tmp_path, "guide-playbooks", [play for plays in playbooks.values() for play in plays])


def known_variables() -> set[str]:
    """Every variable of the collection's roles, and those its playbooks read from the inventory."""
    names = set()
    for path in (REPO / "roles").glob("*/meta/argument_specs.yml"):
        for entry in yaml.safe_load(path.read_text())["argument_specs"].values():
            names.update(entry.get("options", {}))
    for path in (REPO / "playbooks").glob("*.yml"):
        names.update(re.findall(r"\b((?:rms|backup_key)_[a-z0-9_]+)\b", path.read_text()))
    return names


def mapping_keys(document):
    if isinstance(document, dict):
        for key, value in document.items():
            yield key
            yield from mapping_keys(value)
    elif isinstance(document, list):
        for item in document:
            yield from mapping_keys(item)


def test_inventory_snippets_in_the_guides_name_only_variables_the_collection_reads():
    known = known_variables()
    unknown = {}
    for path in sorted(GUIDES.glob("*.rst")):
        for document in map(yaml.safe_load, rst_blocks(path, "yaml")):
            if not is_playbook(document):
                unknown.update({key: path.name for key in mapping_keys(document)
                                if isinstance(key, str) and ROLE_PREFIXES.match(key) and key not in known})
    assert unknown == {}


def test_commands_in_the_guides_run_playbooks_and_variables_that_exist():
    known = known_variables()
    playbooks = {path.stem for path in (REPO / "playbooks").glob("*.yml")}
    commands = [line for path in sorted(GUIDES.glob("*.rst")) for block in rst_blocks(path, "console")
                for line in block.splitlines() if line.startswith("$ ansible-playbook")]
    assert commands
    for command in commands:
        named = re.findall(rf"\b{re.escape(COLLECTION)}\.([a-z_]+)\b", command)
        assert named and set(named) <= playbooks, command
        for variable in re.findall(r"-e '?\{?\"?([a-z_]+)\"?[=:]", command):
            assert variable in known, command


def test_links_match_galaxy_yml():
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    links = yaml.safe_load((REPO / "docs" / "docsite" / "links.yml").read_text())
    repository = galaxy["repository"]
    assert repository == f"https://github.com/{links['edit_on_github']['repository']}"
    for link in links["extra_links"]:
        assert link["url"] in (galaxy["issues"], galaxy["repository"], galaxy["homepage"]), link


def test_extra_docs_lists_every_guide_and_gitops_md_points_to_its_guide():
    extra = yaml.safe_load((REPO / "docs" / "docsite" / "extra-docs.yml").read_text())
    listed = [entry for section in extra["sections"] for entry in section["toctree"]]
    assert sorted(listed) == sorted(path.stem for path in GUIDES.glob("*.rst"))
    # One source of truth: docs/gitops.md only points to the guide.
    pointer = (REPO / "docs" / "gitops.md").read_text()
    assert "docsite/rst/guide_gitops.rst" in pointer and len(pointer.splitlines()) < 10


# ---------------------------------------------------------------- antsibull-docs


def test_antsibull_docs_lints_the_collection_docs_and_guides_clean():
    proc = run([BIN / "antsibull-docs", "lint-collection-docs", "--plugin-docs", "."], cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "", f"{proc.stdout}{proc.stderr}"


def test_antsibull_docs_renders_every_module_role_and_guide(tmp_path):
    proc = run([BIN / "antsibull-docs", "collection", "--use-current", "--fail-on-error",
                "--dest-dir", tmp_path, COLLECTION], cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not re.search(r"warning|error", output, re.IGNORECASE), output
    rendered = tmp_path / "collections" / "rmsops" / "rms"
    for module in MODULES:
        page = (rendered / f"{module}_module.rst").read_text()
        assert "Examples" in page and "ansible_python_interpreter: /opt/rmsd/venv/bin/python" in page, module
    for role in ROLES:
        assert (rendered / f"{role}_role.rst").is_file(), role
    index = (rendered / "index.rst").read_text()
    for guide in sorted(GUIDES.glob("*.rst")):
        page = rendered / "docsite" / guide.name
        assert page.read_text() == guide.read_text(), guide.name
        assert f"docsite/{guide.stem}" in index, guide.name


def test_first_cluster_inventory_is_complete_for_site_yml(tmp_path):
    """The first guide's inventory, as ansible-inventory reads it, gives the root cluster role every variable
    it requires, and rmsops.rms.site passes --syntax-check with it."""
    inventory = next(document for document in map(yaml.safe_load,
                                                   rst_blocks(GUIDES / "guide_first_cluster.rst", "yaml"))
                     if isinstance(document, dict) and "all" in document)
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inventory))
    proc = run([BIN / "ansible-inventory", "-i", tmp_path / "hosts.yml", "--list"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout)
    hosts = listed["rms_root"]["hosts"]
    assert hosts
    spec = role_spec("root_cluster", "main")
    for host in hosts:
        given = {name: value for name, value in listed["_meta"]["hostvars"][host].items() if name in spec}
        assert "root_cluster_key_password" in given
        assert validate(spec, given) == [], host
    proc = run([BIN / "ansible-playbook", "-i", tmp_path / "hosts.yml", "--syntax-check", f"{COLLECTION}.site"],
               cwd=tmp_path)
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}"
