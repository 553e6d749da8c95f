"""Property-based fuzzing of a running node (one on SQLite, one on PostgreSQL) from its OpenAPI document
alone: every operation with inputs that fit the schema and inputs that break it, then sequences of calls
that follow the document's links (a PL or RAC from one answer fed into the next request). Whatever the
request, a caller with a valid bearer token never gets a server error (5xx), and the node still serves a
full round trip afterwards. The number of cases and their statuses are printed in the summary."""

from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import stateful as stateful_openapi

from rmsd import licenses
from rmsd.client import RmsClient, User, decrypt_content, encrypt_content, open_use_license

OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/slc"),
    ("POST", "/certification"),
    ("POST", "/publishing"),
    ("POST", "/licensing"),
    ("POST", "/enrollment"),
]
MAX_EXAMPLES = 60  # per operation, generation mode and backend
STATEFUL = settings(max_examples=40, stateful_step_count=6, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture
def api_schema(any_node):
    return schemathesis.openapi.from_url(f"{any_node.url}/openapi.json")


@pytest.fixture
def auth_headers(any_node):
    return {"Authorization": f"Bearer {any_node.token('fuzzer@example.com', ['finance'], ttl=900)}"}


def _report(record_property, what: str, statuses: Counter) -> None:
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    by_status = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    record_property("hypothesis_cases", f"{what}: {sum(statuses.values())} cases, {server_errors} 5xx ({by_status})")
    assert server_errors == 0


def _round_trip(node) -> None:
    """Certify, publish, license and open a document: the node is still whole."""
    client = RmsClient(node.url)
    owner = User.new("after-fuzz@example.com", node.token("after-fuzz@example.com", ttl=900))
    client.certify(owner)
    content_key, blob = encrypt_content(b"still serving")
    published = client.publish(owner, "after-fuzz", content_key, {"group:finance": ["VIEW"]})
    licensed = client.license(owner, published["pl"])
    _claims, opened = open_use_license(licensed["ul"], client.slc()["chain"][0], owner)
    assert decrypt_content(opened, blob) == b"still serving"


def test_every_operation_is_fuzzed_and_documented(api_schema, any_node):
    document = api_schema.raw_schema
    listed = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert listed == set(OPERATIONS)
    schemas = document["components"]["schemas"]
    for item in document["paths"].values():
        for operation in item.values():
            assert operation.get("summary") and operation.get("description"), operation.get("operationId")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:  # every request body has an example
                assert schemas[body["$ref"].rsplit("/", 1)[1]].get("examples"), operation["operationId"]
            for status, response in operation["responses"].items():
                if status != "200":
                    assert list(response["content"]) == ["application/problem+json"], (operation, status)
    # What the issued tokens and certificates hold is part of the contract, with every right.
    for name in ("PublishingLicenseClaims", "UseLicenseClaims", "JoseHeader", "WrappedContentKey", "RacProfile"):
        assert schemas[name]["properties"], name
    assert schemas["UseLicenseClaims"]["properties"]["rights"]["items"]["enum"] == list(licenses.RIGHTS)
    assert schemas["UseLicense"]["properties"]["ul"]["x-rmsd-decoded"] == "#/components/schemas/UseLicenseClaims"
    # No documentation pages that load their scripts from elsewhere.
    for page in ("/docs", "/redoc"):
        assert httpx.get(f"{any_node.url}{page}").status_code == 404


# Negative cases (requests that break the schema) exist only for operations that take a body.
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_error(api_schema, auth_headers, any_node, request, method, path, mode, record_property):
    operation = api_schema[path][method]
    statuses: Counter = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call(headers=auth_headers)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=[not_a_server_error])

    fuzz()
    _report(record_property, f"{request.node.callspec.params['any_node']}: {method} {path} {mode.value}", statuses)


def test_linked_sequences_never_get_a_server_error(api_schema, auth_headers, any_node, request, record_property,
                                                   monkeypatch):
    links = [name for item in api_schema.raw_schema["paths"].values() for operation in item.values()
             for name in operation["responses"]["200"].get("links", {})]
    assert len(links) >= 3, links  # RAC -> licensing, PL -> licensing, PL -> republishing
    statuses: Counter = Counter()
    linked: Counter = Counter()

    # Schemathesis guesses from the field name content_id that /publishing needs a "Content" made elsewhere,
    # and then never starts a sequence with it; it needs nothing: every operation with links may start one.
    monkeypatch.setattr(stateful_openapi, "is_likely_root_transition", lambda *_args: True)

    class Workflow(api_schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": auth_headers}

        def after_call(self, response, case):
            super().after_call(response, case)
            statuses[response.status_code] += 1

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            if case.operation.path == "/licensing" and case.body and isinstance(case.body, dict):
                linked["licensing with a real PL or RAC"] += any(
                    isinstance(case.body.get(k), str) and case.body[k].startswith(prefix)
                    for k, prefix in (("pl", "eyJ"), ("rac", "-----BEGIN CERTIFICATE-----")))
            case.validate_response(response, checks=[not_a_server_error])

    Workflow.run(settings=STATEFUL)
    _report(record_property, f"{request.node.callspec.params['any_node']}: linked sequences ({dict(linked)})",
            statuses)
    assert linked["licensing with a real PL or RAC"] > 0  # the links were followed, not only single calls
    _round_trip(any_node)
