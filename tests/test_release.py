"""The collection as a user gets it: built with `ansible-galaxy collection build`, installed from the
tarball into an empty collections path, and used from a folder of its own, away from this checkout."""

import ast
import json
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import release_source
import yaml
from bindep.depends import Depends
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Repository tooling and test suites, which need this checkout (and scripts/) to run.
EXCLUDED = ("tests", "molecule", "benchmarks", "scripts", ".ci", "build", ".venv", "Makefile", "ruff.toml",
            ".git", "rmsd/tests", "execution-environment.yml")
INSTALLED = ("ansible_collections", "rmsops", "rms")


def user_env(collections: Path, home: Path) -> dict:
    """Only the installed copy is visible: no build/collections symlink, no ~/.ansible copy."""
    return dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_HOME=str(home),
                ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", ANSIBLE_LOCALHOST_WARNING="false",
                ANSIBLE_RETRY_FILES_ENABLED="false", ANSIBLE_COLLECTIONS_SCAN_SYS_PATH="false")


def listed(text: str) -> list[str]:
    """The entries of a requirements or bindep file."""
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(tarball, collections path the tarball is installed into, environment that sees only that copy)."""
    root = tmp_path_factory.mktemp("release")
    dist, collections, home = root / "dist", root / "collections", root / "ansible-home"
    env = user_env(collections, home)
    run([BIN / "ansible-galaxy", "collection", "build", "--output-path", dist, REPO], cwd=root, env=env)
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    tarball = dist / f"rmsops-rms-{galaxy['version']}.tar.gz"
    run([BIN / "ansible-galaxy", "collection", "install", "--offline", "-p", collections, tarball],
        cwd=root, env=env)
    return tarball, collections, env


def test_tarball_ships_the_license_and_none_of_the_repository_tooling(release):
    tarball, _, _ = release
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("MANIFEST.json"))["collection_info"]
    assert "LICENSE" in names
    assert "plugins/modules/cluster.py" in names
    # The server role installs rmsd from its source with the pinned dependencies.
    assert "rmsd/pyproject.toml" in names and "constraints.txt" in names
    assert "requirements/rmsd-wheelhouse.lock" in names  # the hashes every wheel it installs must have
    shipped = [name for name in names
               if any(name == path or name.startswith(path + "/") for path in EXCLUDED)]
    assert shipped == []
    assert manifest["license"] == ["GPL-3.0-or-later"]
    for link in ("repository", "documentation", "homepage", "issues"):
        assert manifest[link].startswith("https://github.com/rmsops/rms"), link


def test_installed_copy_has_the_license(release):
    _, collections, _ = release
    installed = collections.joinpath(*INSTALLED)
    assert not installed.is_symlink()
    assert (installed / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in (installed / "LICENSE").read_text()
    for path in EXCLUDED:
        assert not (installed / path).exists(), path


def test_shipped_playbook_passes_syntax_check_against_the_installed_copy(release, tmp_path):
    _, collections, env = release
    installed = collections.joinpath(*INSTALLED)
    listed = run([BIN / "ansible-galaxy", "collection", "list", "rmsops.rms", "--format", "json"],
                 cwd=tmp_path, env=env)
    assert list(json.loads(listed.stdout)) == [str(collections / "ansible_collections")]
    inventory = installed / "playbooks" / "inventories" / "example"
    for playbook in ("rmsops.rms.site", "rmsops.rms.rotate_compromised_key", "rmsops.rms.backup_key"):
        proc = run([BIN / "ansible-playbook", "-i", inventory, "--syntax-check", playbook], cwd=tmp_path, env=env)
        assert "playbook: " in proc.stdout


def test_ansible_builder_introspection_lists_the_installed_collections_requirements(release):
    _, collections, env = release
    proc = run([BIN / "ansible-builder", "introspect", "--sanitize", collections], env=env)
    found = yaml.safe_load(proc.stdout[proc.stdout.index("---"):])
    requirements = (REPO / "meta" / "ee-requirements.txt").read_text()
    bindep = (REPO / "meta" / "ee-bindep.txt").read_text()
    assert listed(requirements) and listed(bindep)
    assert found["python"] == [f"{line}  # from collection rmsops.rms" for line in listed(requirements)]
    assert found["system"] == [f"{line}  # from collection rmsops.rms" for line in listed(bindep)]
    # bindep's own parser: ssh for Debian and for RPM-based images.
    depends = Depends(bindep)
    assert [rule[0] for rule in depends.active_rules(["platform:dpkg"])] == ["openssh-client"]
    assert [rule[0] for rule in depends.active_rules(["platform:rpm"])] == ["openssh-clients"]


def test_execution_environment_definition_builds_a_context_with_the_tarball(release, tmp_path):
    """ansible-builder validates the version 3 definition and copies the tarball it names."""
    tarball, _, env = release
    (tmp_path / "build" / "ee").mkdir(parents=True)
    (tmp_path / "build" / "ee" / tarball.name).write_bytes(tarball.read_bytes())
    definition = tmp_path / "execution-environment.yml"
    definition.write_text((REPO / "execution-environment.yml").read_text())
    assert yaml.safe_load(definition.read_text())["version"] == 3
    run([BIN / "ansible-builder", "create", "-f", definition, "-c", tmp_path / "context"], cwd=tmp_path, env=env)
    context = tmp_path / "context"
    assert (context / "_build" / "collections" / tarball.name).read_bytes() == tarball.read_bytes()
    requirements = yaml.safe_load((context / "_build" / "requirements.yml").read_text())
    assert requirements["collections"] == [{"name": f"collections/{tarball.name}", "type": "file"}]
    assert "introspect" in (context / "Containerfile").read_text()


def recorded_releases() -> list[dict]:
    releases = yaml.safe_load((REPO / "changelogs" / "releases.yml").read_text())["releases"]
    # What the upgrade tests and scenario install reads the file without a YAML library: it must agree.
    assert release_source.releases() == [{"version": r["version"], "commit": r["commit"]} for r in releases]
    return releases


def git(*args: str) -> str:
    return run(["git", "-C", REPO, *args]).stdout


def test_the_tree_is_the_next_release_after_the_last_one_recorded():
    """galaxy.yml and rmsd name a version after the last release; changelog.yaml has no entry for it yet, so
    every fragment written since goes to it, and none joins a release that was cut."""
    releases = recorded_releases()
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    rmsd = tomllib.loads((REPO / "rmsd" / "pyproject.toml").read_text())["project"]["version"]
    changelog = yaml.safe_load((REPO / "changelogs" / "changelog.yaml").read_text())
    assert rmsd == version
    assert [Version(r["version"]) for r in releases] == sorted(Version(r["version"]) for r in releases)
    assert Version(version) > Version(releases[-1]["version"])
    assert version not in changelog["releases"]
    assert sorted(changelog["releases"], key=Version) == [r["version"] for r in releases]
    released = [name for data in changelog["releases"].values() for name in data.get("fragments", [])]
    assert len(released) == len(set(released))  # no fragment in two releases


@pytest.mark.parametrize("release", recorded_releases(), ids=lambda release: release["version"])
def test_a_recorded_release_is_the_commit_it_names_and_its_entry_is_as_it_was_cut(release):
    commit = release["commit"]
    assert git("cat-file", "-t", commit).strip() == "commit", f"{commit} is not in this checkout's history"
    assert yaml.safe_load(git("show", f"{commit}:galaxy.yml"))["version"] == release["version"]
    assert tomllib.loads(git("show", f"{commit}:rmsd/pyproject.toml"))["project"]["version"] == release["version"]
    at_cut = yaml.safe_load(git("show", f"{commit}:changelogs/changelog.yaml"))["releases"][release["version"]]
    now = yaml.safe_load((REPO / "changelogs" / "changelog.yaml").read_text())["releases"][release["version"]]
    assert now == at_cut, "a release's changelog entry changed after it was cut: new fragments go to the next one"
    assert at_cut["release_date"] == release["date"]
    # Every fragment the release lists was in the tree at the commit, and is still here unchanged.
    for name in at_cut.get("fragments", []):
        assert git("show", f"{commit}:changelogs/fragments/{name}") == (REPO / "changelogs" / "fragments" / name
                                                                         ).read_text(), name


def test_changelog_rst_is_generated_from_changelog_yaml(tmp_path):
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    changelog = yaml.safe_load((REPO / "changelogs" / "changelog.yaml").read_text())
    # Every module and plugin was added in a released version or in the one to come, and the changelog
    # announces those of a release.
    added = {entry["name"]: release for release, data in changelog["releases"].items()
             for kind in ("modules", "plugins") for entry in _flatten(data.get(kind, []))}
    for path in sorted((REPO / "plugins").glob("*/*.py")):
        doc = _documentation(path)
        if doc is not None:
            assert str(doc["version_added"]) in [*changelog["releases"], version], path
            if str(doc["version_added"]) != version:
                assert added.get(path.stem) == str(doc["version_added"]), path
    # CHANGELOG.rst is what antsibull-changelog makes of changelogs/ (the plugin cache spares ansible-doc).
    (tmp_path / "changelogs").mkdir()
    for name in ("config.yaml", "changelog.yaml", ".plugin-cache.yaml"):
        (tmp_path / "changelogs" / name).write_text((REPO / "changelogs" / name).read_text())
    (tmp_path / "galaxy.yml").write_text((REPO / "galaxy.yml").read_text())
    run([BIN / "antsibull-changelog", "generate"], cwd=tmp_path)
    assert (tmp_path / "CHANGELOG.rst").read_text() == (REPO / "CHANGELOG.rst").read_text()


def _flatten(entries):
    """changelog.yaml lists modules as a list, other plugins as a list per plugin type."""
    if isinstance(entries, dict):
        return [entry for group in entries.values() for entry in group]
    return entries


def _documentation(path: Path) -> dict | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["DOCUMENTATION"]:
            return yaml.safe_load(node.value.value)
    return None
