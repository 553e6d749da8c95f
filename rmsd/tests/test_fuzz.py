"""Property-based fuzzing of every operation in a running node's OpenAPI document (a node on SQLite
and one on PostgreSQL): whatever the request, a caller with a valid bearer token never gets a
server error (5xx)."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/slc"),
    ("POST", "/certification"),
    ("POST", "/publishing"),
    ("POST", "/licensing"),
    ("POST", "/enrollment"),
]
MAX_EXAMPLES = 100


@pytest.fixture
def api_schema(any_node):
    return schemathesis.openapi.from_url(f"{any_node.url}/openapi.json")


@pytest.fixture
def auth_headers(any_node):
    return {"Authorization": f"Bearer {any_node.token('fuzzer@example.com', ['finance'], ttl=900)}"}


def test_every_operation_is_fuzzed(api_schema):
    listed = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert listed == set(OPERATIONS)


# Negative cases (requests that break the schema) exist only for operations that take a body.
CASES = [
    pytest.param(method, path, mode, id=f"{method} {path} {mode.value}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_error(api_schema, auth_headers, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(headers=auth_headers, checks=[not_a_server_error])

    fuzz()
