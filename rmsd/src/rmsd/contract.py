"""The HTTP contract of a node, as its OpenAPI document publishes it: request and response bodies, what the
tokens and certificates it issues hold once decoded, what each operation does, and how the answer of one
operation feeds the next (OpenAPI links). A client is written from this document alone."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rmsd import licenses, pki
from rmsd.identity import GROUP_PREFIX, USER_PREFIX

Right = Literal[licenses.RIGHTS]  # type: ignore[valid-type]
RIGHTS_TEXT = (
    "OWNER (everything, and republishing), VIEW (open and read), EDIT (change and save), PRINT, EXPORT (save "
    "unprotected), EXTRACT (copy out), FORWARD (send on), REPLY"
)
KEY_ID_TEXT = (
    "a cluster key id: the first 20 bytes of SHA-256 over the key's DER SubjectPublicKeyInfo, 40 lowercase hex "
    "digits"
)
PRINCIPAL_TEXT = (
    f"A principal is `{USER_PREFIX}ID` (the user whose bearer-token `sub` is exactly ID), `{GROUP_PREFIX}NAME` "
    "(anyone whose token's `groups` claim holds exactly NAME), or a bare ID meaning `user:ID`. ID and NAME: 1 to "
    "256 Unicode characters, no control characters; compared exactly (case-sensitive, no normalization). A bare ID "
    "whose text before its first ':' reads as 'user' or 'group' in any case (e.g. `Group:x`) is refused as "
    "ambiguous (400): write `user:Group:x`. A user's own id never matches a `group:` principal."
)
EXAMPLE_CSR = "-----BEGIN CERTIFICATE REQUEST-----\nMIICijCCAXICAQAw...\n-----END CERTIFICATE REQUEST-----\n"
EXAMPLE_CERT = "-----BEGIN CERTIFICATE-----\nMIIDBTCCAe2gAwIBAgIUM3S7...\n-----END CERTIFICATE-----\n"
EXAMPLE_JWS = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjNmYzEuLi4iLCJ0eXAiOiJybXNkLXBsK2p3cyJ9.eyJpc3MiOi4uLn0.c2lnbmF0dXJl"
EXAMPLE_KEY_ID = "3fc1d0a5e2b94c7788aa01f6e2c3d4b5a6978899"
EXAMPLE_PL_ID = "9b2f4c1e8d7a4e06b3f5a1c2d3e4f506"


def _decoded(schema: str, media: str) -> dict:
    """A string field that carries a token or certificate: its media type and the schema it decodes to."""
    return {"contentMediaType": media, "x-rmsd-decoded": f"#/components/schemas/{schema}"}


# --- requests ----------------------------------------------------------------------------------------------


class CertificationRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"csr": EXAMPLE_CSR}]})

    csr: str = Field(
        max_length=16384,
        description="PEM PKCS#10 request signed with the user's own RSA key (2048 bits or more, public exponent "
        "65537). Only its public key is used: the RAC's subject comes from the bearer token.",
    )


class PublishingRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "content_id": "finance/q3-forecast.xlsx", "content_key": "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80",
        "rights": {"group:finance": ["VIEW", "PRINT"], "user:bob@example.com": ["EDIT"]},
    }]})

    content_id: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$",
                            description="the publisher's name for the content; any Unicode text, kept exactly")
    content_key: str = Field(pattern=r"^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048](=)?$",
                             description="the content's AES-256 key (32 bytes), base64url: 43 characters and an "
                             "optional '=' padding")
    rights: dict[str, list[Right]] = Field(
        default_factory=dict, max_length=256,
        description=f"principal -> rights ({RIGHTS_TEXT}); added to the template's. {PRINCIPAL_TEXT}",
    )
    template: str | None = Field(
        default=None, min_length=1, max_length=64, description="a rights policy template of this cluster"
    )
    supersedes: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{32}$",
        description="republishing: the pl_id of the owner's publishing license this one replaces",
    )


class EnrollmentRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "cluster": "branch-ams", "csr": EXAMPLE_CSR, "intranet_url": "https://rms-ams.corp.example:8443",
        "credential": "enrollment credential secret",
    }]})

    cluster: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the licensing cluster")
    csr: str = Field(max_length=16384, description="PEM PKCS#10 request signed by the licensing cluster key")
    intranet_url: str = Field(max_length=512, pattern=r"^https?://")
    extranet_url: str | None = Field(default=None, max_length=512, pattern=r"^https?://")
    credential: str = Field(min_length=1, max_length=512,
                            description="the enrollment credential's secret; a credential enrolls once")
    revoked_key_ids: list[Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]] = Field(
        default_factory=list, max_length=64,
        description="keys of this licensing cluster it revoked as compromised; never enrolled again. Each needs "
        "its revocation statement in `revocations`",
    )
    revocations: list[Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=list, max_length=64,
        description="revocation statements: per revoked key, a compact JWS (typ rmsd-key-revocation+jws, RS256) "
        "signed by that key, its public key in the `jwk` header, over {cluster, revoked_key_id, iat}",
    )


class LicensingRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"pl": EXAMPLE_JWS, "rac": EXAMPLE_CERT}]})

    pl: str = Field(max_length=65536, description="the publishing license (compact JWS), as /publishing issued it",
                    json_schema_extra=_decoded("PublishingLicenseClaims", "application/jose"))
    rac: str = Field(max_length=16384, description="the requester's RAC (PEM), as /certification issued it",
                     json_schema_extra=_decoded("RacProfile", "application/pem-certificate-chain"))


# --- responses ---------------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok"]
    cluster: str
    node: str
    role: Literal["root", "licensing"]
    state: str = Field(description="provisioned, or decommissioned (it then issues nothing)")
    active_key_id: str = Field(description=f"the key this cluster signs with now; {KEY_ID_TEXT}")
    version: str = Field(description="the rmsd version this node runs")
    schema_revision: str | None = Field(
        default=None, description="the configuration database's schema revision (alembic), as this node last read "
        "it: nodes of two rmsd versions share one schema during a rolling upgrade"
    )
    started_at: str = Field(description="when this node's process started (a restart drops every key it held)")
    restart_advised: bool = Field(
        description="a cluster key was revoked as compromised since this process started: it may still hold a copy "
        "of that key in memory; restart it (drained) to be sure it holds none"
    )
    instance_id: str | None = Field(
        default=None, description="this node's identity, made when its configuration was first written: whoever "
        "checks the node compares it with the one its configuration holds, so an answer from another process on the "
        "port is not taken for this node's. Null for a configuration written before nodes had one"
    )


class Slc(BaseModel):
    cluster: str
    role: Literal["root", "licensing"]
    state: str
    intranet_url: str
    extranet_url: str | None
    key_id: str = Field(description=f"the active cluster key; {KEY_ID_TEXT}. The `kid` of what this cluster signs")
    chain: list[str] = Field(description="the cluster's SLC (PEM), then the root SLC it chains to (licensing "
                             "clusters). Verify a UL or PL with the public key of chain[0] when its kid is key_id")
    revoked_key_ids: list[str] = Field(description="this cluster's keys revoked as compromised: trust nothing they "
                                       "signed")


class Enrollment(BaseModel):
    slc: str = Field(description="the licensing cluster's SLC (PEM), issued by the root cluster key")
    chain: list[str] = Field(description="the root cluster's SLC (PEM)")


class Rac(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"rac": EXAMPLE_CERT, "chain": [EXAMPLE_CERT]}]})

    rac: str = Field(description="the user's rights account certificate (PEM)",
                     json_schema_extra=_decoded("RacProfile", "application/pem-certificate-chain"))
    chain: list[str] = Field(description="the root cluster's SLC (PEM) that issued it")


class PublishingLicense(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "pl": EXAMPLE_JWS, "pl_id": EXAMPLE_PL_ID, "content_id": "finance/q3-forecast.xlsx", "key_id": EXAMPLE_KEY_ID,
        "supersedes": None,
    }]})

    pl: str = Field(description="the publishing license, a compact JWS",
                    json_schema_extra=_decoded("PublishingLicenseClaims", "application/jose"))
    pl_id: str = Field(description="the license's id, 32 lowercase hex digits")
    content_id: str
    key_id: str = Field(description="the cluster key that signed it and that its content key is wrapped to")
    supersedes: str | None = None


class UseLicense(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ul": EXAMPLE_JWS, "content_id": "finance/q3-forecast.xlsx", "rights": ["PRINT", "VIEW"],
    }]})

    ul: str = Field(description="the use license, a compact JWS",
                    json_schema_extra=_decoded("UseLicenseClaims", "application/jose"))
    content_id: str
    rights: list[Right] = Field(description="what the user may do with the content, sorted")


class Problem(BaseModel):
    """RFC 9457 problem document (application/problem+json): the answer to every error. Some problems add
    members: `errors` (422: where the request breaks the schema), `max_body_bytes` (413),
    `read_timeout_seconds` (408)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="urn:rmsd:problem:NAME, or about:blank when the status says it all")
    title: str
    status: int
    detail: str = Field(description="what went wrong and what to do about it")
    instance: str | None = Field(default=None, description="urn:uuid:REQUEST-ID of this request")
    request_id: str | None = Field(default=None, description="the id this request is logged with")
    error: str | None = Field(default=None, description="the refusal's name (e.g. ForbiddenError)")
    errors: list[dict] | None = Field(default=None, description="422 only: each `loc`, `msg` and `type`")


