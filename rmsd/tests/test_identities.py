"""User ids, principals and RACs: any valid Unicode `sub` works end to end (RAC -> PL -> UL) or is refused
at authentication with a 4xx; the principal grammar (`user:ID`, `group:NAME`, bare ID); exact identity
comparisons; required token claims; RAC key and validity limits. Against the shared running node."""

import math
import os
import shutil
import subprocess
import time
from datetime import timedelta

import pytest
from conftest import cluster_key
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmsd import admin, identity, licenses, pki
from rmsd.client import RmsClient, User, b64url, decrypt_content, encrypt_content, open_use_license
from rmsd.errors import InvalidRequestError
from rmsd.schema import utcnow

DOCUMENT = b"Quarterly figures."
RAC_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # one key pair for every user here
HYPOTHESIS = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
CASES: dict[str, int] = {}


@pytest.fixture(scope="module")
def client(node):
    return RmsClient(node.url)


def _post(client, path: str, token: str, body: dict):
    return client.http.post(path, json=body, headers={"Authorization": f"Bearer {token}"})


def _user(node, subject: str, groups=(), **kwargs) -> User:
    return User(subject, node.token(subject, groups, **kwargs), RAC_KEY)


def _certify(client, user: User):
    response = _post(client, "/certification", user.token, {"csr": user.csr_pem()})
    if response.status_code == 200:
        user.rac_pem = response.json()["rac"]
    return response


def _publish(client, owner: User, rights: dict, content_id: str = "doc"):
    content_key, blob = encrypt_content(DOCUMENT)
    body = {"content_id": content_id, "content_key": b64url(content_key), "rights": rights}
    return _post(client, "/publishing", owner.token, body), content_key, blob


def _license(client, user: User, pl: str):
    return _post(client, "/licensing", user.token, {"pl": pl, "rac": user.rac_pem})


@pytest.fixture(scope="module")
def owner(node, client):
    user = _user(node, "olivia@example.com", ttl=900)
    assert _certify(client, user).status_code == 200
    return user


# --- 1. any valid Unicode user id, losslessly in the RAC -------------------------------------------------


@pytest.mark.parametrize("subject", [
    "élodie@example.fr", "Дмитрий", "用户", "😀🔐", "a b", "group\u200b:finance", "x" * 64, "é" * 200,
    "user-" + "ü" * 251,
])
def test_unicode_user_ids_round_trip(node, client, owner, subject):
    reader = _user(node, subject)
    response = _certify(client, reader)
    assert response.status_code == 200, response.text
    rac = pki.load_pem(reader.rac_pem)
    assert pki.rac_subject(rac) == subject
    [cn] = rac.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert len(cn.value.encode()) <= 64 and (cn.value == subject or "sha256:" in cn.value)
    response, content_key, blob = _publish(client, owner, {f"user:{subject}": ["VIEW"]})
    assert response.status_code == 200, response.text
    granted = _license(client, reader, response.json()["pl"])
    assert granted.status_code == 200, granted.text
    claims, opened = open_use_license(granted.json()["ul"], client.slc()["chain"][0], reader)
    assert claims["sub"] == subject and granted.json()["rights"] == ["VIEW"]
    assert decrypt_content(opened, blob) == DOCUMENT


def test_long_user_ids_sharing_64_characters_get_distinct_racs(node, client, owner):
    first, second = _user(node, "p" * 64 + "-first"), _user(node, "p" * 64 + "-second")
    for user in (first, second):
        assert _certify(client, user).status_code == 200
    racs = [pki.load_pem(u.rac_pem) for u in (first, second)]
    assert [pki.rac_subject(r) for r in racs] == [first.subject, second.subject]
    cns = [r.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value for r in racs]
    assert cns[0] != cns[1] and all(len(cn.encode()) == 64 and "\u2026 (sha256:" in cn for cn in cns)
    response, _key, _blob = _publish(client, owner, {first.subject: ["VIEW"]})
    pl = response.json()["pl"]
    assert _license(client, first, pl).status_code == 200
    assert _license(client, second, pl).status_code == 403  # the CN-sized prefix is no identity
    # The other user's RAC is refused even though both CNs start alike.
    second.rac_pem = first.rac_pem
    assert _license(client, second, pl).status_code == 403


