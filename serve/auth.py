"""API keys → tenant. Keys are kept only as SHA-256 hashes and compared in constant time.

The local run has one development key (``IMG2IMG_DEV_API_KEY``); the multi-tenant configuration
builds on the same table. A missing or wrong key is a 401 in every API's error shape.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from inference.errors import InvalidInputError


class AuthError(InvalidInputError):
    """Missing, malformed or unknown API key (HTTP 401)."""

    code = "unauthorized"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKeys:
    """Hashed keys and the tenant each one belongs to."""

    tenants_by_hash: Mapping[str, str]

    @classmethod
    def from_plain(cls, keys: Mapping[str, str]) -> ApiKeys:
        """``{plain key: tenant}``: the plain keys are hashed here and not kept."""
        return cls({hash_key(key): tenant for key, tenant in keys.items()})

    def tenant_for(self, authorization: str | None) -> str:
        """The tenant of an ``Authorization: Bearer <key>`` header, or AuthError."""
        if not (authorization or "").strip():
            raise AuthError(
                "missing API key: send the header 'Authorization: Bearer <key>'", param="Authorization"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError(
                "malformed Authorization header: expected 'Authorization: Bearer <key>'",
                param="Authorization",
            )
        candidate = hash_key(key.strip())
        tenant = None
        for stored, owner in self.tenants_by_hash.items():  # no early exit: timing says nothing
            if hmac.compare_digest(stored, candidate):
                tenant = owner
        if tenant is None:
            raise AuthError("invalid API key", param="Authorization")
        return tenant
