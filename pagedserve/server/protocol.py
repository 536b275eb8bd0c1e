"""Pydantic models of the OpenAI request schema (plus vLLM's extra sampling fields).

Requests are parsed strictly (no "5" -> 5, no true -> 1) straight from the raw
body bytes, so malformed JSON, invalid UTF-8 and wrong types all become one
`ValidationError`, which the API turns into a 400 OpenAI error. Unknown fields
are ignored, as OpenAI-compatible servers do. Ranges are checked once, by
`SamplingParams`, so the messages are the same offline and online.

Responses are built as plain dicts (see serving.py): that is several times
faster than pydantic serialization on the streaming path.
"""
from __future__ import annotations

import json
import re
import types
import typing
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pagedserve.errors import InvalidRequestError


def _allows_none(annotation) -> bool:
    return annotation is None or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                  and type(None) in typing.get_args(annotation))


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI and vLLM read `"field": null` as "use the default" (e.g. `"n": null`, `"stream": null`)."""
        if isinstance(data, dict):
            strict = _non_nullable(cls)
            if any(v is None and k in strict for k, v in data.items()):
                return {k: v for k, v in data.items() if v is not None or k not in strict}
        return data


@cache
def _non_nullable(cls: type) -> frozenset[str]:
    """Fields whose type has no None but that have a default: null there means that default."""
    return frozenset(name for name, f in cls.model_fields.items()
                     if not f.is_required() and not _allows_none(f.annotation))


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class JsonSchemaFormat(_Base):
    """OpenAI's response_format.json_schema (`schema` is a BaseModel attribute, hence the alias)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Base):
    """vLLM's `structured_outputs` extra body (`json` is a BaseModel attribute, hence the alias)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True  # compact JSON; false allows any whitespace (vLLM's default)


class _SamplingFields(_Base):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured outputs, under OpenAI's and vLLM's (current and older) names; see server/constraints.py.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: there is one backend (xgrammar)
    guided_whitespace_pattern: str | None = None  # accepted and ignored


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Base):
    type: str
    text: str | None = None


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # refused unless --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(_Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]


MAX_JSON_DEPTH = 200  # pydantic-core's (jiter's) own limit; the router refuses deeper bodies the same way
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse(cls: type[_Base], body: bytes) -> Any:
    """Validate a raw JSON body; any problem becomes an InvalidRequestError naming the field.

    The fast path is pydantic's own JSON parser. It refuses two things RFC 8259 allows: a
    byte-order mark before the value and escaped lone surrogates ("\\ud800"); for those the
    body is parsed again by the stdlib (lone surrogates become U+FFFD, which every tokenizer
    can encode). Nesting deeper than MAX_JSON_DEPTH is a 400 either way.
    """
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        errs = e.errors(include_url=False, include_input=False)
        if not (errs and errs[0]["type"] == "json_invalid"):
            raise validation_error(e) from None
        if "recursion limit" in errs[0]["msg"]:
            raise too_deep() from None
        data = _stdlib_json(body)
        if data is None:
            raise validation_error(e) from None
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def too_deep() -> InvalidRequestError:
    return InvalidRequestError(f"the request body is not accepted: JSON nested deeper than {MAX_JSON_DEPTH} levels",
                               param=None)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _stdlib_json(body: bytes) -> Any:
    """The body per RFC 8259 via the stdlib (no NaN/Infinity), or None if it is not JSON."""
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):
            text = text[1:]
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise too_deep() from None
    except ValueError:  # also UnicodeDecodeError
        return None
    return _clean_surrogates(data, 0)


def _clean_surrogates(v: Any, depth: int) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise too_deep()
    if isinstance(v, str):
        return _SURROGATE.sub("\ufffd", v)
    if isinstance(v, list):
        return [_clean_surrogates(x, depth + 1) for x in v]
    if isinstance(v, dict):
        return {_SURROGATE.sub("\ufffd", k): _clean_surrogates(x, depth + 1) for k, x in v.items()}
    return v


def validation_error(e: ValidationError) -> InvalidRequestError:
    errs = e.errors(include_url=False, include_input=False)
    if errs and errs[0]["type"] == "json_invalid":
        return InvalidRequestError(f"the request body is not valid JSON: {errs[0]['msg']}", param=None)
    parts, first_param = [], None
    seen = set()
    for err in errs:
        # Union members each report an error; the first one per field is enough.
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x in _UNION_TAGS))]
        field = ".".join(loc) or "body"
        if field in seen:
            continue
        seen.add(field)
        first_param = first_param or field
        parts.append(f"{field}: {err['msg']}")
        if len(parts) == 3:
            break
    return InvalidRequestError("; ".join(parts) or "invalid request", param=first_param)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "ContentPart", "StreamOptions"}