def test_rac_user_id_encoding_is_canonical():
    for subject in ("é", "group:x", "a%41", "~-._", "😀"):
        uri = pki.user_id_uri(subject)
        assert uri.isascii() and uri.startswith(pki.USER_ID_URN)
    assert pki.user_id_uri("a%41") != pki.user_id_uri("aA")
    assert pki.user_id_uri("a%41") == "urn:rmsd:user-id:a%2541"


@pytest.mark.parametrize(("subject", "says"), [
    ("", "empty"),
    ("tab\tuser", "control"),
    ("nul\x00user", "control"),
    ("c1\x85user", "control"),
    ("x" * 257, "at most 256"),
    ("x" * 5000, "at most 256"),
])
def test_unacceptable_user_ids_get_401_at_authentication(node, client, subject, says):
    response = _certify(client, _user(node, subject))
    assert response.status_code == 401, response.text
    assert says in response.json()["detail"] and "'sub'" in response.json()["detail"]


def test_unacceptable_group_names_get_401(node, client):
    for groups in (["ok", ""], ["ok", "bad\nname"], ["g" * 300]):
        response = _certify(client, _user(node, "gina@example.com", groups))
        assert response.status_code == 401 and "groups" in response.json()["detail"], response.text


# --- 2. the principal grammar ----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["Group:finance", "GROUP:finance", "User:bob", "USER:bob", "ｇｒｏｕｐ:finance",
                                 " group:finance", "gro\u200bup:finance", "group:", "user:", "group:a\x07"])
def test_ambiguous_or_malformed_principals_are_refused_at_publishing(owner, client, key):
    response, _key, _blob = _publish(client, owner, {key: ["VIEW"]})
    assert response.status_code == 400, response.text
    assert key.strip() and "principal" in response.json()["detail"]


def test_ambiguous_principals_are_refused_in_templates(node):
    with pytest.raises(Exception, match="ambiguous"):
        admin.ensure_rights_template(cluster="c1", name="bad-principal", rights={"Group:x": ["VIEW"]},
                                     **node.database.admin_args())


def test_principal_grammar_units():
    assert identity.parse_principal("group:finance") == ("group", "finance")
    assert identity.parse_principal("user:group:finance") == ("user", "group:finance")
    assert identity.parse_principal("group:user:x") == ("group", "user:x")
    assert identity.parse_principal("bob@example.com") == ("user", "bob@example.com")
    assert identity.parse_principal("urn:x:y") == ("user", "urn:x:y")
    assert licenses.normalize_rights({"bob": ["VIEW"], "user:bob": ["EDIT"], "user:group:x": ["VIEW"]}) == {
        "bob": ["EDIT", "VIEW"], "user:group:x": ["VIEW"],
    }
    for key in ("Group:x", "USER:x", "group:", "user:", ""):
        with pytest.raises(InvalidRequestError):
            licenses.normalize_rights({key: ["VIEW"]})


@pytest.mark.parametrize("subject", ["group:finance", "Group:finance", "GROUP:finance", "group:Finance",
                                     "user:group:finance", "finance", "group:finance "])
def test_a_user_named_like_a_group_gets_none_of_its_rights(node, client, owner, subject):
    impostor = _user(node, subject, ["sales"])
    assert _certify(client, impostor).status_code == 200
    response, _key, _blob = _publish(client, owner, {"group:finance": ["VIEW", "PRINT"]})
    pl = response.json()["pl"]
    refused = _license(client, impostor, pl)
    assert refused.status_code == 403, refused.text
    member = _user(node, "fiona@example.com", ["finance"])
    assert _certify(client, member).status_code == 200
    assert _license(client, member, pl).json()["rights"] == ["PRINT", "VIEW"]


def test_user_principal_for_a_group_like_id_grants_that_user_only(node, client, owner):
    named = _user(node, "group:finance")
    member = _user(node, "fred@example.com", ["finance"])
    for user in (named, member):
        assert _certify(client, user).status_code == 200
    response, _key, _blob = _publish(client, owner, {"user:group:finance": ["EDIT"]})
    assert response.status_code == 200, response.text
    pl = response.json()["pl"]
    assert _license(client, named, pl).json()["rights"] == ["EDIT"]
    assert _license(client, member, pl).status_code == 403


