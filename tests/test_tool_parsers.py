"""Tool calling without a server: the auto-mode parsers, the constrained-call stream parsers and
schemas, request checks, the response assembly and the chat-template side (CPU, < 2 s)."""
from __future__ import annotations

import json

import jsonschema
import pytest

from pagedserve.errors import ConfigError, InvalidRequestError
from pagedserve.server.constrained_calls import NamedCallParser, RequiredCallsParser, required_schema
from pagedserve.server.tool_calling import ToolOptions, ToolOutput, plan_tools
from pagedserve.server.tool_parsers import HermesToolParser, Llama3JsonToolParser, collect, extract

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"], "additionalProperties": False}}}


def streamed(parser_cls, text: str, step: int = 1):
    """Feed `text` in slices of `step` characters; what the client would assemble from the deltas."""
    p = parser_cls()
    pieces = []
    for i in range(0, len(text), step):
        pieces += p.feed(text[i:i + step])
    return collect(pieces + p.finish())


# -- hermes ----------------------------------------------------------------------------------------------
QWEN_TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
                  '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>')


@pytest.mark.parametrize("text,content,calls", [
    (QWEN_TWO_CALLS, None, [("get_weather", {"city": "Paris", "unit": "celsius"}), ("add", {"a": 2, "b": 3})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n',
     "Let me check.", [("get_weather", {"city": "Oslo"})]),
    # stopped at (or cut short before) the end tag: the last block still counts if its JSON is complete
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}', None, [("add", {"a": 1, "b": 1})]),
    # arguments already encoded as a string (some fine-tunes), "parameters" instead of "arguments", none at all
    ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>', None,
     [("add", {"a": 1, "b": 2})]),
    ('<tool_call>{"name": "add", "parameters": {"a": 5, "b": 6}}</tool_call>', None, [("add", {"a": 5, "b": 6})]),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", {})]),
    # braces, tags and unicode inside strings
    ('<tool_call>{"name": "echo", "arguments": {"s": "a}<tool_call>{é"}}</tool_call>', None,
     [("echo", {"s": "a}<tool_call>{é"})]),
    # plain text comes back exactly, whitespace and look-alike tags included
    ("  The answer is 4.\n", "  The answer is 4.\n", []),
    ("x < y and <tool_ is not a tag", "x < y and <tool_ is not a tag", []),
    ("ends with a partial tag <tool_ca", "ends with a partial tag <tool_ca", []),
])
def test_hermes(text, content, calls):
    for step in (len(text) or 1, 1, 3, 7):  # whole, and streamed at several split points
        got_content, got_calls = streamed(HermesToolParser, text, step)
        assert got_content == content
        assert [(n, json.loads(a)) for n, a in got_calls] == calls


@pytest.mark.parametrize("text", [
    "Sure! <tool_call>{not json}</tool_call> done",
    '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
    '<tool_call>["get_weather"]</tool_call>',
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "add", "arguments": {"a": 1, ',  # cut short
    "<tool_call>",
])
def test_hermes_malformed_is_content(text):
    """A block that is not a valid call is plain content, exactly as generated."""
    for step in (len(text), 1, 5):
        assert streamed(HermesToolParser, text, step) == (text, [])


def test_hermes_keeps_good_calls_next_to_a_bad_one():
    text = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{oops}</tool_call>'
    content, calls = extract(HermesToolParser(), text)
    assert calls == [("add", '{"a": 1, "b": 2}')]
    assert content == "<tool_call>{oops}</tool_call>"


def test_hermes_streams_content_before_the_call_at_once():
    p = HermesToolParser()
    assert p.feed("Checking the weather") == [("content", "Checking the weather")]
    assert p.feed(" now <tool") == [("content", " now")]  # a possible tag and the space before it wait
    assert p.feed('_call>{"name": "get_weather", "arguments": {"city": "Rome"}}') == []
    pieces = p.feed("</tool_call>")
    assert pieces == [("start", 0, "get_weather"), ("args", 0, '{"city": "Rome"}')]
    assert p.finish() == []


# -- llama3_json -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,content,calls", [
    ('{"name": "get_weather", "parameters": {"city": "Lima"}}', None, [("get_weather", {"city": "Lima"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "parameters": {"a": 3, "b": 4}}',
     None, [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]),
    ('  {"name": "add", "arguments": {"a": 1, "b": 2}}\n', None, [("add", {"a": 1, "b": 2})]),
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
    ('{"answer": 42}', '{"answer": 42}', []),  # JSON, but not a call
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),  # cut short
    ("{not json at all}", "{not json at all}", []),
])
def test_llama3_json(text, content, calls):
    for step in (len(text), 1, 4):
        got_content, got_calls = streamed(Llama3JsonToolParser, text, step)
        assert got_content == content
        assert [(n, json.loads(a)) for n, a in got_calls] == calls


