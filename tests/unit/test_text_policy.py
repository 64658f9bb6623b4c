"""Security review, finding 4: one text policy for every API (``inference.text_policy``).

The node API took prompts of any length (REST and OpenAI capped them at 2,000 characters): a 1 MB
prompt blocked the engine's step thread while the tokenizer read it and went into the logs. A lone
surrogate (``"\\ud800"``) reached the tokenizer and came back as a 500 ``generation_failed``. Now
``prompt``, ``prompt_2`` and ``negative_prompt`` follow the same rules in every API (length, valid
Unicode, no control characters but tab and line breaks), refused at the edge with a 400 in the API's
own envelope naming the caller's field; the engine checks again.
"""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from inference.engine import StepBatchingEngine
from inference.errors import InvalidInputError
from inference.text_policy import (
    MAX_EXPANDED_PROMPT_CHARS,
    MAX_PROMPT_CHARS,
    check_request_text,
    text_problem,
)
from tests.support.engine_requests import engine_request
from tests.unit.api_fakes import AUTH, assert_error, data_url, image_bytes

SOURCE = data_url(64, 48)
ONE_MB = "zq" * (512 * 1024)  # 1 MiB of text, and a marker no log line contains by chance

#: api → the text fields it takes.
FIELDS = {
    "rest": ("prompt", "negative_prompt"),
    "node": ("prompt", "prompt_2", "negative_prompt"),
    "openai": ("prompt", "negative_prompt"),
}
CASES = [(api, field) for api, fields in FIELDS.items() for field in fields]


def send(client, api: str, **text: str | bytes):
    """One request to ``api`` with ``text`` fields set (bytes: sent raw, not as UTF-8 of a str)."""
    if api == "openai":
        files = {"image": ("source.png", image_bytes(64, 48), "image/png")}
        fields = {"prompt": "a red fox", **text}
        for name, value in fields.items():
            files[name] = (
                None,
                value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"),
            )
        return client.post("/v1/images/edits", files=files, headers=AUTH)
    if api == "rest":
        url, body = "/v1/image-to-image", {"image": SOURCE, "prompt": "a red fox"}
    else:
        url = "/v1/nodes/image_to_image"
        body = {"source_image": SOURCE, "prompt": "a red fox", "negative_prompt": ""}
    body.update(text)
    # json.dumps escapes a lone surrogate as \ud800, as a JSON client sends it
    return client.post(
        url, content=json.dumps(body).encode(), headers={**AUTH, "content-type": "application/json"}
    )


def assert_refused(response, api: str, field: str, *, mentions: str) -> None:
    """A 400 in the API's own envelope, naming the caller's own field, never echoing the text."""
    assert response.status_code == 400, response.text[:500]
    assert len(response.content) < 2000  # the text is not echoed
    error = response.json()["error"]
    if api == "openai":
        assert (error["code"], error["param"], error["type"]) == (
            "invalid_value",
            field,
            "invalid_request_error",
        )
        assert mentions in error["message"], error
    else:
        assert_error(response, 400, "invalid_parameter", param=field, mentions=(mentions,))


# ------------------------------------------------------------------ the policy


@pytest.mark.parametrize(
    "text",
    [
        "a red fox",
        "x" * MAX_PROMPT_CHARS,
        "line one\nline two\r\n\tindented",
        "🦊 fox, 👩‍👩‍👧 family",  # emoji and zero-width joiners
        "ثعلب أحمر",  # right-to-left text
        "renard rouge, \u00e9t\u00e9, na\u00efve",
        "",
    ],
)
def test_finding4_ordinary_text_passes(text):
    assert text_problem(text) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x" * (MAX_PROMPT_CHARS + 1), "2001 characters"),
        ("fox \ud800", "lone surrogate (U+D800) at character 4"),
        ("\udfff", "lone surrogate"),
        ("fox\x00", "U+0000"),
        ("\x1b[31mred", "U+001B"),
        ("fox\x7f", "U+007F"),
        ("fox\x85", "U+0085"),
    ],
)
def test_finding4_the_policy_refuses_without_quoting_the_text(text, words):
    problem = text_problem(text)
    assert problem is not None and words in problem
    assert "fox" not in problem and "red" not in problem


