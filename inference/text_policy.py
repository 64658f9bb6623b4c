"""One policy for the caller's text (prompts), the same in every API and defended again by the engine.

What a prompt may be, wherever it arrives (REST JSON, node JSON, OpenAI multipart, a stored job):

* at most ``MAX_PROMPT_CHARS`` characters (2,000; the REST and OpenAI limit, now also the node API's).
  A tokenizer reads the whole string before truncating to the model's 77 tokens, so a 1 MB prompt
  blocked the engine's step thread (every request batched with it) and was copied into the logs.
* valid Unicode: no lone surrogates (JSON can spell ``"\\ud800"``; the tokenizer then raised a
  ``TypeError``, which was a 500).
* no control characters except tab, line feed and carriage return (C0, DEL and C1: they do nothing
  for a model and forge or garble log lines and terminals). Multipart text that is not UTF-8 is
  decoded as Latin-1 by Starlette, so its stray bytes land here as C1 controls and are refused too.

The APIs apply it in their schemas (``serve.api.text_policy.PromptText``), so a refusal is a 400 in
each API's own envelope naming the caller's own field, raised before the text reaches anything else;
the length limit is checked before anything scans the text. ``check_request_text`` is the engine's
second line (``Engine.submit``), e.g. for job records accepted before this policy existed. This module
has no dependencies beyond the standard library and our errors, so every process can import it.
"""

from __future__ import annotations

import re

from inference.errors import InvalidInputError

MAX_PROMPT_CHARS = 2000
#: What the engine accepts per field: the caller's limit plus room for what we append (a style's suffix).
MAX_EXPANDED_PROMPT_CHARS = MAX_PROMPT_CHARS + 1000
#: Names the caller picks from a list we publish (model ids, style names): short, and echoed in errors.
MAX_NAME_CHARS = 200
#: The request fields this policy covers (each API may name them differently on the wire).
TEXT_FIELDS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")

# Tab (09), line feed (0A) and carriage return (0D) are the only control characters allowed.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(value: str, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
    """Why ``value`` breaks the policy (a sentence that never quotes the text), or None if it is fine."""
    if len(value) > max_chars:
        return f"is {len(value)} characters long; at most {max_chars} are allowed"
    bad = _FORBIDDEN.search(value)
    if bad is None:
        return None
    point = ord(bad.group())
    if 0xD800 <= point <= 0xDFFF:
        return (
            f"contains a lone surrogate (U+{point:04X}) at character {bad.start()}; send valid Unicode "
            "(surrogate pairs must be complete)"
        )
    return (
        f"contains the control character U+{point:04X} at character {bad.start()}; only tab, line feed "
        "and carriage return are allowed"
    )


def check_text(value: str | None, param: str, max_chars: int = MAX_PROMPT_CHARS) -> None:
    """Raise ``InvalidInputError`` (naming ``param``) if ``value`` breaks the policy; None passes."""
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidInputError(f"{param} must be a string", param=param)
    problem = text_problem(value, max_chars)
    if problem is not None:
        raise InvalidInputError(f"{param} {problem}", param=param)


def check_request_text(request: object) -> None:
    """Every text field of a ``GenerationRequest`` (or anything with those attributes), with room for
    the suffix a style appends after the API's check."""
    for name in TEXT_FIELDS:
        check_text(getattr(request, name, None), name, MAX_EXPANDED_PROMPT_CHARS)
