"""Constrained answers that end, without a model: the grammars a small greedy model could loop in
(whitespace, digits) and the engine's rule that ends a tool-call array at a repeated call.

The grammars are compiled against the default model's real tokenizer; the repeat rule is driven
through the engine's StructuredOutputManager by a scripted "model" that always wants to repeat.
"""
from __future__ import annotations

import functools
import json
import types

import pytest
import torch
import xgrammar as xgr

from pagedserve.sampling_params import StructuredOutputsParams as SO
from pagedserve.server.constrained_calls import required_schema
from pagedserve.server.constraints import constraint_from_request
from pagedserve.server.protocol import ChatCompletionRequest, parse
from pagedserve.structured.grammar import NUMBER_LIMIT, build_grammar
from pagedserve.structured.manager import StructuredOutputManager

ADD = {"name": "add", "parameters": {"type": "object", "required": ["a", "b"],
                                     "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                 "required": ["city"]}}
CALL = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer), max_threads=1)


def matcher(compiler, so: SO) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiler.compile_grammar(build_grammar(so)))


def accepts(compiler, so: SO, text: str) -> bool:
    """Whether the grammar accepts `text` as a prefix (the matcher takes it)."""
    return matcher(compiler, so).accept_string(text)


# -- whitespace ------------------------------------------------------------------------------------------
OBJ = {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9}}}, "required": ["xs"]}


@pytest.mark.parametrize("so", [SO(json=OBJ), SO(json_object=True)], ids=["json_schema", "json_object"])
def test_json_is_compact_by_default(compiler, so):
    assert accepts(compiler, so, '{"xs": [1, 2]}')
    for loose in ('{\n', '{ "xs"', '{"xs" :', '{"xs": [1,2', '{"xs": [1 ,', '{"xs":[1'):
        assert not accepts(compiler, so, loose), loose
    so.disable_any_whitespace = False  # the opt-in: any whitespace, as vLLM's default
    assert accepts(compiler, so, '{\n  "xs" :\n[1 ,\n\n2')


def test_request_fields_keep_vllms_meaning():
    """`structured_outputs.disable_any_whitespace` means what it means in vLLM; only the default differs."""
    def so(body):
        return constraint_from_request(parse(ChatCompletionRequest, json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], **body}).encode()))[0]

    assert so({"response_format": {"type": "json_object"}}).disable_any_whitespace
    assert so({"structured_outputs": {"json": OBJ}}).disable_any_whitespace
    assert not so({"structured_outputs": {"json": OBJ, "disable_any_whitespace": False}}).disable_any_whitespace


# -- digits ----------------------------------------------------------------------------------------------
def one(schema: dict) -> SO:
    return SO(json={"type": "object", "properties": {"v": schema}, "required": ["v"]})


@pytest.mark.parametrize("schema", [{"type": "integer"}, {"type": "integer", "minimum": 0}, {"type": "number"},
                                    {"type": ["integer", "null"]}, {"type": "number", "exclusiveMinimum": 0}])
def test_unbounded_numbers_get_a_digit_limit(compiler, schema):
    digits = str(NUMBER_LIMIT)
    assert len(digits) == 15
    assert accepts(compiler, one(schema), '{"v": ' + digits)
    assert not accepts(compiler, one(schema), '{"v": ' + digits + "9")  # no 16th digit: the number must end
    if schema["type"] == "number":
        assert accepts(compiler, one(schema), '{"v": 1.5}') and not accepts(compiler, one(schema), '{"v": 1.1234567')


def test_explicit_bounds_are_kept(compiler):
    big = {"type": "integer", "minimum": 0, "maximum": 10**17}
    assert accepts(compiler, one(big), '{"v": ' + "9" * 17)
    small = {"type": "integer", "minimum": 3, "maximum": 7}
    assert accepts(compiler, one(small), '{"v": 5}') and not accepts(compiler, one(small), '{"v": 8')
    assert accepts(compiler, one({"type": "integer", "minimum": 10**16}), '{"v": ' + "1" * 18)  # above the limit


def test_json_object_numbers_are_bounded(compiler):
    so = SO(json_object=True)
    assert accepts(compiler, so, '{"a": [1, -2.5, "x", true, null, {"b": {}}], "c": ' + str(NUMBER_LIMIT) + "}")
    assert not accepts(compiler, so, '{"a": 1234567890123456')


def test_data_keywords_are_not_schemas(compiler):
    """An enum of numbers is left alone (its values are data), and a property named like a keyword is a schema."""
    s = {"type": "object", "properties": {"enum": {"type": "integer"}, "k": {"type": "integer", "enum": [10**17]}},
         "required": ["enum", "k"]}
    assert accepts(compiler, SO(json=s), '{"enum": 1, "k": ' + str(10**17) + "}")
    assert not accepts(compiler, SO(json=s), '{"enum": 1234567890123456')


