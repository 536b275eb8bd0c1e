"""One output constraint -> an xgrammar grammar: cache key, validation, compilation.

Library choice (measured on the default model's tokenizer, vocab 49,152, a shared 2-core CPU;
benchmarks/structured_output.py, key "library_comparison" of benchmarks/results/structured_output_cpu.json):

                      tokenizer info   compile: 3-field nested / 40 fields   next-token mask (median / max)
    xgrammar 0.2.9    0.2-1.2 s        6-33 ms / 18-680 ms                  2.3-4 us / 29-77 us
    llguidance 1.9.1  0.5-2.6 s        2-19 ms / 7-21 ms (+ first mask)     41-68 us / 0.3-16 ms

(ranges: runs at different machine loads). llguidance compiles faster (it builds masks lazily),
but compilation is off the step loop and cached, while a mask is computed for every constrained
row of every step: xgrammar's is 15-25x cheaper, with no multi-millisecond outliers. It is also
what vLLM and SGLang use, its compiler releases the GIL, and it ships a CPU bitmask kernel. We keep
xgrammar.

Validation (no tokenizer needed) runs where the request arrives, so a bad constraint is a 400
naming the field before anything reaches the engine. xgrammar ignores a few JSON Schema
keywords it cannot express; those are refused by name instead of producing output that does
not validate.

JSON grammars are built so that a small greedy model reaches the end of its JSON:
- compact by default (xgrammar's `any_whitespace=False`: separators ", " and ": ", no other
  whitespace between tokens), since with any whitespace allowed a model may emit newlines until
  max_tokens; `disable_any_whitespace=False` opts back in. xgrammar's whitespace cap
  (`max_whitespace_cnt`) is not used: it made masks 3-5x slower (benchmarks/structured_output.py);
- numbers with no bound on a side get one (`bound_numbers`), which xgrammar turns into a digit
  count: at most 15 integer digits (and 6 decimals, xgrammar's range grammar) instead of
  `11122000000000000000...` until max_tokens. Explicit bounds are kept as given.
"""
from __future__ import annotations

import json
from typing import Any

from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import StructuredOutputsParams

# JSON Schema keywords xgrammar would silently ignore (the output would not validate) or that a
# context-free grammar cannot express in general.
UNSUPPORTED_KEYWORDS = ("uniqueItems", "contains", "minContains", "maxContains", "dependentRequired",
                        "dependentSchemas", "not", "if", "then", "else")

_NAME_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_DATA = ("enum", "const", "default", "examples")  # JSON values, not schemas

NUMBER_LIMIT = 10**15 - 1  # the bound given to a number schema side that has none: 15 digits
# json_object: any JSON object whose numbers are bounded like a schema's (the built-in JSON grammar's are not).
_ANY = {"anyOf": [{"type": "string"}, {"type": "number", "minimum": -NUMBER_LIMIT, "maximum": NUMBER_LIMIT},
                  {"type": "boolean"}, {"type": "null"}, {"type": "array", "items": {"$ref": "#/$defs/any"}},
                  {"type": "object", "additionalProperties": {"$ref": "#/$defs/any"}}]}
JSON_OBJECT_SCHEMA = {"$defs": {"any": _ANY}, "type": "object", "additionalProperties": {"$ref": "#/$defs/any"}}

Key = tuple


def kind_of(so: StructuredOutputsParams) -> str:
    """The one field that is set ('json', 'regex', 'choice', 'grammar' or 'json_object')."""
    set_ = [k for k in ("json", "regex", "choice", "grammar") if getattr(so, k) is not None]
    if so.json_object:
        set_.append("json_object")
    if len(set_) != 1:
        raise InvalidRequestError(
            "structured_outputs: give exactly one of json, regex, choice, grammar or json_object"
            + (f" (got {', '.join(set_)})" if set_ else " (got none)"), param="structured_outputs")
    return set_[0]


def cache_key(so: StructuredOutputsParams) -> Key:
    kind = kind_of(so)
    if kind == "json":
        schema = so.json
        text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=True)
        return ("json", text, so.disable_any_whitespace)
    if kind == "choice":
        return ("choice", tuple(so.choice))
    if kind == "json_object":
        return ("json_object", so.disable_any_whitespace)
    return (kind, getattr(so, kind))


def _fail(param: str, msg: str) -> None:
    raise InvalidRequestError(f"{param}: {msg}", param=param)


def _load_schema(schema: Any, param: str) -> dict:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            _fail(param, f"the JSON schema is not valid JSON: {e}")
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        _fail(param, f"the JSON schema must be an object, got {type(schema).__name__}")
    return schema


