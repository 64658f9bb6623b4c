"""``PromptText``: the text policy of ``inference.text_policy`` as a pydantic field type.

Every API's schema declares its prompt fields with it, so the rule has one home and a refusal is a
validation error that each API renders in its own envelope, naming the caller's own field.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError

from inference.text_policy import MAX_NAME_CHARS, MAX_PROMPT_CHARS, text_problem

__all__ = ["MAX_NAME_CHARS", "MAX_PROMPT_CHARS", "NameText", "PromptText"]


def _policy(max_chars: int):
    def validate(value: object) -> object:
        if isinstance(value, str):  # anything else is left to the str type's own error
            problem = text_problem(value, max_chars)  # the length first: nothing scans an overlong text
            if problem is not None:
                raise PydanticCustomError("text_policy", "text {problem}", {"problem": problem})
        return value

    return validate


#: A prompt field. The policy runs before pydantic's own string checks, so a lone surrogate is named as
#: such (pydantic's constrained str would say "unable to parse raw data as a unicode string"); the
#: ``max_length`` documents the limit in the OpenAPI schema and stays as a second check.
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), BeforeValidator(_policy(MAX_PROMPT_CHARS))]

#: A model id or style name: the same rules, 200 characters (unknown names are echoed in the error).
NameText = Annotated[str, Field(max_length=MAX_NAME_CHARS), BeforeValidator(_policy(MAX_NAME_CHARS))]
