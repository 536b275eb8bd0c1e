"""Structured outputs, offline: every constrained output parses and validates, unconstrained neighbours
are untouched, compile failures are per-request errors, preemption keeps the constraint."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pagedserve.errors import InvalidRequestError
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams as SO

NAME = {"type": "string", "maxLength": 16}
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1,
              "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "size": {"type": "string", "enum": ["S", "M", "L"]}},
             "required": ["color", "size"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                                                  "tags": {"type": "array", "items": NAME, "maxItems": 2}},
                 "required": ["id", "tags"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    "bounds": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10},
                                                "count": {"type": "integer", "exclusiveMinimum": 5, "maximum": 9}},
               "required": ["score", "count"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                 "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
                "required": ["code", "email"]},
    "optional": {"type": "object", "properties": {"title": NAME, "note": NAME}, "required": ["title"]},
    "anyof": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "null"},
                                                                   {"type": "boolean"}]}},
              "required": ["value"]},
}
SETTINGS = {
    "greedy": dict(temperature=0),
    "random": dict(temperature=1.0, seed=7),
    "top_p": dict(temperature=0.8, top_p=0.9, seed=3),
    "n2_penalty": dict(temperature=0.7, n=2, seed=11, frequency_penalty=0.5),
}
PROMPT = "Answer with JSON only. Describe one record:"


def check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def test_generated_schemas_validate(llm):
    """8 schemas x 4 sampling settings in one batch: every output parses and validates."""
    cases = [(s, k) for s in SCHEMAS for k in SETTINGS]
    params = [SamplingParams(max_tokens=120, structured_outputs=SO(json=SCHEMAS[s]), **SETTINGS[k]) for s, k in cases]
    outs = llm.generate([PROMPT] * len(cases), params, use_tqdm=False)
    for (s, k), out in zip(cases, outs):
        assert len(out.outputs) == params[cases.index((s, k))].n
        for o in out.outputs:
            assert o.finish_reason == "stop", (s, k, o.text)
            check_json(o.text, SCHEMAS[s])


def test_schema_as_text_and_json_object(llm):
    schema = SCHEMAS["object"]
    a, b = llm.generate([PROMPT] * 2, [
        SamplingParams(temperature=0, max_tokens=80, structured_outputs=SO(json=json.dumps(schema))),
        SamplingParams(temperature=0.9, seed=5, max_tokens=120, structured_outputs=SO(json_object=True))],
        use_tqdm=False)
    check_json(a.outputs[0].text, schema)
    assert isinstance(json.loads(b.outputs[0].text), dict)


def test_regex_choice_grammar(llm):
    grammar = 'root ::= "(" num " " op " " num ")"\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, structured_outputs=so) for i, so in enumerate([
        SO(regex=r"[A-Z][a-z]{2,6} [0-9]{4}"), SO(choice=["positive", "negative", "neutral"]), SO(grammar=grammar),
        SO(choice=['say "hi"', "a\\b"])])]
    outs = [o.outputs[0].text for o in llm.generate(["The answer:"] * 4, params, use_tqdm=False)]
    assert re.fullmatch(r"[A-Z][a-z]{2,6} [0-9]{4}", outs[0]), outs
    assert outs[1] in ("positive", "negative", "neutral")
    assert re.fullmatch(r"\([1-9][0-9]? [-+*] [1-9][0-9]?\)", outs[2]), outs
    assert outs[3] in ('say "hi"', "a\\b")


def test_unconstrained_neighbours_unchanged(llm):
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    plain = SamplingParams(temperature=0, max_tokens=20)
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    constrained = SamplingParams(temperature=0, max_tokens=40, structured_outputs=SO(json=SCHEMAS["nested"]))
    mixed = llm.generate(prompts + [PROMPT] * 2, [plain] * 2 + [constrained] * 2, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == alone
    for o in mixed[2:]:
        assert o.outputs[0].finish_reason in ("stop", "length")


def test_stop_string_may_end_early(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=80, stop=['"age"'],
                                              structured_outputs=SO(json=SCHEMAS["object"])), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == '"age"'


@pytest.mark.parametrize("so,param,words", [
    (SO(json={"type": "strin"}), "structured_outputs.json", "invalid JSON schema"),
    (SO(json={"type": "array", "uniqueItems": True}), "structured_outputs.json", "uniqueItems"),
    (SO(regex="(?=a)b"), "structured_outputs.regex", "Lookahead"),
    (SO(grammar="root ::= undefined_rule"), "structured_outputs.grammar", "undefined_rule"),
])
def test_compile_failure_is_a_request_error(llm, so, param, words):
    with pytest.raises(InvalidRequestError) as ei:
        llm.generate(["hi", "there"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, structured_outputs=so)],
                     use_tqdm=False)
    assert ei.value.param == param and words in ei.value.message
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("hi", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_params_refused_up_front():
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(use_beam_search=True, n=2, structured_outputs=SO(regex="a+"))
    assert ei.value.param == "use_beam_search"
    with pytest.raises(InvalidRequestError) as ei:
        SamplingParams(structured_outputs=SO(regex="a+", choice=["a"]))
    assert ei.value.param == "structured_outputs" and "regex, choice" in ei.value.message


def test_preemption_keeps_constraint():
    """A KV cache far too small for the batch: requests are preempted and recomputed mid-JSON."""
    from pagedserve import LLM

    small = LLM(max_model_len=128, num_kv_blocks=10, block_size=16, max_num_seqs=8)
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=64, structured_outputs=SO(json=SCHEMAS["object"]))
    outs = small.generate([PROMPT + " " * i for i in range(6)], params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        check_json(o.outputs[0].text, SCHEMAS["object"])
