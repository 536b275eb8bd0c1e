"""One output constraint -> an xgrammar grammar: cache key, validation, compilation.

Library choice (measured here, default model's tokenizer, vocab 49,152, 2-core CPU; see
benchmarks/results/structured_output_cpu.json, key "library_comparison"):

    xgrammar 0.2.9:   tokenizer info 0.18 s; compile 6-18 ms per schema (small, nested, 40 fields);
                      next-token mask median 2.4 us, max 77 us; applying 32 rows' masks 39 us (CPU kernel)
    llguidance 1.9.1: tokenizer info 0.54 s; compile + first mask 2-7 ms;
                      next-token mask median 61 us, max 281 us

llguidance compiles faster, but compilation is off the step loop and cached, while the mask is
computed for every constrained row of every step: xgrammar's is ~25x cheaper, it is what vLLM
and SGLang use, and its compiler releases the GIL (the step loop keeps running while a 5 s
schema compiles). We keep xgrammar.

Validation (no tokenizer needed) runs where the request arrives, so a bad constraint is a 400
naming the field before anything reaches the engine. xgrammar ignores a few JSON Schema
keywords it cannot express; those are refused by name instead of producing output that does
not validate.
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
# Whitespace runs inside JSON are capped: a small model can otherwise fill max_tokens with spaces.
MAX_WHITESPACE = 16

_NAME_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_DATA = ("enum", "const", "default", "examples")  # JSON values, not schemas

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
            return xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=not so.disable_any_whitespace,
                                                max_whitespace_cnt=MAX_WHITESPACE, strict_mode=True)
        if kind == "regex":
            if not isinstance(so.regex, str) or not so.regex:
                _fail(field, "must be a non-empty string")
            return xgr.Grammar.from_regex(so.regex)
        if kind == "choice":
            if (not isinstance(so.choice, (list, tuple)) or not so.choice
                    or not all(isinstance(c, str) and c for c in so.choice)):
                _fail(field, "must be a non-empty list of non-empty strings")
            # json.dumps quotes and escapes each alternative as an EBNF string literal.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in so.choice))
        if kind == "grammar":
            if not isinstance(so.grammar, str) or not so.grammar.strip():
                _fail(field, "must be a non-empty EBNF grammar")
            return xgr.Grammar.from_ebnf(so.grammar)
        # json_object: any JSON object (the built-in JSON grammar would also allow arrays and scalars).
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=not so.disable_any_whitespace,
                                            max_whitespace_cnt=MAX_WHITESPACE, strict_mode=False)
    except InvalidRequestError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError with "<file>:<line>: message"
        raise InvalidRequestError(f"{field}: cannot compile the {kind} constraint: {_clean(e)}", param=field) from None


def _clean(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # Drop xgrammar's "[hh:mm:ss] /project/cpp/file.cc:123: " prefix.
    if ".cc:" in msg:
        msg = msg.split(".cc:", 1)[1].split(":", 1)[-1].strip()
    return msg


def validate(so: StructuredOutputsParams, param: str = "structured_outputs") -> None:
    """Check a constraint compiles to a grammar (no tokenizer needed; milliseconds)."""
    build_grammar(so, param)
