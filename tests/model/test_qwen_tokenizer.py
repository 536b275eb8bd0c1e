"""Qwen's tokenizer as pagedserve loads it (qwen.tiktoken converted to a fast tokenizer) against tiktoken
itself, incremental detokenization of multi-byte characters, and the built-in ChatML template against
Qwen's make_context output (tests/model/data/qwen_reference.json)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedserve.model import qwen_tokenizer as QT

tiktoken = pytest.importorskip("tiktoken")
REF = json.loads((Path(__file__).parent / "data" / "qwen_reference.json").read_text())
CORPUS = [
    "Hello, world! It's a test: we'll see, they've gone, I'm here, you'd know.",
    "长城是中国古代的军事防御工程，全长两万多公里。今天天气很好，我们去爬山吧！",
    "混合 mixed 文本 with English 和中文, numbers 12345 and 3.14159, 日期 2026-12-07。",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint(fib(30))\t# 832040\n",
    "emoji 🎉🚀👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 and skin tones 👍🏽, ZWJ sequences, 表情😀。",
    "   leading spaces, trailing spaces   \n\n\r\n  \t tabs\tand\u00a0nbsp, \u3000全角空格",
    "e\u0301 composed vs é, Å vs A\u030a: NFC normalizes them first.",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|extra_7|>",
    "URLs https://example.com/a?b=c&d=e#f, JSON {\"key\": [1, 2, {\"x\": null}]}, SQL SELECT * FROM t;",
    "한국어 텍스트, 日本語のテキスト, русский текст, العربية, हिन्दी",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen-tok")
    (d / "qwen.tiktoken").write_bytes(QT.packaged_tiktoken().read_bytes())
    (d / "config.json").write_text('{"model_type": "qwen"}')
    return QT.load_qwen_tokenizer(d)


@pytest.fixture(scope="module")
def ref():
    """tiktoken configured as Qwen's own tokenizer is (tokenization_qwen.py): ranks, pattern, specials."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(QT.packaged_tiktoken()))
    specials = {t: QT.NUM_RANKS + i for i, t in enumerate(QT.SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QT.PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _ref_encode(ref, text: str) -> list[int]:
    import unicodedata

    return ref.encode(unicodedata.normalize("NFC", text), allowed_special="all", disallowed_special=())


def test_packaged_file_is_the_real_one():
    import hashlib

    assert hashlib.sha256(QT.packaged_tiktoken().read_bytes()).hexdigest() == QT.DASHSCOPE_SHA256


def test_size_and_special_ids(tok):
    from pagedserve.model.models.qwen import QWenLMHeadModel, TOKENIZER_SIZE

    assert len(tok) == QT.SIZE == TOKENIZER_SIZE == 151851
    assert tok.convert_tokens_to_ids([QT.ENDOFTEXT, QT.IM_START, QT.IM_END]) == list(QWenLMHeadModel.default_stop_ids)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == [
        151643, 151644, 151645, 151850]
    assert tok.eos_token_id == 151643


@pytest.mark.parametrize("i", range(len(CORPUS)))
def test_encoding_equals_tiktoken(tok, ref, i):
    """Both implementations pagedserve holds: `encode` (tiktoken inside) and the converted fast tokenizer."""
    text = CORPUS[i]
    want = _ref_encode(ref, text)
    assert tok.encode(text, add_special_tokens=False) == want
    assert tok.backend_tokenizer.encode(text, add_special_tokens=False).ids == want
    assert tok(text)["input_ids"] == want


def test_encoding_equals_tiktoken_on_the_whole_corpus_and_decodes_back(tok, ref):
    import unicodedata

    text = "\n".join(CORPUS) * 3
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == _ref_encode(ref, text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_incremental_detokenization_never_splits_a_character(tok):
    """Chinese and emoji span several byte-level tokens: every streamed delta is whole characters."""
    from pagedserve.engine.detokenizer import IncrementalDetokenizer

    text = "长城🎉很长。👨‍👩‍👧 emoji 混合 text，完毕！"
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("前缀：", add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt, True)
    out = ""
    for t in ids:
        delta = det.step(t)
        assert "\ufffd" not in delta
        out += delta
    assert out == text


def test_chatml_matches_make_context(tok):
    """The built-in template renders Qwen's make_context text byte for byte, and encodes to its ids."""
    for c in REF["chats"]:
        messages = [{"role": "system", "content": c["system"]}]
        for q, a in c["history"]:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": c["query"]})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == c["text"]
        assert tok.encode(text, add_special_tokens=False) == c["ids"]


def test_default_system_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == REF["chats"][0]["text"]
    assert "You are a helpful assistant." in text