def test_finding4_the_engine_refuses_what_the_edge_would_have():
    """The second line: a request built by any path (an old job record) never reaches a tokenizer."""
    engine = StepBatchingEngine.__new__(StepBatchingEngine)  # submit checks text before any state

    def request(**text):
        return engine_request("r", "m", image=Image.new("RGB", (8, 8)), seed=0, **{"prompt": "p", **text})

    for text in ({"prompt": ONE_MB}, {"negative_prompt": "\ud800"}, {"prompt_2": "a\x00"}):
        with pytest.raises(InvalidInputError) as refused:
            engine.submit(request(**text))
        assert refused.value.param == next(iter(text)) and refused.value.code == "invalid_request"
    check_request_text(request(prompt="x" * MAX_EXPANDED_PROMPT_CHARS))  # room for a style's suffix


# ------------------------------------------------------------------ over HTTP, every API and field


@pytest.mark.parametrize(("api", "field"), CASES)
def test_finding4_a_one_megabyte_prompt_is_refused_at_the_edge_and_never_logged(
    client, backend, caplog, api, field
):
    caplog.set_level(logging.DEBUG)
    response = send(client, api, **{field: ONE_MB})
    assert_refused(response, api, field, mentions="2000")
    assert backend.calls == []  # never reached the engine
    assert all("zqzq" not in record.getMessage() for record in caplog.records)
    assert all(len(record.getMessage()) < 10_000 for record in caplog.records)


@pytest.mark.parametrize(("api", "field"), CASES)
def test_finding4_2000_characters_pass_and_2001_do_not(client, backend, api, field):
    assert send(client, api, **{field: "x" * MAX_PROMPT_CHARS}).status_code == 200
    assert_refused(send(client, api, **{field: "x" * 2001}), api, field, mentions="2000")


@pytest.mark.parametrize(("api", "field"), CASES)
def test_finding4_a_lone_surrogate_is_a_400_not_a_500(client, backend, api, field):
    # JSON can carry a lone surrogate (\ud800); multipart cannot, its UTF-8 bytes arrive as Latin-1 text
    mentions = "control character" if api == "openai" else "lone surrogate (U+D800) at character 6"
    assert_refused(send(client, api, **{field: "a fox \ud800"}), api, field, mentions=mentions)
    assert backend.calls == []


@pytest.mark.parametrize(("api", "field"), CASES)
@pytest.mark.parametrize("control", ["\x00", "\x1b", "\x7f"])
def test_finding4_control_characters_are_refused(client, backend, api, field, control):
    assert_refused(send(client, api, **{field: f"a fox{control}"}), api, field, mentions="control character")
    assert backend.calls == []


@pytest.mark.parametrize("field", FIELDS["openai"])
def test_finding4_multipart_text_that_is_not_utf8_is_refused(client, backend, field):
    """Starlette decodes a non-UTF-8 form field as Latin-1: its stray bytes become C1 controls."""
    response = send(client, "openai", **{field: b"a fox \xed\xa0\x80"})  # a UTF-8-encoded surrogate
    assert_refused(response, "openai", field, mentions="control character")


@pytest.mark.parametrize("api", ["rest", "node", "openai"])
def test_finding4_tabs_line_breaks_and_emoji_reach_the_model_unchanged(client, backend, api):
    text = "a fox\n\tin the snow 🦊‍🔥 ثعلب"
    assert send(client, api, prompt=text).status_code == 200
    assert backend.last.prompt == text


def test_finding4_a_too_long_node_prompt_is_not_reported_as_empty(client):
    """The node spec's empty_prompt is for a missing or blank prompt; anything else is invalid_parameter."""
    assert_refused(send(client, "node", prompt="x" * 2001), "node", "prompt", mentions="2000")
    blank = send(client, "node", prompt="  ")
    assert_error(blank, 400, "empty_prompt", param="prompt")


@pytest.mark.parametrize(
    ("api", "field"), [("rest", "model"), ("rest", "style"), ("node", "model"), ("openai", "model")]
)
def test_finding4_the_same_class_names_are_bounded_too(client, backend, api, field):
    """Model ids and style names are echoed in 'unknown model' errors: 200 characters, same rules."""
    response = send(client, api, **{field: ONE_MB})
    assert_refused(response, api, field, mentions="200")
    assert backend.calls == []
