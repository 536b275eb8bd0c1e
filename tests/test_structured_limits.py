"""The one validator every client schema goes through (pagedserve/structured/limits.py), in process:
hostile tool parameters, `$defs` of the wrong type, history tool-call arguments, and a fuzz of every
structured/tool field with nested, self-referencing, wrong-typed and huge values. Each must be an
InvalidRequestError (a 400 naming a field), never any other exception (a 500)."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.server.constraints import check_constraint
from pagedserve.server.tool_calling import ToolOptions, plan_tools
from pagedserve.server.tool_prompt import history_tool_calls
from pagedserve.structured import limits


def nest_arrays(n: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(n):
        s = {"type": "array", "items": s}
    return {"type": "object", "properties": {"a": s}}


def nest_objects(n: int) -> dict:
    s: dict = {"type": "string"}
    for _ in range(n):
        s = {"type": "object", "properties": {"x": s}}
    return s


def tool(params, name: str = "f") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": params}}


def plan_and_check(tools, choice):
    """What /v1/chat/completions does with a request's tools: plan them, then build the constraint."""
    plan = plan_tools(tools, choice, None, ToolOptions())
    if plan is not None and plan.constrained:
        asyncio.run(plan.checked_constraint())
    return plan


NAMED = {"type": "function", "function": {"name": "f"}}
DRAFT4 = "http://json-schema.org/draft-04/schema#"


@pytest.mark.parametrize("params,choice", [(nest_arrays(190), "required"), (nest_arrays(190), NAMED),
                                           (nest_objects(97), NAMED), (nest_objects(97), "none")],
                         ids=["arrays-required", "arrays-named", "objects-named", "objects-tokenize"])
def test_deep_tool_parameters_are_400(params, choice):
    """Row 1: deep parameters raised RecursionError in jsonschema (a 500); /tokenize plans with 'none'."""
    with pytest.raises(InvalidRequestError) as e:
        plan_and_check([tool(params)], choice)
    assert e.value.param == "tools.0.function.parameters" and "deeper than" in e.value.message


@pytest.mark.parametrize("defs", [[1, 2], "x", 5])
def test_defs_of_the_wrong_type_are_400(defs):
    """Row 2: draft-04 does not check `$defs`, and _hoist called .items() on a list (a 500)."""
    params = {"$schema": DRAFT4, "type": "object", "$defs": defs}
    with pytest.raises(InvalidRequestError) as e:
        plan_and_check([tool(params)], "required")
    assert e.value.param == "tools.0.function.parameters" and "'$defs' must be an object" in e.value.message


def test_history_arguments_nested_too_deep_are_400():
    """Row 3: json.loads("[" * 100000) raised RecursionError (a 500)."""
    for args in ("[" * 100_000, "[" * 100 + "]" * 100, json.dumps(nest_objects(40))):
        with pytest.raises(InvalidRequestError) as e:
            history_tool_calls([{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}], 1)
        assert e.value.param == "messages.1.tool_calls.0" and "0.function.arguments: " in e.value.message
    ok = history_tool_calls([{"function": {"name": "f", "arguments": '{"a": [1, {"b": 2}]}'}}], 1)
    assert ok[0]["function"]["arguments"] == {"a": [1, {"b": 2}]}


def test_limits_bound_depth_nodes_and_size():
    limits.check_value(nest_objects(30), "p", schema=True)  # 61 levels: within the limit
    for value, words in [(nest_objects(40), "deeper than"), (list(range(limits.MAX_NODES + 1)), "JSON values"),
                         (["x" * 1000] * 200, "larger than"), ({"enum": ["y" * (limits.MAX_BYTES + 1)]}, "larger")]:
        with pytest.raises(InvalidRequestError, match=words):
            limits.check_value(value, "p", schema=True)
    # names under `properties` are names, and enum values are data: neither is checked as a schema
    limits.check_value({"properties": {"properties": {"type": "string"}}, "enum": [{"$defs": 1}]}, "p", schema=True)


def _huge_enum(n: int, width: int) -> dict:
    return {"type": "string", "enum": [f"{i:0{width}d}" for i in range(n)]}


def _constraints(value) -> list[tuple[StructuredOutputsParams, str]]:
    return [(StructuredOutputsParams(json=value), "response_format.json_schema.schema"),
            (StructuredOutputsParams(json=json.dumps(value) if not isinstance(value, str) else value), "guided_json"),
            (StructuredOutputsParams(choice=value), "guided_choice"),
            (StructuredOutputsParams(regex=value), "structured_outputs.regex"),
            (StructuredOutputsParams(grammar=value), "guided_grammar")]


def hostile_values(rng: random.Random) -> list:
    """Nested, self-referencing, wrong-typed and huge values."""
    vals = [nest_arrays(190), nest_objects(97), {"$ref": "#"},
            {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}},
            {"type": "object", "$defs": [1]}, {"definitions": "x"}, {"properties": [1, 2]}, {"type": 5},
            {"anyOf": "x"}, {"items": [[[[]]]]}, _huge_enum(100_000, 6), _huge_enum(2_000, 1000), "[" * 100_000,
            "{" * 5000, "x" * 200_000, 5, None, True, [], [None], [["a"]], {"enum": []}, {"required": 7},
            {"pattern": "(" * 5000}, "(" * 5000, "root ::= root", "root ::= " + " | ".join(['"a"'] * 30_000),
            {"minLength": -1, "type": "string"}, {"type": "integer", "minimum": 1e400}, {"$schema": DRAFT4, "$defs": 3}]
    for _ in range(30):  # random deep mixtures
        v: object = rng.choice(["s", 1, None, {}, []])
        for _ in range(rng.randrange(1, 150)):
            v = rng.choice([lambda x: [x], lambda x: {"items": x}, lambda x: {"properties": {"p": x}},
                            lambda x: {"anyOf": [x, {"type": "null"}]},
                            lambda x: {"$defs": {"d": x}, "$ref": "#/$defs/d"}])(v)
        vals.append(v)
    return vals


def test_fuzz_every_field_gets_400_or_passes():
    """Each hostile value through every constraint field and as tool parameters / history arguments:
    the only exception allowed is InvalidRequestError (a 400 with `param`)."""
    rng = random.Random(28)
    outcomes = {"400": 0, "ok": 0}
    for value in hostile_values(rng):
        attempts = [lambda so=so, p=p: asyncio.run(check_constraint(so, p)) for so, p in _constraints(value)]
        attempts += [lambda: plan_and_check([tool(value)], "required"), lambda: plan_and_check([tool(value)], NAMED),
                     lambda: plan_and_check([tool(value)], "none"),
                     lambda: history_tool_calls([{"function": {"name": "f", "arguments": value}}], 0)]
        if not isinstance(value, str):
            text = json.dumps(value)
            attempts.append(lambda: history_tool_calls([{"function": {"name": "f", "arguments": text}}], 0))
        for attempt in attempts:
            try:
                attempt()
                outcomes["ok"] += 1
            except InvalidRequestError as e:
                assert e.param, e
                outcomes["400"] += 1
    assert outcomes["400"] > outcomes["ok"] > 0, outcomes
