"""Authentication errors and key hashing; tenants and their keys live in ``serve.tenancy.tenants``.

Keys are kept only as SHA-256 hashes: a leaked configuration or object store does not leak keys.
"""

from __future__ import annotations

import hashlib


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