def test_openapi_documents_the_principal_grammar(client):
    schema = client.http.get("/openapi.json").json()
    described = schema["components"]["schemas"]["PublishingRequest"]["properties"]["rights"]["description"]
    assert "user:ID" in described and "group:NAME" in described and "ambiguous" in described


# --- 3. required claims ----------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
def test_tokens_without_a_required_claim_get_401(node, client, claim):
    token = node.token("tess@example.com", claims={claim: None})
    response = _post(client, "/certification", token, {"csr": User("t", "", RAC_KEY).csr_pem()})
    assert response.status_code == 401, response.text
    detail = response.json()["detail"]
    assert f"'{claim}'" in detail and "required" in detail
    assert "missing_claim" not in detail and "invalid_claim" not in detail


@pytest.mark.parametrize(("claims", "says"), [
    ({"exp": int(time.time()) - 3600, "nbf": None, "iat": None}, "expired"),
    ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ({"exp": "tomorrow"}, "NumericDate"),
    ({"sub": 42}, "'sub'"),
    ({"aud": ["someone-else"]}, "audience"),
])
def test_expired_not_yet_valid_or_malformed_tokens_get_401(node, client, claims, says):
    token = node.token("tess@example.com", claims=claims)
    response = _post(client, "/certification", token, {"csr": User("t", "", RAC_KEY).csr_pem()})
    assert response.status_code == 401, response.text
    detail = response.json()["detail"]
    assert says in detail and "_claim" not in detail and "_token" not in detail, detail


# --- 4. exact comparisons --------------------------------------------------------------------------------


VARIANTS = ["bob@example.co", "Bob@example.com", "BOB@EXAMPLE.COM", "bob@example.com ", " bob@example.com",
            "bob@example.com.evil", "bob", "ob@example.com", "bob@example.com\u200b", "bo\u0301b@example.com"]


def test_variants_of_a_user_principal_or_the_owner_get_nothing(node, client, owner):
    response, _key, _blob = _publish(client, owner, {"bob@example.com": ["VIEW"]})
    pl = response.json()["pl"]
    owner_variants = ["Olivia@example.com", "olivia@example.co", "olivia", "olivia@example.com.evil",
                      "olivia@example.com "]
    for subject in VARIANTS + owner_variants:
        user = _user(node, subject)
        assert _certify(client, user).status_code == 200, subject
        refused = _license(client, user, pl)
        assert refused.status_code == 403, (subject, refused.text)
    bob = _user(node, "bob@example.com")
    _certify(client, bob)
    assert _license(client, bob, pl).json()["rights"] == ["VIEW"]


def test_variants_of_a_group_get_nothing(node, client, owner):
    response, _key, _blob = _publish(client, owner, {"group:finance": ["VIEW"]})
    pl = response.json()["pl"]
    for groups in (["Finance"], ["FINANCE"], ["finance-team"], ["fin"], ["finance "], ["group:finance"],
                   ["ﬁnance"], []):
        user = _user(node, "gus@example.com", groups)
        assert _certify(client, user).status_code == 200
        assert _license(client, user, pl).status_code == 403, groups


def test_only_the_exact_owner_may_republish(node, client, owner):
    response, content_key, _blob = _publish(client, owner, {"bob@example.com": ["VIEW"]}, "doc-republish")
    old = response.json()["pl_id"]
    for subject in ("Olivia@example.com", "olivia@example.co", "olivia"):
        pretender = _user(node, subject)
        body = {"content_id": "doc-republish", "content_key": b64url(content_key),
                "rights": {"bob@example.com": ["VIEW"]}, "supersedes": old}
        assert _post(client, "/publishing", pretender.token, body).status_code == 403, subject


def test_granted_rights_compare_exactly():
    pl = {"owner": "alice", "rights": {"bob": ["VIEW"], "group:finance": ["PRINT"], "user:group:x": ["EDIT"]}}
    assert licenses.granted_rights(pl, "alice", []) == list(licenses.RIGHTS)
    for user in ("Alice", "alic", "alice ", "alicee", "bo", "Bob", "bobby", "group:finance", "group:x"[:-1]):
        assert licenses.granted_rights(pl, user, ["Finance", "financ", "x"]) == [], user
    assert licenses.granted_rights(pl, "group:x", []) == ["EDIT"]
    # A PL from before the grammar with an ambiguous key grants no one anything.
    assert licenses.granted_rights({"owner": "o", "rights": {"Group:finance": ["VIEW"]}}, "Group:finance",
                                   ["finance"]) == []