# -- a tool-call array ends at a repeated call ------------------------------------------------------------
class _Req:
    def __init__(self, so: SO, rid: str = "r"):
        self.request_id = rid
        self.params = types.SimpleNamespace(structured_outputs=so)
        self.seqs = []


def _seq(seq_id: int, tokens: list[int]):
    return types.SimpleNamespace(seq_id=seq_id, output_token_ids=tokens)


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, len(tokenizer), {tokenizer.eos_token_id})


def admit(manager, req) -> None:
    """Compile the request's grammar (as the engine does before scheduling it)."""
    if not manager.submit(req):
        while req.request_id not in manager.grammars:
            manager.wait(60)
            ready, failed = manager.poll()
            assert not failed, failed


def allowed(manager, req, seq, vocab: int) -> torch.Tensor:
    logits = torch.zeros(1, vocab)
    manager.apply_masks(logits, [types.SimpleNamespace(request=req, seq=seq)])
    return torch.nonzero(logits[0] > float("-inf")).flatten()


def run_repeater(manager, tokenizer, so: SO, max_steps: int = 120):
    """A 'model' that always wants `[CALL, CALL, CALL, ...`: each step it takes the longest allowed token
    that continues that text, else the first allowed token. Returns (text, token ids, ended with EOS)."""
    req = _Req(so)
    admit(manager, req)
    seq = _seq(1, [])
    req.seqs = [seq]
    want = ("[" + ", ".join([CALL] * 6) + "]").encode()
    pieces = token_bytes(tokenizer)
    text = b""
    try:
        for _ in range(max_steps):
            ids = allowed(manager, req, seq, len(tokenizer)).tolist()
            fits = [t for t in ids if pieces[t] and want[len(text):].startswith(pieces[t])]
            t = max(fits, key=lambda i: len(pieces[i])) if fits else ids[0]
            seq.output_token_ids.append(t)
            if manager.accept(req, seq, t):
                return text.decode(), list(seq.output_token_ids), True
            text += pieces[t]
        return text.decode(), list(seq.output_token_ids), False
    finally:
        manager.release(req)


@functools.lru_cache(maxsize=1)
def token_bytes(tokenizer) -> list[bytes]:
    return xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab


def test_repeated_call_closes_the_array(manager, tokenizer):
    schema = required_schema([WEATHER, ADD])
    text, tokens, eos = run_repeater(manager, tokenizer, SO(json=schema, end_array_on_repeat=True))
    assert text == f"[{CALL}, {CALL}]" and eos  # the repeat is the last item; then only EOS
    # Without the rule the same 'model' repeats until it runs out of steps.
    text, _, eos = run_repeater(manager, tokenizer, SO(json=schema), max_steps=100)
    assert text.count(CALL) > 2 and not eos


def test_repeat_rule_masks_a_token_that_would_run_past_the_repeat(manager, tokenizer):
    """`},` would complete the repeat and start another item at once: masked, so `]` stays possible.
    A sequence rebuilt by replaying its tokens (fork, preemption) gets the same mask."""
    schema = required_schema([WEATHER, ADD])
    req = _Req(SO(json=schema, end_array_on_repeat=True), "fused")
    admit(manager, req)
    prefix = tokenizer.encode(f"[{CALL}, {CALL[:-1]}", add_special_tokens=False)
    fused = tokenizer.convert_tokens_to_ids("},")
    close = tokenizer.convert_tokens_to_ids("}")
    seq = _seq(7, [])
    req.seqs = [seq]
    try:
        for t in prefix:  # through the manager, one token per step, as the engine does
            allowed(manager, req, seq, len(tokenizer))
            seq.output_token_ids.append(t)
            manager.accept(req, seq, t)
        ids = set(allowed(manager, req, seq, len(tokenizer)).tolist())
        assert close in ids and fused not in ids
        fork = _seq(8, list(prefix))
        req.seqs.append(fork)
        assert set(allowed(manager, req, fork, len(tokenizer)).tolist()) == ids
        # A different call is not held back: after the first call, `},` is allowed.
        first = tokenizer.encode(f"[{CALL[:-1]}", add_special_tokens=False)
        other = _seq(9, first)
        req.seqs.append(other)
        assert fused in set(allowed(manager, req, other, len(tokenizer)).tolist())
    finally:
        manager.release(req)


def test_choices_past_ascii_match_their_own_text():
    """A choice with an emoji or accented letters accepts exactly its own text (escaped as surrogate pairs
    in the EBNF literal, the emoji matched nothing the model could write)."""
    from xgrammar.testing import _is_grammar_accept_string

    g = build_grammar(SO(choice=["héllo 😀", "日本", 'say "hi"\n']))
    assert all(_is_grammar_accept_string(g, c) for c in ["héllo 😀", "日本", 'say "hi"\n'])
    assert not _is_grammar_accept_string(g, "hello")
