"""Size limits for every schema, grammar and JSON value a client sends on the structured/tool surface.

One gate for `response_format`, `structured_outputs`, `guided_*`, tool `parameters` and the
arguments of history tool calls (on /v1/chat/completions and /tokenize alike). The walk is
iterative, so no input can raise RecursionError here, and it runs before anything recursive
(jsonschema, json.dumps, xgrammar, a chat template) sees the value. `guard` turns whatever a
later check still throws into a 400 naming the field, so a body can never cause a 500.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

from pagedserve.errors import InvalidRequestError, PagedServeError

MAX_DEPTH = 64  # nesting of JSON arrays/objects (a schema level is usually two: "properties" -> name)
MAX_NODES = 20_000  # JSON values in one schema, choice list or arguments value
MAX_BYTES = 128 << 10  # characters of one schema / regex / grammar / arguments text (key and string lengths)

_NAME_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_MUST_BE_OBJECTS = ("properties", "$defs", "definitions", "patternProperties")
_DATA = ("enum", "const", "default", "examples")  # JSON values inside a schema, not schemas
_SCHEMA, _NAMES, _PLAIN = 0, 1, 2


def _fail(param: str, msg: str) -> None:
    raise InvalidRequestError(f"{param}: {msg}", param=param)


def check_text(text: str, param: str, what: str = "text") -> None:
    """A regex, grammar or JSON text: at most MAX_BYTES characters."""
    if len(text) > MAX_BYTES:
        _fail(param, f"the {what} has {len(text):,} characters; the limit is {MAX_BYTES:,}")


def check_value(value: Any, param: str, schema: bool = False) -> None:
    """Bound a decoded JSON value's depth, node count and size; with `schema`, also require that
    `properties`/`$defs`/`definitions`/`patternProperties` are objects wherever they are keywords."""
    size = nodes = 0
    # (node, depth, role): role is _SCHEMA (keys are keywords), _NAMES (keys are names) or _PLAIN (data)
    stack: list[tuple[Any, int, int]] = [(value, 1, _SCHEMA if schema else _PLAIN)]
    while stack:
        node, depth, role = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            _fail(param, f"more than {MAX_NODES:,} JSON values; simplify it")
        if isinstance(node, str):
            size += len(node) + 2
        elif isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                _fail(param, f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(node, list):
                size += len(node) + 1
                sub = _SCHEMA if role == _SCHEMA else _PLAIN  # items, anyOf, ... hold schemas
                stack.extend((v, depth + 1, sub) for v in node)
                continue
            size += 2
            for k, v in node.items():
                if not isinstance(k, str):
                    _fail(param, "object keys must be strings")
                size += len(k) + 4
                sub = _PLAIN if role == _PLAIN else _SCHEMA
                if role == _SCHEMA:
                    if k in _MUST_BE_OBJECTS and not isinstance(v, dict):
                        _fail(param, f"{k!r} must be an object, got {type(v).__name__}")
                    sub = _PLAIN if k in _DATA else _NAMES if k in _NAME_MAPS else _SCHEMA
                stack.append((v, depth + 1, sub))
        else:
            size += 4  # a number, true, false or null
        if size > MAX_BYTES:
            _fail(param, f"larger than {MAX_BYTES:,} characters; the limit applies to every schema")


def load_json(text: str, param: str, schema: bool = False) -> Any:
    """Decode a client's JSON text within the limits (a 400 naming `param` for anything else)."""
    check_text(text, param, "JSON text")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        detail = f"nested deeper than {MAX_DEPTH} levels" if isinstance(e, RecursionError) else f"not valid JSON: {e}"
        raise InvalidRequestError(f"{param}: {detail}", param=param) from None
    check_value(value, param, schema)
    return value


def check_constraint(so, param: str) -> None:
    """Bound one StructuredOutputsParams (whichever field is set) before it is keyed, checked or compiled."""
    if so.json is not None:
        if isinstance(so.json, str):
            load_json(so.json, param, schema=True)  # decoded again by the grammar builder
        else:
            check_value(so.json, param, schema=True)
    for name in ("regex", "grammar"):
        text = getattr(so, name)
        if text is not None:
            if not isinstance(text, str):
                _fail(param, f"the {name} must be a string, got {type(text).__name__}")
            check_text(text, param, name)
    if so.choice is not None:
        if not isinstance(so.choice, (list, tuple)) or not all(isinstance(c, str) for c in so.choice):
            _fail(param, "must be a list of strings")
        check_value(list(so.choice), param)


@contextlib.contextmanager
def guard(param: str) -> Iterator[None]:
    """Any exception but our own errors becomes a 400 naming `param`: client input never yields a 500."""
    try:
        yield
    except PagedServeError:
        raise
    except RecursionError:
        raise InvalidRequestError(f"{param}: nested too deeply to check (limit {MAX_DEPTH} levels)",
                                  param=param) from None
    except Exception as e:  # noqa: BLE001 - whatever a library throws on odd input is the input's fault
        raise InvalidRequestError(f"{param}: cannot be checked ({type(e).__name__}: {e})", param=param) from None
