"""Every conditional in the project's playbooks, roles and scenarios is a string. A plain YAML scalar holding
': ' (`- x is search('a: b')`) is a mapping, not a string: ansible-core refuses it only when the task runs,
which for a check at the end of a long scenario is half an hour later."""

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONDITIONS = ("when", "failed_when", "changed_when", "until")
FILES = sorted(path for folder in ("playbooks", "roles", "molecule") for path in (REPO / folder).rglob("*.yml"))


def conditionals(node, where=""):
    """(where, condition) for every assert `that` item and every when/failed_when/changed_when/until."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "that" or key in CONDITIONS:
                for item in value if isinstance(value, list) else [value]:
                    yield f"{where}/{key}", item
            yield from conditionals(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from conditionals(item, f"{where}[{index}]")


@pytest.mark.parametrize("path", FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_every_condition_is_a_string(path):
    try:
        documents = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError:
        pytest.skip("not plain YAML (a Jinja template)")
    wrong = [(where, item) for document in documents for where, item in conditionals(document)
             if not isinstance(item, str | bool)]
    assert not wrong, f"quote these conditions (a ': ' inside makes a mapping): {wrong}"


def test_a_colon_in_a_plain_condition_is_found():
    document = yaml.safe_load("- assert:\n    that:\n      - out is search('newcomer: OK')\n")
    assert [item for _where, item in conditionals(document) if not isinstance(item, str)]
