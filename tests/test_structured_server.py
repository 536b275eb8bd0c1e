"""Structured outputs through `pagedserve serve` and the official openai client: response_format,
vLLM's structured_outputs extra body and guided_* fields, streaming, n > 1, and 400s naming the field."""
from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.servers import running_server

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "population": {"type": "integer", "minimum": 0}},
          "required": ["city", "population"]}
M = "smol"
MSG = [{"role": "user", "content": "Give me a city and its population as JSON."}]


@pytest.fixture(scope="module")
def server():
    with running_server(["--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-memory", "0.25",
                         "--served-model-name", M]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=300, max_retries=0)


def rf_schema(schema=SCHEMA) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_chat_json_schema_n2(client):
    r = client.chat.completions.create(model=M, messages=MSG, n=2, temperature=1.0, seed=4, max_tokens=80,
                                       response_format=rf_schema())
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_chat_stream_n2(client):
    text, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(model=M, messages=MSG, n=2, temperature=0.8, seed=2,
                                                max_tokens=80, response_format=rf_schema(), stream=True):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "stop", 1: "stop"}
    for t in text.values():
        jsonschema.validate(json.loads(t), SCHEMA)


def test_chat_json_object(client):
    r = client.chat.completions.create(model=M, messages=MSG, temperature=0, max_tokens=80,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int
    hobbies: list[str] = Field(max_length=2)


def test_openai_parse_pydantic(client):
    r = client.chat.completions.parse(model=M, messages=[{"role": "user", "content": "Invent a person."}],
                                      response_format=Person, temperature=0, max_tokens=120)
    p = r.choices[0].message.parsed
    assert isinstance(p, Person) and p.name is not None


def test_completions_extra_body_and_guided(client):
    cases = [
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"structured_outputs": {"regex": "[a-z]{3,6}-[0-9]{2}"}}, lambda t: re.fullmatch("[a-z]{3,6}-[0-9]{2}", t)),
        ({"structured_outputs": {"choice": ["left", "right"]}}, lambda t: t in ("left", "right")),
        ({"structured_outputs": {"grammar": 'root ::= "x=" [0-9] [0-9]?'}}, lambda t: re.fullmatch(r"x=\d\d?", t)),
        ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"guided_regex": "(yes|no)!"}, lambda t: t in ("yes!", "no!")),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"guided_grammar": 'root ::= "ok" | "ko"'}, lambda t: t in ("ok", "ko")),
    ]
    for extra, check in cases:
        r = client.completions.create(model=M, prompt="Answer:", temperature=1.0, seed=1, max_tokens=48,
                                      extra_body=extra)
        assert check(r.choices[0].text), (extra, r.choices[0].text)
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=M, messages=MSG, max_tokens=10, extra_body={"guided_choice": ["a", "b"]})
    assert r.choices[0].message.content in ("a", "b")


BAD = [
    ("invalid-schema", {"response_format": rf_schema({"type": "strin"})}, "response_format.json_schema.schema",
     "invalid JSON schema"),
    ("unsupported-feature", {"response_format": rf_schema({"type": "array", "uniqueItems": True})},
     "response_format.json_schema.schema", "uniqueItems"),
    ("bad-regex", {"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex", "regex"),
    ("bad-guided-regex", {"guided_regex": "(?=x)y"}, "guided_regex", "Lookahead"),
    ("bad-grammar", {"guided_grammar": "root ::= nothing"}, "guided_grammar", "nothing"),
    ("two-constraints", {"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex",
     "only one"),
    ("two-in-extra", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("schema-not-json", {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("beam", {"guided_choice": ["a", "b"], "use_beam_search": True, "n": 2}, "use_beam_search", "beam search"),
]


def test_bad_constraints_400_and_others_unaffected(server, client):
    """While a long request streams, every bad constraint gets a 400 naming its field; the stream ends normally."""
    done = {}

    def long_stream():
        parts = []
        for chunk in client.chat.completions.create(model=M, messages=MSG, max_tokens=60, temperature=0,
                                                    response_format=rf_schema(), stream=True):
            parts += [c.delta.content or "" for c in chunk.choices]
        done["text"] = "".join(parts)

    t = threading.Thread(target=long_stream)
    t.start()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for name, extra, param, words in BAD:
            for path, body in [("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "hi"})]:
                r = http.post(path, json={"model": M, "max_tokens": 5, **body, **extra})
                assert r.status_code == 400, (name, path, r.text)
                err = r.json()["error"]
                assert err["param"] == param and words in err["message"], (name, err)
    t.join(300)
    jsonschema.validate(json.loads(done["text"]), SCHEMA)
    ok = client.chat.completions.create(model=M, messages=MSG, max_tokens=5, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
