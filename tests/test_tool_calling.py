"""Tool calling end to end: a real `pagedserve serve --enable-auto-tool-choice --tool-call-parser hermes`
on the default model, driven by the official `openai` client and by an agent framework (openai-agents).

"required" and named tool choices are grammar-constrained, so every call must parse and its
arguments validate against the tool's schema whatever the (tiny) model would have said; "auto"
is checked to return plain content when the model emits no call (its parsing of real calls is
covered by canned model text in test_tool_parsers.py).
"""
from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from tests.servers import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
MAX_TOKENS = 32
LONG = 96  # "required" may chain several calls: room for them to finish (and a presence penalty, so
# that the tiny model does not repeat one call until max_tokens: "," is used, "]" is not)


@pytest.fixture(scope="module")
def server():
    with running_server(["--max-model-len", "1024", "--max-num-seqs", "16", "--kv-cache-memory", "0.25",
                         "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def check_call(call) -> dict:
    """A tool call as OpenAI sends it, whose arguments validate against its tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


def test_tool_loop_with_openai_client(client, model):
    """A forced call, our result sent back as a `tool` message, then the model's final answer."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named,
                                       temperature=0, max_tokens=MAX_TOKENS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    args = check_call(call)
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id,
                      "content": json.dumps({"city": args["city"], "temperature": 18, "sky": "sunny"})}]
    final = client.chat.completions.create(model=model, messages=history, tools=TOOLS, temperature=0,
                                           max_tokens=MAX_TOKENS)
    c = final.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    if c.message.tool_calls:  # auto: the model may call again; whatever it emits must parse
        assert c.finish_reason in ("tool_calls", "length")
    else:
        assert c.message.content.strip()
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the history (call + result) was rendered


def test_required_two_tools_n_samples(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                       temperature=0.8, presence_penalty=1.0, seed=7, max_tokens=LONG)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        assert c.message.tool_calls and c.message.content is None
        for call in c.message.tool_calls:
            check_call(call)
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)


def stream_calls(client, **kw):
    """Run a streaming request; per choice: (tool calls assembled from the deltas, finish reason, deltas)."""
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    calls: dict[int, dict[int, dict]] = {}
    reasons, first_deltas, usage = {}, [], None
    for chunk in stream:
        if not chunk.choices:
            usage = chunk.usage
            continue
        (ch,) = chunk.choices
        if ch.finish_reason:
            reasons[ch.index] = ch.finish_reason
        for tc in ch.delta.tool_calls or ():
            per = calls.setdefault(ch.index, {})
            if tc.index not in per:
                first_deltas.append(tc)
                per[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": "", "fragments": 0}
            per[tc.index]["arguments"] += tc.function.arguments or ""
            per[tc.index]["fragments"] += 1
    assert usage is not None and usage.completion_tokens > 0
    return calls, reasons, first_deltas


def test_required_streaming(client, model):
    calls, reasons, first = stream_calls(client, model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                         n=2, temperature=0.8, presence_penalty=1.0, seed=3, max_tokens=LONG)
    assert reasons == {0: "tool_calls", 1: "tool_calls"}
    for tc in first:  # the first delta of a call names it, with empty arguments
        assert tc.id.startswith("call_") and tc.type == "function" and tc.function.name in SCHEMAS
        assert tc.function.arguments == ""
    for i in (0, 1):
        assert calls[i]
        for call in calls[i].values():
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_named_streaming_sends_argument_fragments(client, model):
    named = {"type": "function", "function": {"name": "add"}}
    kw = dict(model=model, messages=[{"role": "user", "content": "Add 2 and 3."}], tools=TOOLS, tool_choice=named,
              temperature=0, max_tokens=MAX_TOKENS)
    calls, reasons, _ = stream_calls(client, **kw)
    (call,) = calls[0].values()
    assert call["name"] == "add" and reasons[0] == "tool_calls"
    assert call["fragments"] > 2  # arguments stream as they are generated, not in one piece
    jsonschema.validate(json.loads(call["arguments"]), SCHEMAS["add"])
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    assert whole.function.arguments == call["arguments"]  # the same text, streamed or not


def test_parallel_tool_calls_false(client, model):
    r = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                       temperature=1.0, seed=11, parallel_tool_calls=False, max_tokens=LONG)
    for c in r.choices:
        assert len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0])


def test_auto_returns_plain_content_without_a_call(client, model):
    """With no call in the output, "auto" answers exactly what "none" (no parsing) answers."""
    kw = dict(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=16)
    auto = client.chat.completions.create(tool_choice="auto", **kw).choices[0]
    none = client.chat.completions.create(tool_choice="none", **kw).choices[0]
    assert auto.message.tool_calls is None and auto.finish_reason in ("stop", "length")
    assert auto.message.content == none.message.content and auto.message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       client.chat.completions.create(tool_choice="auto", stream=True, **kw) if ch.choices)
    assert streamed == auto.message.content


BAD = [
    ("no-name", {"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools.0.function.name"),
    ("not-function", {"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
    ("unknown-function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("bad-choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("choice-without-tools", {"tool_choice": "required"}, "tool_choice"),
    ("invalid-schema", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
                        "tool_choice": "required"}, "tools.0.function.parameters"),
    # valid JSON Schema, but the grammar library cannot enforce it: named by the structured-output compiler
    ("uncompilable-schema", {"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools.1.function.parameters"),
    ("tools-and-response-format", {"tools": TOOLS, "tool_choice": "required",
                                   "response_format": {"type": "json_object"}}, "tool_choice"),
    ("bad-history", {"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "x", "type": "function",
                                                                             "function": {"arguments": "{}"}}]}]},
     "messages.1.tool_calls.0"),
]


@pytest.mark.parametrize("name,extra,param", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_requests(server, model, name, extra, param):
    body = {"model": model, "messages": ASK, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err


def test_agent_framework_tool_call_and_structured_output(server, model):
    """openai-agents (Chat Completions model) against the server: a forced function tool that the
    framework runs and whose result it sends back, then a structured (pydantic) final output."""
    agents = pytest.importorskip("agents")
    from pydantic import BaseModel

    agents.set_tracing_disabled(True)
    oa = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)
    llm = agents.OpenAIChatCompletionsModel(model=model, openai_client=oa)
    seen: list[tuple[str, int]] = []

    @agents.function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        seen.append((a, b))
        return a + b

    class Answer(BaseModel):
        total: int
        confident: bool

    settings = agents.ModelSettings(temperature=0, max_tokens=32, tool_choice="add")
    tool_agent = agents.Agent(name="calc", instructions="Use the add tool.", model=llm, tools=[add],
                              model_settings=settings, tool_use_behavior="stop_on_first_tool")
    typed = agents.Agent(name="typed", instructions="Answer in JSON.", model=llm, output_type=Answer,
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=32))

    async def run():  # one event loop for both: the client's connections belong to it
        return (await agents.Runner.run(tool_agent, "What is 2 + 3?", max_turns=3),
                await agents.Runner.run(typed, "What is 2 + 3?", max_turns=1))

    called, answered = asyncio.run(run())
    assert len(seen) == 1 and all(isinstance(v, int) for v in seen[0])
    assert str(called.final_output) == str(sum(seen[0]))  # the framework ran our tool on the parsed arguments
    assert isinstance(answered.final_output, Answer)


def test_tokenize_renders_tools(server):
    """/tokenize takes `tools` like vLLM's: the count is that of the prompt a chat request would get."""
    count = [httpx.post(server.url + "/tokenize", json={"messages": ASK, **extra}, timeout=60).json()["count"]
             for extra in ({}, {"tools": TOOLS})]
    assert count[1] > count[0] + 50