# --- what the issued tokens and certificates hold once decoded ---------------------------------------------


class JoseHeader(BaseModel):
    """The protected header of a PL or UL (compact JWS, RFC 7515)."""

    alg: Literal["RS256"] = Field(description="RSASSA-PKCS1-v1_5 with SHA-256, by a cluster key")
    kid: str = Field(description=f"the signing cluster key; {KEY_ID_TEXT}. Look it up in /slc (key_id) or the SLC")
    typ: Literal["rmsd-pl+jws", "rmsd-ul+jws"] = Field(description="rmsd-pl+jws for a PL, rmsd-ul+jws for a UL; "
                                                       "a verifier refuses a token of the other type")


class WrappedContentKey(BaseModel):
    """The protected header of `wrapped_key` (compact JWE, RFC 7516). Its plaintext is the 32 raw bytes of the
    content's AES-256 key, nothing else."""

    alg: Literal["RSA-OAEP-256", "RSA-OAEP"] = Field(
        description="RSA-OAEP with SHA-256; RSA-OAEP (SHA-1) for a cluster key held by a PKCS#11 token that has "
        "no OAEP-SHA-256")
    enc: Literal["A256GCM"]
    kid: str = Field(description="in a PL: the cluster key id it is wrapped to; in a UL: the RAC's serial number "
                     "(lowercase hex), whose key opens it")


