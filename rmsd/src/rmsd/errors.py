"""Errors whose message tells the operator what to do next."""


class RmsdError(Exception):
    """A refused or failed operation. Nothing was changed."""


class AuthenticationError(RmsdError):
    """The caller's bearer token or credential is not acceptable."""


class ForbiddenError(RmsdError):
    """The caller is authenticated but holds no right to what it asked for."""


class NotFoundError(RmsdError):
    """The thing asked for does not exist."""


class InvalidRequestError(RmsdError):
    """The request is malformed."""


class RevokedError(RmsdError):
    """What was asked for is protected by a key that was revoked as compromised."""


class KeyUnavailableError(RmsdError):
    """A cluster key's private half cannot be used: its token object is gone or may no longer sign or
    decrypt, as when a rotation settles a compromised key in the token."""


class DatabaseUnavailableError(RmsdError):
    """No host of the configuration database can answer this request now (no primary for a write; for a read,
    no standby that has replayed all it received); it may be sent again after a while. Nothing was done."""


class TooManyRequestsError(RmsdError):
    """The caller asked for more than a node does for anyone before authentication; it may try again after
    `retry_after` seconds. Nothing was done."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after