def test_enrollment_scope_is_compared_exactly(node, client):
    secret = "Enroll-Secret-" + os.urandom(8).hex()
    args = {"cluster": "c1", "scope": "dept-exact", **node.database.admin_args()}
    admin.ensure_enrollment_credential(secret=secret, **args)
    try:
        for cluster in ("Dept-exact", "dept-exac", "dept-exact2", "DEPT-EXACT"):
            body = {"cluster": cluster, "csr": "x", "intranet_url": "https://x.example", "credential": secret}
            response = client.http.post("/enrollment", json=body)
            assert response.status_code == 401, (cluster, response.text)
    finally:  # the shared node's other tests list this cluster's credentials
        admin.ensure_enrollment_credential(state="absent", **args)


# --- 5. RAC keys and validity ----------------------------------------------------------------------------


def _csr(private_key) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "k")]))
    return builder.sign(private_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("exponent", "bits", "says"), [(3, 2048, "65537"), (65537, 1024, "2048")])
def test_weak_rac_keys_are_refused(node, client, exponent, bits, says):
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    response = _post(client, "/certification", node.token("kim@example.com"), {"csr": _csr(key)})
    assert response.status_code == 400 and says in response.json()["detail"], response.text


def _rsa_key(bits: int, exponent: int):
    """An RSA key with any public exponent (cryptography makes only 3 and 65537): primes from a generated key,
    the private exponent computed for `exponent`."""
    while True:
        numbers = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_numbers()
        p, q = numbers.p, numbers.q
        lam = math.lcm(p - 1, q - 1)
        if math.gcd(exponent, lam) == 1:
            d = pow(exponent, -1, lam)
            public = rsa.RSAPublicNumbers(exponent, p * q)
            return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), rsa.rsa_crt_iqmp(p, q),
                                         public).private_key()


