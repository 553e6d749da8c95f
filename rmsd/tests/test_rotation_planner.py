"""The rotation planner on its own, table-driven: for stored keys and a declared state, what must happen
(keys revoked, the active key replaced and why, the password change, re-enrollment), what the keys look
like afterwards, and which declarations it refuses. No database: keys are plain rows."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from rmsd.errors import RmsdError
from rmsd.rotation import Desired, check_key_ids, make_plan

NOW = datetime(2026, 6, 1, tzinfo=UTC)
A, B, C = "a" * 40, "b" * 40, "c" * 40


@dataclass
class Key:
    id: str
    status: str
    created_at: datetime


def keys(*spec) -> list[Key]:
    """("a", "active", 10) -> key A, active, created 10 days ago."""
    ids = {"a": A, "b": B, "c": C}
    return [Key(ids[k], status, NOW - timedelta(days=age)) for k, status, age in spec]


# (case, stored keys, desired, reencrypt) -> (compromise, replace, reencrypt, reenroll, statuses after)
CASES = [
    ("nothing declared", keys(("a", "active", 10)), Desired([]), False,
     ([], None, False, False, {A: "active"})),
    ("young enough", keys(("a", "active", 29)), Desired([], max_age_days=30), False,
     ([], None, False, False, {A: "active"})),
    ("exactly max_age", keys(("a", "active", 30)), Desired([], max_age_days=30), False,
     ([], "max_age", False, False, {A: "archived", "(new key)": "active"})),
    ("too old", keys(("a", "active", 400), ("b", "archived", 800)), Desired([], max_age_days=365), False,
     ([], "max_age", False, False, {A: "archived", B: "archived", "(new key)": "active"})),
    ("active compromised", keys(("a", "active", 1)), Desired([A]), False,
     ([A], "compromised", False, False, {A: "compromised", "(new key)": "active"})),
    ("compromised wins over age", keys(("a", "active", 900)), Desired([A], max_age_days=30), False,
     ([A], "compromised", False, False, {A: "compromised", "(new key)": "active"})),
    ("archived compromised", keys(("a", "active", 1), ("b", "archived", 90)), Desired([B]), False,
     ([B], None, False, False, {A: "active", B: "compromised"})),
    ("already compromised", keys(("a", "active", 1), ("b", "compromised", 90)), Desired([B]), False,
     ([], None, False, False, {A: "active", B: "compromised"})),
    ("password change only", keys(("a", "active", 1)), Desired([]), True,
     ([], None, True, False, {A: "active"})),
    ("password change and compromise", keys(("a", "active", 1), ("b", "archived", 9)), Desired([A, B]), True,
     ([A, B], "compromised", True, False, {A: "compromised", B: "compromised", "(new key)": "active"})),
    ("reenroll", keys(("a", "active", 1)), Desired([], reenroll=True), False,
     ([], None, False, True, {A: "active"})),
    ("reenroll is moot when replaced by age", keys(("a", "active", 90)),
     Desired([], max_age_days=30, reenroll=True), False,
     ([], "max_age", False, False, {A: "archived", "(new key)": "active"})),
    ("reenroll with an archived key compromised", keys(("a", "active", 1), ("b", "archived", 9)),
     Desired([B], reenroll=True), False,
     ([B], None, False, True, {A: "active", B: "compromised"})),
]


@pytest.mark.parametrize(("stored", "desired", "reencrypt", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_plan(stored, desired, reencrypt, expected):
    compromise, replace, will_reencrypt, reenroll, after = expected
    plan = make_plan(stored, desired, reencrypt=reencrypt, now=NOW)
    assert (plan.compromise, plan.replace, plan.reencrypt, plan.reenroll) == (compromise, replace, will_reencrypt,
                                                                              reenroll)
    assert plan.statuses_after(stored) == after
    assert bool(plan) == bool(compromise or replace or will_reencrypt or reenroll)
    rotation = plan.rotation(stored, "n" * 40)
    if replace:
        assert rotation == {"reason": replace, "retired_key_id": A, "new_key_id": "n" * 40}
    else:
        assert rotation == {}


def test_a_plan_carried_out_is_empty_when_planned_again():
    """Idempotence: once the statuses are as planned (a new active key), the same declaration asks nothing."""
    stored = keys(("a", "active", 400))
    assert make_plan(stored, Desired([A], max_age_days=365), reencrypt=False, now=NOW)
    done = [Key(A, "compromised", stored[0].created_at), Key(C, "active", NOW)]
    assert not make_plan(done, Desired([A], max_age_days=365), reencrypt=False, now=NOW)


@pytest.mark.parametrize(("stored", "desired", "message"), [
    pytest.param(keys(("a", "active", 1)), Desired([B]), "does not have", id="unknown key"),
    pytest.param(keys(("a", "active", 1)), Desired([A], reenroll=True), "re-enrollment is no remedy",
                 id="reenroll a compromised key"),
])
def test_refused_declarations(stored, desired, message):
    with pytest.raises(RmsdError, match=message):
        make_plan(stored, desired, reencrypt=False, now=NOW)


@pytest.mark.parametrize(("given", "expected"), [
    (None, []), ([], []), ([A, A, B], [A, B]),
])
def test_key_ids_are_checked_and_deduplicated(given, expected):
    assert check_key_ids(given) == expected


@pytest.mark.parametrize("bad", ["A" * 40, "a" * 39, "g" * 40, 42, A + " "])
def test_malformed_key_ids_are_refused(bad):
    with pytest.raises(RmsdError, match="is not a cluster key id"):
        check_key_ids([bad])
