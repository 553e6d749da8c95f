"""The policy for secrets an operator chooses, by class: short, few different characters, a repeated block,
a run of consecutive characters or keys, a common password (on the shipped list, or with digits and symbols
around it), a deployment's name, or easy to guess by zxcvbn's estimate. Refused wherever a secret is set (a
new cluster, a key password change, a TPD export, an enrollment credential), with a message that says why
and what to use, never the secret, and nothing changed; secrets that only open what exists are not judged.
Random ones, as `openssl rand -base64 24` and Ansible's password lookup make them, pass."""

import base64
import os
import secrets
import string
import subprocess
import time

import pytest
from conftest import KEY_PASSWORD, provision, sqlite_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zxcvbn import zxcvbn

from rmsd import admin, passwords
from rmsd.errors import RmsdError

POLICY_MIN_LENGTH = 12  # the documented minimum (not passwords.MIN_LENGTH: a test of the constant must not follow it)
SYMBOLS = "0123456789!@#$%&*-_."
KEYBOARD_COLUMNS = ("1qaz", "2wsx", "3edc", "4rfv", "5tgb", "6yhn", "7ujm", "8ik,", "9ol.", "0p;/")
KEYBOARD_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")


def columns_from(first: int):
    return st.integers(first + 3, 10).map(lambda end: KEYBOARD_COLUMNS[first:end])


SEASONS = ("summer", "winter", "spring", "autumn", "fall", "january", "march", "april", "june", "july", "august",
           "september", "october", "november", "december", "monday", "friday", "sunday")

HYPOTHESIS = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
WEAK_CLASSES = {
    "short": st.text(min_size=1, max_size=passwords.MIN_LENGTH - 1),
    "few different characters": st.text(st.sampled_from("abcde"), min_size=12, max_size=40),
    "a block repeated": st.builds(lambda block, n: block * n, st.text(min_size=1, max_size=12),
                                  st.integers(2, 20)).filter(lambda s: len(s) >= 12),
    "a run": st.builds(lambda run, start, n, back: ((run * 6)[start:start + n])[::-1 if back else 1],
                       st.sampled_from(passwords.RUNS), st.integers(0, 9), st.integers(12, 30), st.booleans()),
    "a common word dressed up": st.builds(
        lambda pre, word, post, upper: pre + (word.capitalize() if upper else word) + post,
        st.text(st.sampled_from("0123456789!@#$%&*-_."), max_size=3), st.sampled_from(sorted(passwords.COMMON_WORDS)),
        st.text(st.sampled_from("0123456789!@#$%&*-_."), min_size=4, max_size=8), st.booleans()),
    # "Summer2026!!"
    "a season or month and a year": st.builds(
        lambda word, upper, year, tail: (word.capitalize() if upper else word) + str(year) + tail,
        st.sampled_from(SEASONS), st.booleans(), st.integers(1950, 2039),
        st.text(st.sampled_from("!@#$%&*?.-_"), max_size=3)).filter(lambda s: len(s) >= 12),
    # "1qaz2wsx3edc"
    "keyboard columns": st.builds(
        lambda columns, upper: "".join(c.upper() if up else c for c, up in zip(columns, upper, strict=False)),
        st.integers(0, 7).flatmap(columns_from),
        st.lists(st.booleans(), min_size=10, max_size=10),
    ).filter(lambda s: len(s) >= 12),
    # "qwertyuiop12"
    "a keyboard row and digits": st.builds(lambda row, n, digits: row[:n] + digits, st.sampled_from(KEYBOARD_ROWS),
                                           st.integers(6, 10), st.text(st.sampled_from(string.digits), min_size=2,
                                                                       max_size=6)).filter(lambda s: len(s) >= 12),
    # "123456789abc"
    "digits then letters in order": st.builds(lambda n, m: "1234567890"[:n] + string.ascii_lowercase[:m],
                                              st.integers(5, 10), st.integers(3, 12)).filter(lambda s: len(s) >= 12),
    # "rmsd-prod-01"
    "a deployment's name": st.builds(
        lambda words, number, sep: sep.join([*words, f"{number:02d}"]),
        st.lists(st.sampled_from(sorted(passwords.DEPLOYMENT_WORDS | passwords.COMMON_WORDS)), min_size=1, max_size=3),
        st.integers(0, 99), st.sampled_from("-_.")).filter(lambda s: len(s) >= 12),
    "on the list of common passwords": st.builds(lambda entry, upper: entry.upper() if upper else entry,
                                                 st.sampled_from(sorted(passwords.common_passwords())), st.booleans()),
}


@pytest.mark.parametrize("kind", sorted(WEAK_CLASSES))
def test_weak_secrets_are_refused_by_class(kind, record_property):
    cases = 0

    @given(secret=WEAK_CLASSES[kind])
    @HYPOTHESIS
    def check(secret):
        nonlocal cases
        assert passwords.weakness(secret) is not None, secret
        with pytest.raises(RmsdError, match="too weak.*Nothing was changed") as refused:
            passwords.check("key_password", secret)
        assert len(secret) < 8 or secret not in str(refused.value)  # never the secret (a short one may be a word)
        cases += 1

    check()
    record_property("hypothesis_cases", f"weak secret, {kind}: {cases} cases, all refused")


@pytest.mark.parametrize(("weak", "reason"), [
    ("Summer2026!!", "easy to guess"), ("1qaz2wsx3edc", "run of consecutive characters or keyboard keys"),
    ("qwertyuiop12", "on the list of common passwords"), ("123456789abc", "on the list of common passwords"),
    ("rmsd-prod-01", "made of common words and the names deployments use"),
])
def test_named_weak_passwords_are_refused_saying_why_never_echoing_them(weak, reason):
    with pytest.raises(RmsdError) as refused:
        passwords.check("the trusted publishing domain password", weak)
    message = str(refused.value)
    assert reason in message and weak not in message
    assert "openssl rand -base64 24" in message and "Nothing was changed" in message


