"""The policy for secrets an operator chooses, by class: short, few different characters, a repeated block,
a run of consecutive characters, a common password with digits and symbols around it. Refused wherever a
secret is set (a new cluster, a key password change, a TPD export, an enrollment credential), with a
message that says what to use and nothing changed; secrets that only open what exists are not judged."""

import secrets

import pytest
from conftest import KEY_PASSWORD, provision, sqlite_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmsd import admin, passwords
from rmsd.errors import RmsdError

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
}


@pytest.mark.parametrize("kind", sorted(WEAK_CLASSES))
def test_weak_secrets_are_refused_by_class(kind, record_property):
    cases = 0

    @given(secret=WEAK_CLASSES[kind])
    @HYPOTHESIS
    def check(secret):
        nonlocal cases
        assert passwords.weakness(secret) is not None, secret
        with pytest.raises(RmsdError, match="too weak.*Nothing was changed"):
            passwords.check("key_password", secret)
        cases += 1

    check()
    record_property("hypothesis_cases", f"weak secret, {kind}: {cases} cases, all refused")


def test_random_secrets_pass():
    for _ in range(200):
        assert passwords.weakness(secrets.token_urlsafe(18)) is None
    for good in (KEY_PASSWORD, "correct horse battery staple", "Rmsd-Cluster-2026-b7"):
        assert passwords.weakness(good) is None, good


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
