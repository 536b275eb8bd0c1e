"""Tools and tool-call history through the chat template: the default model's template (which ignores
tools, so the Hermes fallback applies) and a Qwen2.5-style template that renders them itself."""
from __future__ import annotations

import asyncio

import json

import pytest

from pagedserve.errors import InvalidRequestError
from pagedserve.server.protocol import ChatMessage
from pagedserve.server.serving import OpenAIServing

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "second result"},
]

# A ChatML template in the style of Qwen2.5's: tools listed in the system turn, calls and results
# rendered from the structured fields (arguments through `tojson`, so they must be a dict).
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\nRESULT {{ m.tool_call_id }}: {{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def serving_with(tokenizer) -> OpenAIServing:
    s = OpenAIServing(engine=None, metrics=None, served_names=["m"])
    s.tokenizer = tokenizer
    return s


def msgs(raw):
    return [ChatMessage.model_validate(m) for m in raw]


@pytest.fixture(scope="module")
def default_serving(model_dir):
    from pagedserve.model.loader import load_tokenizer

    return serving_with(load_tokenizer(str(model_dir), None))


@pytest.fixture(scope="module")
def tool_serving():
    from tests.tiny_models import tokenizer

    tok = tokenizer()
    tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", bos_token="<bos>")
    tok.chat_template = TOOL_TEMPLATE
    return serving_with(tok)


def test_default_template_gets_the_hermes_fallback(default_serving):
    assert "tools" not in default_serving.tokenizer.chat_template  # the reason for the fallback
    text = asyncio.run(default_serving.apply_chat_template(msgs(HISTORY), tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text and "<tool_call>" in text
    # the past call as a Hermes block, its arguments as an object; both results in one user turn
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\n18 C and sunny\n</tool_response>\n<tool_response>\nsecond result"
            "\n</tool_response><|im_end|>") in text
    assert "<|im_start|>tool" not in text and text.endswith("<|im_start|>assistant\n")


def test_default_template_keeps_the_users_system_prompt(default_serving):
    text = asyncio.run(default_serving.apply_chat_template(
        msgs([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]), tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\nBe terse.\n\n# Tools")
    plain = asyncio.run(default_serving.apply_chat_template(msgs([{"role": "user", "content": "hi"}])))
    assert "# Tools" not in plain and "SmolLM" in plain  # no tools: the template's own default


def test_template_with_tool_support_renders_them_itself(tool_serving):
    text = asyncio.run(tool_serving.apply_chat_template(msgs(HISTORY), tools=[WEATHER]))
    assert text.startswith("<|im_start|>system\nTOOLS: get_weather<|im_end|>")
    assert 'CALL get_weather {"city": "Paris"}' in text  # a dict reached `tojson`, not the JSON string
    assert "RESULT call_1: 18 C and sunny" in text and "<tool_response>" not in text and "# Tools" not in text


def test_bad_history_tool_calls(default_serving):
    bad = [{"role": "user", "content": "x"},
           {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": "{}"}}]}]
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(default_serving.apply_chat_template(msgs(bad)))
    assert e.value.param == "messages.1.tool_calls.0"
    bad[1]["tool_calls"][0]["function"] = {"name": "f", "arguments": "{not json"}
    with pytest.raises(InvalidRequestError) as e:
        asyncio.run(default_serving.apply_chat_template(msgs(bad)))
    assert e.value.param == "messages.1.tool_calls.0"