def _check_schema(schema: dict, param: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        _fail(param, f"invalid JSON schema at {where}: {e.message}")
    stack: list[tuple[Any, str]] = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            names = path.rsplit("/", 1)[-1] in _NAME_MAPS  # keys are names ("not" may be a property)
            for k, v in node.items():
                if not names and k in UNSUPPORTED_KEYWORDS:
                    _fail(param, f"the JSON schema keyword {k!r} (at {path or '/'}) is not supported by "
                                 f"structured outputs (xgrammar cannot enforce it)")
                if names or k not in _DATA:
                    stack.append((v, f"{path}/{k}"))
        elif isinstance(node, list):
            stack.extend((v, f"{path}/{i}") for i, v in enumerate(node))


def build_grammar(so: StructuredOutputsParams, param: str = "structured_outputs"):
    """The xgrammar Grammar for a constraint.

    Raises InvalidRequestError naming `param` (plus the field) for anything that cannot compile.
    """
    import xgrammar as xgr

    kind = kind_of(so)
    field = param if param != "structured_outputs" else f"structured_outputs.{kind}"
    try:
        if kind == "json":
            schema = _load_schema(so.json, field)
            _check_schema(schema, field)
            return xgr.Grammar.from_json_schema(json.dumps(bound_numbers(schema)),
                                                any_whitespace=not so.disable_any_whitespace, strict_mode=True)
        if kind == "regex":
            if not isinstance(so.regex, str) or not so.regex:
                _fail(field, "must be a non-empty string")
            return xgr.Grammar.from_regex(so.regex)
        if kind == "choice":
            if (not isinstance(so.choice, (list, tuple)) or not so.choice
                    or not all(isinstance(c, str) and c for c in so.choice)):
                _fail(field, "must be a non-empty list of non-empty strings")
            # json.dumps quotes and escapes each alternative as an EBNF string literal; characters past
            # ASCII stay literal (as surrogate-pair escapes, an emoji would not match its own bytes).
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice)
            return xgr.Grammar.from_ebnf("root ::= " + alts)
        if kind == "grammar":
            if not isinstance(so.grammar, str) or not so.grammar.strip():
                _fail(field, "must be a non-empty EBNF grammar")
            return xgr.Grammar.from_ebnf(so.grammar)
        # json_object: any JSON object (the built-in JSON grammar would also allow arrays and scalars).
        return xgr.Grammar.from_json_schema(json.dumps(JSON_OBJECT_SCHEMA),
                                            any_whitespace=not so.disable_any_whitespace, strict_mode=False)
    except InvalidRequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError with "<file>:<line>: message"
        raise InvalidRequestError(f"{field}: cannot compile the {kind} constraint: {_clean(e)}", param=field) from None


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _add_bounds(node: dict) -> None:
    """Give a number/integer schema a bound on each side that has none (in place, on a copy)."""
    types = node.get("type")
    types = types if isinstance(types, list) else [types]
    if not ({"integer", "number"} & set(types)) or "enum" in node or "const" in node or "multipleOf" in node:
        return  # xgrammar drops multipleOf when a range is given: leave such schemas as they are
    lows = [node[k] for k in ("minimum", "exclusiveMinimum") if _numeric(node.get(k))]
    highs = [node[k] for k in ("maximum", "exclusiveMaximum") if _numeric(node.get(k))]
    if not lows and all(h >= -NUMBER_LIMIT for h in highs):
        node["minimum"] = -NUMBER_LIMIT
    if not highs and all(lo <= NUMBER_LIMIT for lo in lows):
        node["maximum"] = NUMBER_LIMIT


def bound_numbers(node: Any, names: bool = False) -> Any:
    """A copy of a JSON schema in which every number and integer is bounded on both sides, so its
    grammar has a digit limit (see the module docstring). `names`: `node` maps names to schemas."""
    if isinstance(node, list):
        return [bound_numbers(v) for v in node]
    if not isinstance(node, dict):
        return node
    if names:
        return {k: bound_numbers(v) for k, v in node.items()}
    out = {k: v if k in _DATA else bound_numbers(v, names=k in _NAME_MAPS) for k, v in node.items()}
    _add_bounds(out)
    return out


def _clean(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Drop xgrammar's "[hh:mm:ss] /project/cpp/file.cc:123: " prefix.
    if ".cc:" in msg:
        msg = msg.split(".cc:", 1)[1].split(":", 1)[-1].strip()
    return msg


def validate(so: StructuredOutputsParams, param: str = "structured_outputs") -> None:
    """Check a constraint compiles to a grammar (no tokenizer needed; milliseconds)."""
    build_grammar(so, param)