class PublishingLicenseClaims(BaseModel):
    """The payload of a PL (compact JWS, header: JoseHeader with typ rmsd-pl+jws). Only a node of the cluster
    that issued it can open its content key."""

    iss: str = Field(description="the issuing cluster's name")
    pl_id: str = Field(description="32 lowercase hex digits")
    content_id: str
    owner: str = Field(description="the publisher's user id (bearer-token sub), exactly")
    rights: dict[str, list[Right]] = Field(description=f"canonical principal -> rights. {PRINCIPAL_TEXT}")
    key_id: str = Field(description="the cluster key the content key is wrapped to (equals the header's kid)")
    wrapped_key: str = Field(description="the content key, a compact JWE (WrappedContentKey) to the cluster key",
                             json_schema_extra=_decoded("WrappedContentKey", "application/jose"))
    iat: int = Field(description="issued at, seconds since the epoch")
    template: str | None = Field(default=None, description="the rights policy template it was published with")


class UseLicenseClaims(BaseModel):
    """The payload of a UL (compact JWS, header: JoseHeader with typ rmsd-ul+jws, kid the licensing cluster's
    key). Verify it with that cluster's SLC, then open `wrapped_key` with the RAC's private key."""

    iss: str = Field(description="the issuing cluster's name")
    pl_id: str
    content_id: str
    sub: str = Field(description="the user it was issued to (bearer-token sub), exactly")
    rights: list[Right] = Field(description=f"the user's rights, sorted: {RIGHTS_TEXT}")
    rac_serial: str = Field(description="serial number of the RAC it was issued for, lowercase hex")
    wrapped_key: str = Field(description="the content key, a compact JWE (WrappedContentKey) to the RAC's key",
                             json_schema_extra=_decoded("WrappedContentKey", "application/jose"))
    iat: int
    exp: int = Field(description=f"expiry, {licenses.UL_VALIDITY.days} days after iat")


class RacProfile(BaseModel):
    """What a RAC (an X.509 v3 certificate, PEM) holds. It is issued by the root cluster's active key and
    verifies against the root SLC (/slc chain of the root cluster)."""

    subject: str = Field(description=f"CN only: the user id when its UTF-8 fits in {pki.CN_MAX} octets, else its "
                         "start, an ellipsis and sha256 of the whole id. A label: never used to tell users apart")
    user_id_uri: str = Field(description=f"subjectAltName URI {pki.USER_ID_URN} followed by the user id's UTF-8, "
                             "percent-encoded: the user id, losslessly. An rfc822Name is added for plain e-mail ids")
    validity: str = Field(description=f"at most {pki.RAC_VALIDITY.days} days from issue, never past the root SLC")
    key: str = Field(description="the CSR's RSA public key: 2048 bits or more, public exponent 65537")
    extensions: list[str] = Field(description="basicConstraints CA:FALSE (critical); keyUsage digitalSignature and "
                                  "keyEncipherment (critical); subjectAltName; authorityKeyIdentifier")


