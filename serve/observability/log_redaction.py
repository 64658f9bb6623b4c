"""Keep credentials that ride inside URLs out of the log lines our HTTP libraries write.

Our own log calls never format keys, secrets or URLs. But the server makes outbound requests to URLs
that callers chose (source images, webhook targets), and httpx logs every request at INFO with its
full URL. Those URLs often carry credentials in the query string (an S3 presigned URL's
``X-Amz-Signature``, a webhook's ``?token=``), so each such line would copy a third party's secret
into our logs. A filter on that library's logger rewrites the line with query strings, userinfo and
bearer tokens replaced, keeping what helps an operator (method, host, path, status).
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"

#: Loggers that write request URLs ("HTTP Request: POST https://... 200 OK", at INFO): httpx (our
#: source-image and webhook client) and its fork httpx2 (huggingface_hub's and Starlette's test
#: client). A logger's filters see only records logged through that very logger, so each is named.
URL_LOGGERS = ("httpx", "httpx2")

_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>]*)\?[^\s#\"'<>]*")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@\"'<>]+@")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;]+")


def redact(text: str) -> str:
    """``text`` with every URL's query string and userinfo, and every bearer token, replaced."""
    text = _QUERY.sub(rf"\1?{REDACTED}", text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    return _BEARER.sub(rf"\1 {REDACTED}", text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message through ``redact`` (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def redact_library_logs() -> None:
    """Install the filter on every logger in ``URL_LOGGERS``; safe to call again (processes call it
    when they start: the ingress app, the job coordinator)."""
    for name in URL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