# -- constrained: required and named -----------------------------------------------------------------
def _required_outputs():
    calls = [{"name": "get_weather", "parameters": {"city": 'New "York" }{', "unit": "celsius"}},
             {"name": "add", "parameters": {"a": -1, "b": 20}}]
    yield json.dumps(calls, separators=(",", ":")), calls
    yield json.dumps(calls, indent=2), calls
    yield json.dumps(calls[1:]), calls[1:]
    # parameters before the name: the arguments wait for it
    yield '[{"parameters": {"a": 1, "b": 2}, "name": "add"}]', [{"name": "add", "parameters": {"a": 1, "b": 2}}]


@pytest.mark.parametrize("text,calls", list(_required_outputs()))
def test_required_parser(text, calls):
    for step in (len(text), 1, 6):
        content, got = streamed(RequiredCallsParser, text, step)
        assert content is None
        assert [(n, json.loads(a)) for n, a in got] == [(c["name"], c["parameters"]) for c in calls]


def test_required_parser_streams_arguments_as_generated():
    p = RequiredCallsParser()
    assert p.feed('[{"name":"add",') == [("start", 0, "add")]
    assert p.feed('"parameters":{"a":1') == [("args", 0, '{"a":1')]
    assert p.feed(',"b":2}}') == [("args", 0, ',"b":2}')]
    assert p.feed("]") == [] and p.finish() == []


def test_required_parser_cut_before_a_name_is_nothing():
    """A call array cut before any name holds no call, and its JSON prefix is not content either."""
    for step in (1, 3, 100):
        assert streamed(RequiredCallsParser, '[{"na', step) == ("", [])


ADD_23 = '{"name": "add", "parameters": {"a": 2, "b": 3}}'
ADD_24 = '{"name": "add", "parameters": {"a": 2, "b": 4}}'
WEATHER_OSLO = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'


@pytest.mark.parametrize("text,calls", [
    (f"[{ADD_23}, {ADD_23}]", [ADD_23]),
    (f"[{ADD_23}, {WEATHER_OSLO}, {ADD_23}]", [ADD_23, WEATHER_OSLO]),
    (f"[{ADD_23}, {ADD_24}, {ADD_23}, {ADD_24}]", [ADD_23, ADD_24]),
    (f"[{ADD_23}, {ADD_23[:-3]}", [ADD_23]),  # cut inside a repeat
])
def test_required_parser_drops_repeated_calls(text, calls):
    """An item identical to an earlier one is no call, streamed or not (the engine ends the array there)."""
    want = [(json.loads(c)["name"], json.loads(c)["parameters"]) for c in calls]
    for step in (len(text), 1, 5):
        content, got = streamed(RequiredCallsParser, text, step)
        assert content is None and [(n, json.loads(a)) for n, a in got] == want


def test_required_parser_holds_a_call_only_while_it_may_be_a_repeat():
    p = RequiredCallsParser()
    first = p.feed(f"[{ADD_23}, ")
    assert [x[0] for x in first] == ["start", "args"]
    held = p.feed('{"name": "add", "parameters": {"a": 2, "b": ')  # so far the same text as call 0
    assert held == []
    assert p.feed("4") == [("start", 1, "add"), ("args", 1, '{"a": 2, "b": 4')]  # differs: released at once
    assert p.feed("}}]") == [("args", 1, "}")] and p.finish() == []


