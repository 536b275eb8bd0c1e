"""Hostile structured-output and tool requests for benchmarks/fuzz_soak.py --structured.

`structured_case(rng, model)` puts a hostile or a valid value into one of the fields on that
surface: `response_format`, `structured_outputs.*`, `guided_*`, tool `parameters` (chat with
"required"/named choices, and /tokenize), and history tool-call arguments. Hostile values are
nested, self-referencing, wrong-typed, huge, or grammars that compile slowly or never. Valid
cases must be answered 200; the rest must be 4xx (check_response in fuzz_cases.py).
`expensive_schema(i)` is a unique schema that takes about a second to compile (the flood).
"""
from __future__ import annotations

import json
import random

from tests.fuzz_cases import ApiCase

_VALID_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}}, "required": ["a"]},
    {"type": "string", "enum": ["red", "green"]},
]
_ASK = [{"role": "user", "content": "Answer."}]


def _nest(rng: random.Random, depth: int) -> object:
    v: object = rng.choice([{"type": "string"}, "s", 1, None, {}, []])
    for _ in range(depth):
        v = rng.choice([lambda x: [x], lambda x: {"items": x, "type": "array"},
                        lambda x: {"type": "object", "properties": {"p": x}}, lambda x: {"anyOf": [x]},
                        lambda x: {"$defs": {"d": x}, "$ref": "#/$defs/d"}])(v)
    return v


def doubling_grammar(n: int) -> str:
    """Rule i refers to rule i+1 twice: small n compiles at once, n in the hundreds never finishes."""
    return "root ::= r0\n" + "\n".join(f'r{i} ::= r{i + 1} r{i + 1} | "x"' for i in range(n)) + f'\nr{n} ::= "x"'


def hostile_value(rng: random.Random) -> object:
    pick = rng.randrange(12)
    if pick == 0:
        return _nest(rng, rng.choice([10, 40, 70, 100, 200, 400]))
    if pick == 1:
        return {"type": "string", "enum": [f"{rng.random():.6f}" * rng.choice([1, 20, 160])
                                           for _ in range(rng.choice([10, 500, 5000, 100_000]))]}
    if pick == 2:
        return rng.choice([{"$ref": "#"}, {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
                           {"$ref": "#/nowhere"}, {"$ref": 5}])
    if pick == 3:
        key = rng.choice(["$defs", "definitions", "properties", "patternProperties", "items", "anyOf", "required"])
        return {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
                key: rng.choice([[1, 2], "x", 5, None, [[]], {"a": 3}])}
    if pick == 4:
        return rng.choice(["[" * 100_000, "{" * 3000, "(" * 5000, "x" * rng.choice([1000, 200_000]), "", " "])
    if pick == 5:
        return rng.choice([5, None, True, 1e308, [], [None], [["a"]], {"type": 5}, {"type": "nope"}])
    if pick == 6:
        return doubling_grammar(rng.choice([5, 20, 200, 1500]))
    if pick == 7:
        return rng.choice(["root ::= root", "root ::= r\nr ::= r r", "root ::= " + " | ".join(['"a"'] * 20_000),
                           'root ::= "a"*' * 3, "root ::= [^]"])
    if pick == 8:
        return rng.choice(["(a|aa)*b", "[" * 50, "a{1000000}", "(?<=x)a", "\\", "a**"])
    if pick == 9:
        return {"type": "object", "properties": {f"p{i}": {"type": "string", "pattern": "[a-z]{1,40}"}
                                                 for i in range(rng.choice([10, 300, 3000]))}}
    if pick == 10:
        return {"type": "string", "pattern": rng.choice(["(", "[z-a]", "\\p{Nope}", "a{99999}"])}
    return rng.choice(_VALID_SCHEMAS)


def structured_case(rng: random.Random, model: str) -> ApiCase:
    valid = rng.random() < 0.25
    v = rng.choice(_VALID_SCHEMAS) if valid else hostile_value(rng)
    where = rng.randrange(13)
    chat, body = True, {}
    if where == 0:
        body = {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": v}}}
    elif where in (1, 2, 3, 4):
        field = ["json", "regex", "choice", "grammar"][where - 1]
        if valid:
            v = {"json": v, "regex": "[a-z]{1,5}", "choice": ["yes", "no"], "grammar": 'root ::= "a" | "b"'}[field]
        chat, body = rng.random() < 0.5, {"structured_outputs": {field: v}}
    elif where in (5, 6, 7, 8):
        field = ["json", "regex", "choice", "grammar"][where - 5]
        if valid:
            v = {"json": v, "regex": "[0-9]{1,3}", "choice": ["a", "b"], "grammar": 'root ::= "x"+'}[field]
        chat, body = False, {f"guided_{field}": v}
    elif where in (9, 10):
        if valid and not (isinstance(v, dict) and v.get("type") == "object"):
            v = _VALID_SCHEMAS[0]
        tool = {"type": "function", "function": {"name": "f", "parameters": v}}
        choice = "required" if where == 9 else {"type": "function", "function": {"name": "f"}}
        body = {"tools": [tool], "tool_choice": choice}
    elif where == 11:
        body = {"tools": [{"type": "function", "function": {"name": "f", "parameters": v}}]}
        return ApiCase("/tokenize", json.dumps({"model": model, "messages": _ASK, **body}).encode(), [], False)
    else:
        args = json.dumps({"a": 1}) if valid else (v if isinstance(v, str) else json.dumps(v))
        body = {"messages": _ASK + [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]}
    base = {"model": model, "max_tokens": rng.choice([2, 4]), "temperature": 0}
    base.update({"messages": _ASK} if chat else {"prompt": "Answer:"})
    base.update(body)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    # `valid` cases carry only what must be accepted; /tokenize and hostile ones only must not 5xx
    return ApiCase(path, json.dumps(base, allow_nan=True).encode(), [] if valid else ["structured"], valid)


def expensive_schema(i: int) -> dict:
    """A unique ~100 KB enum: about a second of compile on a 49k vocabulary, tens of MB compiled."""
    return {"type": "string", "enum": [f"{i}-{j}-" + "abcdefghij" * 90 for j in range(100)]}
