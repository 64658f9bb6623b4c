"""Cross-origin (CORS) access for browser clients: off unless the Serve config lists origins.

The API is called with a Bearer key from servers and CLIs, which CORS does not concern. A browser
page on another origin can call it only if we answer its preflight, so by default no CORS middleware
is installed at all and responses carry no ``Access-Control-*`` header. ``args.cors.allow_origins``
opens it for exactly the listed origins (or ``*`` for any), with the methods and headers our routes
use; Starlette's ``CORSMiddleware`` then answers preflights and decorates responses.

Origins are compared as exact strings with the browser's ``Origin`` header, so each must be written
the way browsers send it (``https://app.example.com``: lowercase, no path, no default port); the
validator says how to write one that would silently never match.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ANY_ORIGIN = "*"
ALLOW_METHODS = ("GET", "POST", "DELETE")
ALLOW_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "Prefer")
EXPOSE_HEADERS = ("Location", "Retry-After")  # 202's job link and the back-off hint of 429/503
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _canonical_origin(origin: str) -> str:
    """The origin as browsers serialise it, or ValueError naming what is wrong."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    if scheme not in _DEFAULT_PORTS or not parts.hostname or port == -1:
        raise ValueError(
            f"CORS origin {origin!r} must be scheme://host[:port] with scheme http or https, "
            "e.g. 'https://app.example.com'"
        )
    if "*" in parts.netloc:
        raise ValueError(
            f"CORS origin {origin!r}: wildcards inside an origin are not supported; list each origin, "
            "or '*' alone to allow any"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    suffix = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
    return f"{scheme}://{host}{suffix}"


class CorsPolicy(BaseModel):
    """``args.cors``: which browser origins may call the API. Empty (the default): CORS is off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_origins: tuple[str, ...] = Field(
        (), description="exact origins like 'https://app.example.com', or ['*'] for any origin"
    )
    allow_credentials: bool = Field(
        False, description="let browsers send cookies/HTTP auth; Bearer keys in JS do not need it"
    )
    max_age_s: int = Field(600, ge=0, le=86400, description="how long browsers may cache a preflight")

    @field_validator("allow_origins")
    @classmethod
    def _origins_as_browsers_send_them(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        if ANY_ORIGIN in origins:
            if len(origins) > 1:
                raise ValueError("'*' already allows every origin: list it alone, or list origins only")
            return origins
        for origin in origins:
            canonical = _canonical_origin(origin)
            if origin != canonical:
                raise ValueError(
                    f"CORS origin {origin!r} would never match a browser's Origin header; write it as "
                    f"{canonical!r} (scheme://host[:port], lowercase, no path or trailing slash, "
                    "no default port)"
                )
        return origins

    @model_validator(mode="after")
    def _no_credentials_for_everyone(self) -> CorsPolicy:
        if self.allow_credentials and ANY_ORIGIN in self.allow_origins:
            raise ValueError(
                "cors.allow_credentials cannot be combined with allow_origins ['*']: that would let "
                "every website send requests with the user's credentials; list the trusted origins"
            )
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


def add_cors(app: FastAPI, policy: CorsPolicy | None) -> None:
    """Install CORS on ``app`` if ``policy`` lists origins; otherwise leave the app without it.

    Call it after every other middleware so CORS is outermost: error responses (401, 413, 429)
    then carry the headers too, and a browser can show the caller why a request failed.
    """
    if policy is None or not policy.enabled:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(policy.allow_origins),
        allow_credentials=policy.allow_credentials,
        allow_methods=list(ALLOW_METHODS),
        allow_headers=list(ALLOW_HEADERS),
        expose_headers=list(EXPOSE_HEADERS),
        max_age=policy.max_age_s,
    )