def test_generated_rac_keys_are_certified_only_when_strong(node, client, record_property):
    """RAC requests with keys of generated sizes and public exponents: certified exactly when the key has
    2048 bits or more and exponent 65537, refused with a 400 that names the rule otherwise."""
    outcomes = {"certified": 0, "refused 400": 0}
    made: dict = {}  # one key per (exponent, bits): generating RSA keys is the slow part

    @given(exponent=st.sampled_from([3, 5, 17, 257, 65537, 65539]), bits=st.sampled_from([1024, 1536, 2048, 2056]))
    @settings(max_examples=24, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(exponent, bits):
        if (exponent, bits) not in made:
            made[exponent, bits] = _rsa_key(bits, exponent)
        key = made[exponent, bits]
        response = _post(client, "/certification", node.token("gen-key@example.com"), {"csr": _csr(key)})
        if bits >= 2048 and exponent == 65537:
            assert response.status_code == 200, response.text
            outcomes["certified"] += 1
        else:
            assert response.status_code == 400, response.text
            assert "2048" in response.json()["detail"] or "65537" in response.json()["detail"]
            outcomes["refused 400"] += 1

    check()
    _report("RAC key size and exponent", outcomes, record_property)
    assert all(outcomes.values())


def test_issued_rac_validity_is_bounded(node, client):
    user = _user(node, "val@example.com")
    before = utcnow()
    assert _certify(client, user).status_code == 200
    rac, slc = pki.load_pem(user.rac_pem), pki.load_pem(client.slc()["chain"][0])
    assert rac.public_key().public_numbers().e == 65537
    assert rac.not_valid_after_utc <= before + pki.RAC_VALIDITY + timedelta(seconds=5)
    # The documented policy, as a number rather than the constant: a RAC is valid for a year at most.
    assert rac.not_valid_after_utc - before <= timedelta(days=365, seconds=5)
    assert rac.not_valid_after_utc <= slc.not_valid_after_utc
    if shutil.which("openssl"):
        out = subprocess.run(["openssl", "x509", "-noout", "-enddate"], input=user.rac_pem, capture_output=True,
                             text=True, check=True).stdout
        assert out.startswith("notAfter=") and str(rac.not_valid_after_utc.year) in out


def test_rac_never_outlives_its_slc(node):
    _row, _key_row, key, slc_pem = cluster_key(node.database)
    slc = pki.load_pem(slc_pem)
    csr = pki.load_csr(_csr(RAC_KEY))
    late = slc.not_valid_after_utc - timedelta(days=10)
    rac = pki.issue_rac(key, slc, "late@example.com", csr, late)
    assert rac.not_valid_after_utc == slc.not_valid_after_utc
    longer = pki.issue_rac(key, slc, "late@example.com", csr, utcnow(), validity=pki.RAC_VALIDITY * 3)
    assert longer.not_valid_after_utc <= utcnow() + pki.RAC_VALIDITY
    short = pki.issue_rac(key, slc, "late@example.com", csr, utcnow(), validity=timedelta(days=1))
    assert short.not_valid_after_utc <= utcnow() + timedelta(days=1)


# --- property-based: arbitrary Unicode ids and group lists ----------------------------------------------


def _tokenable(subject: str) -> bool:
    try:
        subject.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def test_arbitrary_unicode_ids_round_trip_or_get_a_clean_4xx(node, client, owner, record_property):
    outcomes = {"round trip": 0, "refused 4xx": 0}

    printable = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])
    subjects = st.one_of(st.text(printable, min_size=1, max_size=80), st.text(max_size=300))
    group_lists = st.one_of(st.lists(st.text(printable, min_size=1, max_size=20), max_size=4),
                            st.lists(st.text(max_size=20), max_size=4))

    @given(subject=subjects, groups=group_lists)
    @HYPOTHESIS
    def check(subject, groups):
        token_subject = subject if _tokenable(subject) else subject.encode("utf-8", "replace").decode()
        groups = [g.encode("utf-8", "replace").decode() for g in groups]
        user = _user(node, token_subject, groups)
        response = _certify(client, user)
        assert response.status_code < 500, response.text
        acceptable = all(identity.identifier_problem(v) is None for v in [token_subject, *groups])
        if response.status_code != 200:
            assert response.status_code == 401 and not acceptable, response.text
            outcomes["refused 4xx"] += 1
            return
        assert acceptable
        assert pki.rac_subject(pki.load_pem(user.rac_pem)) == token_subject
        published, _key, blob = _publish(client, owner, {f"user:{token_subject}": ["VIEW"]})
        assert published.status_code == 200, published.text
        granted = _license(client, user, published.json()["pl"])
        assert granted.status_code == 200, granted.text
        assert granted.json()["rights"] == ["VIEW"]
        claims, opened = open_use_license(granted.json()["ul"], client.slc()["chain"][0], user)
        assert claims["sub"] == token_subject and decrypt_content(opened, blob) == DOCUMENT
        outcomes["round trip"] += 1

    check()
    _report("arbitrary Unicode sub", outcomes, record_property)
    assert outcomes["round trip"] > 0


PREFIXES = st.sampled_from(["group:", "Group:", "GROUP:", "gRoUp:", "user:", "User:", "USER:", "user:group:",
                            "group:group:", "ｇｒｏｕｐ:", " group:", "group: "])


def test_users_named_like_groups_never_get_group_rights(node, client, owner, record_property):
    outcomes = {"refused": 0}
    name_chars = st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"])

    @given(prefix=PREFIXES, name=st.text(name_chars, min_size=1, max_size=30),
           groups=st.lists(st.text(name_chars, min_size=1, max_size=10), max_size=3))
    @HYPOTHESIS
    def check(prefix, name, groups):
        groups = [g for g in groups if g != name]
        impostor = _user(node, prefix + name, groups)
        assert _certify(client, impostor).status_code == 200
        published, _key, _blob = _publish(client, owner, {f"group:{name}": ["VIEW"]})
        assert published.status_code == 200, published.text
        refused = _license(client, impostor, published.json()["pl"])
        assert refused.status_code == 403, refused.text
        outcomes["refused"] += 1

    check()
    _report("user named like a group", outcomes, record_property)


def _report(what: str, outcomes: dict, record_property) -> None:
    line = f"{what}: {sum(outcomes.values())} cases ({', '.join(f'{k}: {v}' for k, v in outcomes.items())})"
    print(f"\n[hypothesis] {line}")
    record_property("hypothesis_cases", line)
    CASES[what] = sum(outcomes.values())
