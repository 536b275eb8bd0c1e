"""A request's output constraint, from whichever name the client used, checked before the engine.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` extra body, and
the older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` all become one
`StructuredOutputsParams`. At most one may be given. The constraint is turned into a grammar here
(no tokenizer needed, milliseconds; a small cache answers repeated schemas at once), so a bad
schema, an unsupported feature or a bad regex is a 400 naming the field the client sent, before
a streaming response starts; the engine then only compiles it against the vocabulary.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict

from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured import limits
from pagedserve.structured.grammar import cache_key, validate

_CHECKED: OrderedDict[tuple, InvalidRequestError | None] = OrderedDict()  # constraint -> its verdict
_CHECKED_MAX = 256


def constraint_from_request(req) -> tuple[StructuredOutputsParams, str] | None:
    """(constraint, the request field that gave it) or None; two constraints at once are a 400."""
    found: list[tuple[StructuredOutputsParams, str]] = []
    rf = req.response_format
    if rf is not None:
        if rf.type == "json_object":
            found.append((StructuredOutputsParams(json_object=True), "response_format"))
        elif rf.type == "json_schema":
            js = rf.json_schema
            if js is None or js.schema_ is None:
                raise InvalidRequestError("response_format: type 'json_schema' needs json_schema.schema",
                                          param="response_format.json_schema.schema")
            found.append((StructuredOutputsParams(json=js.schema_), "response_format.json_schema.schema"))
        elif rf.type != "text":
            raise InvalidRequestError(f"response_format: type {rf.type!r} is not supported (use 'text', "
                                      f"'json_object' or 'json_schema')", param="response_format.type")
    so = req.structured_outputs
    if so is not None:
        given = [k for k in ("json_", "regex", "choice", "grammar") if getattr(so, k) is not None]
        given += ["json_object"] if so.json_object else []
        if len(given) != 1:
            raise InvalidRequestError("structured_outputs: give exactly one of json, regex, choice, grammar or "
                                      "json_object", param="structured_outputs")
        name = given[0].rstrip("_")
        found.append((StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                              json_object=so.json_object or None,
                                              disable_any_whitespace=so.disable_any_whitespace),
                      f"structured_outputs.{name}"))
    for name in ("json", "regex", "choice", "grammar"):
        v = getattr(req, f"guided_{name}")
        if v is not None:
            found.append((StructuredOutputsParams(**{name: v}), f"guided_{name}"))
    if len(found) > 1:
        raise InvalidRequestError(f"only one output constraint may be given, got {', '.join(p for _, p in found)}",
                                  param=found[1][1])
    return found[0] if found else None


async def check_constraint(so: StructuredOutputsParams, param: str) -> None:
    """400 naming `param` when the constraint is over the size limits or does not compile; repeated
    constraints are answered from a cache."""
    with limits.guard(param):
        limits.check_constraint(so, param)
        key = (cache_key(so), param)
    if key in _CHECKED:
        _CHECKED.move_to_end(key)
        err = _CHECKED[key]
    else:
        try:
            with limits.guard(param):
                await asyncio.to_thread(validate, so, param)
            err = None
        except InvalidRequestError as e:
            err = e
        _CHECKED[key] = err
        if len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)
    if err is not None:
        raise InvalidRequestError(err.message, param=err.param)