def test_named_parser():
    p = NamedCallParser("add")
    pieces = p.feed(' {"a": 1,') + p.feed(' "b": 2}\n') + p.finish()
    assert collect(pieces) == (None, [("add", '{"a": 1, "b": 2}')])


def test_required_schema_accepts_exactly_the_tool_calls():
    fns = [WEATHER["function"], ADD["function"]]
    schema = required_schema(fns)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "add", "parameters": {"a": 1, "b": 2}}]
    jsonschema.validate(ok, schema)
    for bad in ([], [{"name": "add", "parameters": {"a": 1}}], [{"name": "nope", "parameters": {}}],
                [{"name": "get_weather", "parameters": {"city": 5}}], [{"name": "add"}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = required_schema(fns, parallel=False)
    jsonschema.validate(ok[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok, single)


def test_required_schema_moves_defs_to_the_root():
    """Pydantic-made parameter schemas refer to `#/$defs/...`; nested in the array they must still resolve."""
    point = {"name": "plot", "parameters": {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
        "type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "required": ["p"]}}
    other = {"name": "other", "parameters": {"$defs": {"Point": {"type": "string"}}, "type": "object",
                                             "properties": {"q": {"$ref": "#/$defs/Point"}}}}
    schema = required_schema([point, other])
    jsonschema.validate([{"name": "plot", "parameters": {"p": {"x": 1.5}}}, {"name": "other", "parameters":
                                                                          {"q": "s"}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "plot", "parameters": {"p": {"x": "no"}}}], schema)


# -- request checks ------------------------------------------------------------------------------------
AUTO = ToolOptions(enable_auto_tool_choice=True, tool_call_parser="hermes")


@pytest.mark.parametrize("tools,choice,opts,param", [
    ([{"type": "function", "function": {"description": "no name"}}], "required", AUTO, "tools.0.function.name"),
    ([{"type": "function", "function": {"name": ""}}], "required", AUTO, "tools.0.function.name"),
    ([{"type": "retrieval"}], "required", AUTO, "tools.0.type"),
    ([{"type": "function"}], "required", AUTO, "tools.0.function"),
    ([WEATHER, WEATHER], "required", AUTO, "tools.1.function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "required", AUTO,
     "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"minimum": "3"}}}}}],
     "required", AUTO, "tools.0.function.parameters"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "required", AUTO,
     "tools.0.function.parameters"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, AUTO, "tool_choice"),
    ([WEATHER], {"type": "function"}, AUTO, "tool_choice"),
    ([WEATHER], "sometimes", AUTO, "tool_choice"),
    ([WEATHER], "auto", ToolOptions(), "tool_choice"),
    ([WEATHER], None, ToolOptions(), "tool_choice"),  # tools without tool_choice mean "auto"
    (None, "required", AUTO, "tool_choice"),
    (None, {"type": "function", "function": {"name": "get_weather"}}, AUTO, "tool_choice"),
])
def test_plan_rejects(tools, choice, opts, param):
    with pytest.raises(InvalidRequestError) as e:
        plan_tools(tools, choice, None, opts)
    assert e.value.param == param and e.value.status == 400


def test_plan_modes():
    assert plan_tools(None, None, None, ToolOptions()) is None
    none = plan_tools([WEATHER], "none", None, ToolOptions())
    assert none.mode == "none" and not none.parses and none.template_tools == [WEATHER]
    excluded = plan_tools([WEATHER], "none", None, ToolOptions(exclude_tools_when_tool_choice_none=True))
    assert excluded.template_tools is None and excluded.constraint() is None
    auto = plan_tools([WEATHER], None, None, AUTO)
    assert auto.mode == "auto" and auto.constraint() is None
    named = plan_tools([WEATHER, ADD], {"type": "function", "function": {"name": "add"}}, None, AUTO)
    assert named.constraint().json == ADD["function"]["parameters"]
    req = plan_tools([WEATHER, ADD], "required", False, ToolOptions())
    assert req.constraint().json["maxItems"] == 1 and req.constraint().disable_any_whitespace
    assert req.constraint().end_array_on_repeat and not named.constraint().end_array_on_repeat


def test_tool_options_checked_at_start():
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        ToolOptions(enable_auto_tool_choice=True)
    with pytest.raises(ConfigError, match="hermes"):
        ToolOptions(tool_call_parser="nope")


# -- response assembly -----------------------------------------------------------------------------------
def test_auto_message_from_canned_model_text():
    plan = plan_tools([WEATHER, ADD], "auto", None, AUTO)
    msg, reason = plan.output().message("I will look.\n" + QWEN_TWO_CALLS, "stop")
    assert reason == "tool_calls" and msg["content"] == "I will look."
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "add"]
    ids = [c["id"] for c in msg["tool_calls"]]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert all(c["type"] == "function" for c in msg["tool_calls"])
    assert json.loads(msg["tool_calls"][1]["function"]["arguments"]) == {"a": 2, "b": 3}
    # no call: the text is the content, the finish reason untouched
    assert plan.output().message("Hello there", "length") == ({"role": "assistant", "content": "Hello there"},
                                                              "length")
    # cut short after a complete call: the call stands, the reason says it was cut
    _, reason = plan.output().message(QWEN_TWO_CALLS, "length")
    assert reason == "length"


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = plan_tools([WEATHER, ADD], "auto", False, AUTO)
    msg, _ = plan.output().message(QWEN_TWO_CALLS, "stop")
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather"]


def test_streaming_deltas_follow_openai():
    """First delta of a call: index, id, type, name and empty arguments; then argument fragments;
    the fragments add up to the non-streaming answer."""
    text = '[{"name":"add","parameters":{"a":1,"b":2}},{"name":"get_weather","parameters":{"city":"Rome"}}]'
    plan = plan_tools([WEATHER, ADD], "required", None, ToolOptions())
    out = plan.output()
    deltas = [d for i in range(0, len(text), 5) for d in out.feed(text[i:i + 5])]
    more, reason = out.finish("stop")
    deltas += more
    assert reason == "tool_calls"
    starts = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [s["index"] for s in starts] == [0, 1]
    for s in starts:
        assert s["type"] == "function" and s["function"]["arguments"] == "" and s["id"].startswith("call_")
    args = {0: "", 1: ""}
    for d in deltas:
        tc = d["tool_calls"][0]
        args[tc["index"]] += tc["function"]["arguments"]
    msg, _ = plan.output().message(text, "stop")
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == [args[0], args[1]]
    assert json.loads(args[1]) == {"city": "Rome"}


def test_named_message():
    plan = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, ToolOptions())
    msg, reason = plan.output().message('{"city":"Paris"}', "stop")
    assert msg["content"] is None and reason == "tool_calls"
    assert msg["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_flags_reach_the_replicas_and_are_checked_first():
    import subprocess
    import sys

    from pagedserve.cluster.launcher import replica_argv

    argv = ["--replicas", "2", "--port", "9000", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    assert replica_argv(argv) == ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    for bad in (["--enable-auto-tool-choice"], ["--enable-auto-tool-choice", "--replicas", "2"]):
        r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "serve", *bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode != 0 and "--tool-call-parser" in r.stderr + r.stdout
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("mode", ["required", "named"])
def test_message_drops_a_call_cut_by_max_tokens(mode):
    """finish_reason "length" inside a call: only complete calls come back, each one parses."""
    choice = "required" if mode == "required" else {"type": "function", "function": {"name": "add"}}
    plan = plan_tools([WEATHER, ADD], choice, None, AUTO)
    text = f'[{ADD_23}, {{"name": "get_weather", "parameters": {{"city": "Pa' if mode == "required" else '{"a": 2, "b'
    msg, reason = plan.output().message(text, "length")
    assert reason == "length"
    calls = msg.get("tool_calls", [])
    assert [c["function"]["name"] for c in calls] == (["add"] if mode == "required" else [])
    for c in calls:
        json.loads(c["function"]["arguments"])
    if not calls:
        assert msg["content"] == ""