DECODED = (JoseHeader, WrappedContentKey, PublishingLicenseClaims, UseLicenseClaims, RacProfile)


# --- operations ------------------------------------------------------------------------------------------

OPERATIONS: dict[str, dict[str, Any]] = {
    "health": dict(
        summary="The node's health and the cluster's active key",
        description="From the node's view of its cluster, read from the configuration database at most about a "
        "second before (a rotation shows within that second). No authentication; the public load balancer serves it "
        "to its operators only.",
    ),
    "slc": dict(
        summary="The cluster's server licensor certificate and trust information",
        description="The SLC chain to verify PLs and ULs with, the active key id, and the keys revoked as "
        "compromised, read at most about a second before. No authentication. Licensing clusters read the root "
        "cluster's to learn about rotations.",
    ),
    "certify": dict(
        summary="Issue a RAC for the authenticated user",
        description="Root clusters only. The bearer token's `sub` becomes the RAC's user id (never the CSR's "
        "subject). Refused: tokens without a valid `exp`, `iss`, `aud` or `sub` (401); a CSR that is not PEM, "
        "not self-signed or with a weak key (400).",
        links={"license with this RAC": {"operationId": "license", "requestBody": {"rac": "$response.body#/rac"},
                                         "description": "the RAC names the user who asks for a use license"}},
    ),
    "publish": dict(
        summary="Issue a PL: protect content under the cluster's active key",
        description="The caller (the bearer token's `sub`) becomes the content's owner, who always holds every "
        "right. The content key is wrapped to the cluster key; only nodes of this cluster can open it. With "
        "`supersedes`, the owner republishes content (e.g. after its key was revoked as compromised).",
        links={
            "license this content": {"operationId": "license", "requestBody": {"pl": "$response.body#/pl"},
                                     "description": "a user with rights asks for a use license"},
            "republish this content": {
                "operationId": "publish",
                "requestBody": {"content_id": "$response.body#/content_id", "supersedes": "$response.body#/pl_id"},
                "description": "the owner replaces this PL with a new one",
            },
        },
    ),
    "license": dict(
        summary="Issue a UL: the content key, wrapped to the user's RAC, with the user's rights",
        description="The RAC must be issued by this deployment's root cluster to the bearer token's user; the PL "
        "by this cluster, under a key that is not revoked. Rights: the owner holds all; others what their `user:` "
        "principal and the `group:` principals of their token's `groups` grant, compared exactly.",
    ),
    "enroll": dict(
        summary="Certify a licensing cluster's key (root clusters only)",
        description="Authenticated by an enrollment credential (not a bearer token), scoped to one licensing "
        "cluster, valid until it expires and spent by the enrollment it makes. Before the credential is checked, "
        "each client address may ask a few times, then about once every few seconds, and a node checks only a "
        "few credentials at once: beyond either, 429 with Retry-After. A key revoked as compromised is never "
        "enrolled again; the root takes a revocation only with the revoked key's own signed statement.",
    ),
}


def document(openapi: dict) -> dict:
    """The generated OpenAPI document, completed: the decoded token schemas and the links."""
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in DECODED:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    openapi["info"]["description"] = (
        "An RMS node: certification (RAC), publishing (PL) and licensing (UL) for users authenticated by bearer "
        "tokens of the configured identity issuer; enrollment of licensing clusters by the root cluster. Every "
        "error is an RFC 9457 problem document. Strings that carry a token or certificate name the schema they "
        "decode to in `x-rmsd-decoded` (a JSON pointer into this document). Limits, before any parsing or "
        "authentication: request body size (413), "
        "request line and headers size (400) and the time to send them (the connection is closed), the time to "
        "send the body (408)."
    )
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for item in openapi.get("paths", {}).values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if status != "200":  # every error is a problem document, 422 included
                    response["content"] = problem
            links = OPERATIONS.get(operation.get("operationId"), {}).get("links")
            if links:
                operation["responses"]["200"]["links"] = links
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return openapi