def test_zxcvbn_explains_what_it_found():
    reason = passwords.weakness("qwertyuiop1234")
    assert reason.startswith("it is easy to guess") and "similar to a commonly used password" in reason


def test_the_list_refuses_common_passwords_zxcvbn_would_let_through():
    """Breached passwords look random to an estimator ("pe#5gz29ptzmse"): only the list knows them."""
    missed = [entry for entry in sorted(passwords.common_passwords())
              if zxcvbn(entry[:passwords.ZXCVBN_MAX], user_inputs=passwords.USER_INPUTS)["guesses"]
              >= passwords.MIN_GUESSES]
    assert len(missed) >= 10
    for entry in missed:
        assert passwords.weakness(entry) == "it is on the list of common passwords", entry
        assert passwords.weakness(entry.upper()) == "it is on the list of common passwords", entry


def test_strong_looking_but_short_secrets_are_refused_for_their_length(record_property):
    """Random characters of every kind, fewer than the minimum: refused for their length, and the message asks
    for the minimum. (zxcvbn, which counts at least 10 guesses a character, refuses them too, as easy to guess.)"""
    cases = 0

    @given(secret=st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S")), min_size=6,
                          max_size=POLICY_MIN_LENGTH - 1).filter(lambda s: len(set(s)) >= passwords.MIN_DISTINCT))
    @HYPOTHESIS
    def check(secret):
        nonlocal cases
        assert passwords.weakness(secret) == f"it is shorter than {POLICY_MIN_LENGTH} characters"
        with pytest.raises(RmsdError, match=f"Use at least {POLICY_MIN_LENGTH} characters"):
            passwords.check("key_password", secret)
        cases += 1

    check()
    record_property("hypothesis_cases", f"strong-looking secret shorter than {POLICY_MIN_LENGTH}: {cases} cases, "
                                        "all refused for their length")


def test_random_secrets_pass():
    """What `openssl rand -base64 24` and Ansible's password lookup (length 32, letters and digits) make, and
    the suites' fixed passwords."""
    for _ in range(20):
        made = subprocess.run(["openssl", "rand", "-base64", "24"], capture_output=True, text=True, check=True)
        assert passwords.weakness(made.stdout.strip()) is None
    alphabet = string.ascii_letters + string.digits
    for _ in range(50):
        assert passwords.weakness(base64.b64encode(os.urandom(24)).decode()) is None
        assert passwords.weakness("".join(secrets.choice(alphabet) for _ in range(32))) is None
        assert passwords.weakness(secrets.token_urlsafe(18)) is None
        assert passwords.weakness("enroll-" + secrets.token_hex(12), min_length=24) is None
    for good in (KEY_PASSWORD, "correct horse battery staple", "Rmsd-Cluster-2026-b7", "Dept-Key-Pass-92c4e1f7",
                 "tpd-Backup-Pass-5c81f0", "New-Key-Pass-41d2a7c9e5", "Changed-Key-Pass-0b7e1d44"):
        assert passwords.weakness(good) is None, good


def test_a_long_secret_is_judged_at_a_bounded_cost():
    """zxcvbn judges the first ZXCVBN_MAX characters (it refuses longer input, and its time grows fast with the
    length); a secret longer than MAX_LENGTH is refused before any pattern check. The times are printed."""
    for length in (passwords.ZXCVBN_MAX, 200, passwords.MAX_LENGTH):
        secret = secrets.token_urlsafe(length)[:length]
        started = time.perf_counter()
        assert passwords.weakness(secret) is None
        print(f"a random secret of {length} characters judged in {(time.perf_counter() - started) * 1000:.1f} ms")
    periodic = ("abcdef" * 20_000) + "X"  # the worst case of the repeated-block check
    assert passwords.weakness(periodic) == f"it is longer than {passwords.MAX_LENGTH} characters"
    with pytest.raises(RmsdError, match=f"at least 12 characters \\(at most {passwords.MAX_LENGTH}\\)"):
        passwords.check("key_password", periodic)


@pytest.mark.parametrize("weak", ["abc", "Password2026!", "123456789012", "qwertyuiopas"])
def test_every_place_a_secret_is_set_refuses_a_weak_one_and_changes_nothing(tmp_path, weak):
    database = sqlite_database(tmp_path)
    with pytest.raises(RmsdError, match="key_password is too weak"):
        admin.ensure_cluster(name="c1", key_password=weak, intranet_url="https://rms.example.com",
                             **database.admin_args())
    assert database.dump() is None
    provision(database)
    before = database.dump()
    with pytest.raises(RmsdError, match="key_password is too weak"):  # a password change
        admin.ensure_cluster_key(cluster="c1", key_password=weak, previous_key_password=KEY_PASSWORD,
                                 **database.admin_args())
    with pytest.raises(RmsdError, match="trusted publishing domain password is too weak"):
        admin.ensure_trusted_publishing_domain(cluster="c1", key_password=KEY_PASSWORD, path=str(tmp_path / "x.tpd"),
                                               password=weak, **database.admin_args())
    with pytest.raises(RmsdError, match="secret is too weak"):
        admin.ensure_enrollment_credential(cluster="c1", scope="dept", secret=weak * 3, **database.admin_args())
    assert database.dump() == before and not (tmp_path / "x.tpd").exists()
