"""Qwen (v1)'s tokenizer without the checkpoint's code: `qwen.tiktoken` (BPE ranks), Qwen's split
pattern, NFC normalization and the special tokens.

Two exact implementations give the same ids: tiktoken, and a `tokenizers` fast tokenizer converted from
the same file once (transformers' tiktoken converter) and cached. tiktoken encodes ~3.5x faster
(benchmarks/qwen_tokenizer_speed.py, docs/models.md), so `QwenTokenizer.encode` uses it; everything else
the engine needs of a Hugging Face tokenizer (incremental detokenization, chat templates, the vocabulary
for structured outputs) comes from the fast one.

Qwen-7B-Chat ships no chat template: the built-in ChatML one renders what Qwen's `make_context` builds,
with its default system prompt.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import unicodedata
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from pagedserve.errors import ConfigError

TIKTOKEN_FILE = "qwen.tiktoken"
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
NUM_RANKS = 151_643  # qwen.tiktoken's entries: the special tokens follow, from this id on
SIZE = NUM_RANKS + len(SPECIAL_TOKENS)
DEFAULT_SYSTEM = "You are a helpful assistant."
# ChatML as Qwen's make_context lays it out; a missing system message gets the default one.
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '" + DEFAULT_SYSTEM + "' %}{% endif %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>' }}"
    "{% for m in messages %}{{ '\\n<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n<|im_start|>assistant\\n' }}{% endif %}"
)
# The wheel that ships the real qwen.tiktoken (the Makefile installs it --no-deps), for tests and set-up.
DASHSCOPE_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def packaged_tiktoken() -> Path:
    """qwen.tiktoken from the dashscope wheel, checked against its known sha256."""
    spec = importlib.util.find_spec("dashscope")  # located, not imported: its __init__ needs its deps
    path = Path(spec.submodule_search_locations[0]) / "resources" / TIKTOKEN_FILE if spec else None
    if path is None or not path.exists():
        raise ConfigError("qwen.tiktoken is not installed", hint="pip install --no-deps dashscope==2.0.2")
    if hashlib.sha256(path.read_bytes()).hexdigest() != DASHSCOPE_SHA256:
        raise ConfigError(f"{path} does not have the expected sha256 {DASHSCOPE_SHA256}")
    return path


class QwenTokenizer(PreTrainedTokenizerFast):
    """The fast tokenizer, whose plain `encode(text)` runs tiktoken (same ids, faster). Qwen adds no
    BOS/EOS, so add_special_tokens changes nothing; text in special-token form becomes that token."""

    def set_tiktoken(self, path: Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        specials = {t: NUM_RANKS + i for i, t in enumerate(SPECIAL_TOKENS)}
        self._tiktoken = tiktoken.Encoding("qwen", pat_str=PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                           special_tokens=specials)

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if isinstance(text, str) and text_pair is None and not kwargs:
            return self._tiktoken.encode(unicodedata.normalize("NFC", text), allowed_special="all",
                                         disallowed_special=())
        return super().encode(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)


def load_qwen_tokenizer(model_dir: Path) -> QwenTokenizer:
    """The tokenizer for a QWen checkpoint directory (which must hold qwen.tiktoken)."""
    from tokenizers import Tokenizer

    src = Path(model_dir) / TIKTOKEN_FILE
    if not src.exists():
        raise ConfigError(f"QWen checkpoint {model_dir} has no {TIKTOKEN_FILE}",
                          hint=f"copy {TIKTOKEN_FILE} from the model's Hugging Face repository into it")
    data = src.read_bytes()
    cached = _cache_dir() / f"qwen-{hashlib.sha256(data).hexdigest()[:16]}.json"
    if cached.exists():
        tok = Tokenizer.from_file(str(cached))
    else:
        tok = _convert(src)
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp))
        tmp.replace(cached)
    if tok.get_vocab_size() != SIZE:
        raise ConfigError(f"{src} gives {tok.get_vocab_size()} tokens, expected {SIZE}: not Qwen's qwen.tiktoken")
    out = QwenTokenizer(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT, chat_template=CHATML_TEMPLATE,
                        clean_up_tokenization_spaces=False, model_max_length=int(1e30))
    out.set_tiktoken(src)
    return out


def _convert(src: Path):
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(src), pattern=PATTERN, extra_special_tokens=list(SPECIAL_TOKENS)).converted()
    if tok.get_vocab_size() == SIZE and tok.token_to_id(ENDOFTEXT) != NUM_RANKS:
        raise ConfigError(f"{src}: <|endoftext|> did not get id {NUM_RANKS}")
    tok.normalizer = normalizers.NFC()
    return tok


def _cache_dir() -> Path:
    from pagedserve.model.default_model import cache_root

    return cache_root() / "tokenizers"
