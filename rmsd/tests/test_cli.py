"""What a person meets first: the `rmsd` command (its help, where it finds a node's configuration, a
reader that goes away) and the answer to `GET /` of a node. The command runs as a real subprocess."""

import argparse
import json
import os
import subprocess

import httpx
import pytest
from conftest import KEY_PASSWORD, RMSD, configure_node, make_issuer, provision, sqlite_database

from rmsd import cli


def rmsd(*args, env=None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([str(RMSD), *args], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=60,
                          env=dict(os.environ, **(env or {})), check=False)


def _subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _subcommands(sub, prefix + (name,))


def test_every_option_of_every_command_has_help():
    commands = list(_subcommands(cli.parser()))
    assert len(commands) >= 8
    for path, sub in commands:
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help and action.help != argparse.SUPPRESS, (path, action.option_strings)
    # As printed: the default configuration path is where the server role installs it.
    proc = rmsd("status", "--help")
    assert proc.returncode == 0
    assert "/var/lib/rmsd" in proc.stdout and "RMSD_CONFIG" in proc.stdout


@pytest.fixture
def installed(tmp_path):
    """A node configured as the server role installs one: BASE/INSTANCE/rmsd.toml."""
    base = tmp_path / "base"
    database = sqlite_database(tmp_path)
    provision(database)
    issuer = make_issuer(tmp_path / "issuer")
    _result, config, secret = configure_node(database, tmp_path, issuer, name="n1")
    (base / "n1").mkdir(parents=True)
    config.rename(base / "n1" / "rmsd.toml")
    return base, database, (tmp_path, issuer)


def test_status_finds_the_configuration_of_the_one_node_installed(installed):
    base, _database, _ = installed
    proc = rmsd("status", env={"RMSD_BASE_DIR": str(base)})
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["node"] == "n1" and status["exists"] is True
    assert KEY_PASSWORD not in proc.stdout + proc.stderr
    # RMSD_CONFIG, then --config, come first.
    proc = rmsd("status", env={"RMSD_BASE_DIR": "/nonexistent", "RMSD_CONFIG": str(base / "n1" / "rmsd.toml")})
    assert proc.returncode == 0 and json.loads(proc.stdout)["node"] == "n1", proc.stderr
    proc = rmsd("status", "--config", str(base / "n1" / "rmsd.toml"),
                env={"RMSD_BASE_DIR": "/nonexistent", "RMSD_CONFIG": "/nonexistent/rmsd.toml"})
    assert proc.returncode == 0, proc.stderr


def test_status_without_one_configuration_says_what_to_give(installed):
    base, database, (directory, issuer) = installed
    proc = rmsd("status", env={"RMSD_BASE_DIR": str(directory / "empty"), "RMSD_CONFIG": ""})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"rmsd: no node configuration found (no {directory / 'empty'}/*/rmsd.toml); give "
                           "--config PATH or set RMSD_CONFIG\n")
    # Two instances on one machine: which one is not guessed.
    _result, config, _secret = configure_node(database, directory, issuer, name="n2")
    (base / "n2").mkdir()
    config.rename(base / "n2" / "rmsd.toml")
    proc = rmsd("status", env={"RMSD_BASE_DIR": str(base), "RMSD_CONFIG": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"2 nodes are configured on this machine ({base}/n1/rmsd.toml, {base}/n2/rmsd.toml)" in proc.stderr


def test_a_closed_pipe_ends_the_command_without_a_traceback(installed):
    _base, database, _ = installed
    args = ("cluster-info", "--database-url", database.url, "--name", "c1")
    # The reader is gone before rmsd writes a byte: every write fails with EPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = rmsd(*args, stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141  # as if SIGPIPE had ended it, like other commands in a pipeline
    # As a person types it.
    proc = subprocess.run(["bash", "-c", f"{RMSD} {' '.join(args)} | head -n 1"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "{\n", "")


def test_the_node_answers_its_address_with_where_to_go(node):
    index = httpx.get(f"{node.url}/", timeout=10)
    assert index.status_code == 200
    body = index.json()
    assert (body["service"], body["cluster"], body["node"]) == ("rmsd", "c1", "n1")
    assert body["links"] == {"health": "/health", "slc": "/slc", "status": "/status", "api": "/openapi.json"}
    for name, link in body["links"].items():
        answer = httpx.get(f"{node.url}{link}", timeout=10)
        if name == "status":  # the status page, or until it is written a page that says how to write it
            assert answer.status_code in (200, 404) and answer.headers["content-type"].startswith("text/html")
        else:
            assert answer.status_code == 200, link
    # Not an operation of the published contract.
    assert "/" not in httpx.get(f"{node.url}/openapi.json", timeout=10).json()["paths"]
