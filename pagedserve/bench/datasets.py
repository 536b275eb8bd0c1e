"""Workloads for `pagedserve bench serve`: random (token-exact), ShareGPT and JSONL files.

Every dataset yields `BenchRequest`s from an endless, seeded stream, so each
load level of a sweep can get fresh prompts (repeating prompts across levels
would hand later levels prefix-cache hits).
"""
from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path
from typing import Iterator

from pagedserve.bench.client import BenchRequest
from pagedserve.errors import ConfigError, InvalidRequestError


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str | None = None):
    """AutoTokenizer for `name`, or for the embedded default model when None (loaded once)."""
    from transformers import AutoTokenizer

    if name is None:
        from pagedserve.model.default_model import default_model_dir

        name = str(default_model_dir())
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot load tokenizer {name!r}: {e}", hint="pass --tokenizer PATH_OR_ID") from e


def _lengths(rng: random.Random, mean: int, range_ratio: float) -> int:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


class RandomDataset:
    """Random-word prompts whose token count is exact under the tokenizer.

    Prompts are built from vocabulary words that tokenize to a single token with
    their leading space (" apple"); byte-level BPE splits on spaces, so n such
    words are n tokens. The count is checked by re-encoding and repaired word by
    word for tokenizers where that does not hold. `prefix_len` tokens of a fixed
    random prefix are shared by all prompts (to exercise prefix caching); the
    random part has `input_len` tokens (± range_ratio).
    """

    def __init__(self, tokenizer, input_len: int, output_len: int, range_ratio: float = 0.0,
                 prefix_len: int = 0, seed: int = 0):
        if input_len < 1 or output_len < 1:
            raise InvalidRequestError("--input-len and --output-len must be ≥ 1")
        if not 0 <= range_ratio < 1:
            raise InvalidRequestError("--range-ratio must be in [0, 1)", param="range_ratio")
        self.tok = tokenizer
        self.input_len, self.output_len = input_len, output_len
        self.range_ratio, self.prefix_len, self.seed = range_ratio, prefix_len, seed
        self._special = len(tokenizer("").input_ids)  # BOS etc. the tokenizer adds to every prompt
        self.words = self._single_token_words()
        self.prefix = self._exact(random.Random(seed ^ 0x5EED), "", prefix_len) if prefix_len else ""

    def _single_token_words(self) -> list[str]:
        special = set(self.tok.all_special_ids)
        ids = [i for i in range(getattr(self.tok, "vocab_size", 0) or len(self.tok)) if i not in special]
        cands = [s for s in (self.tok.decode([i]) for i in ids)
                 if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha()]
        if cands:
            fast = getattr(self.tok, "backend_tokenizer", None)  # the Rust tokenizer: 20x faster in bulk
            if fast is not None:
                enc = [e.ids for e in fast.encode_batch(cands, add_special_tokens=False)]
            else:
                enc = self.tok(cands, add_special_tokens=False).input_ids
            cands = [w for w, ids in zip(cands, enc) if len(ids) == 1]
        if len(cands) < 100:
            raise ConfigError("the tokenizer has too few single-token words for random prompts",
                              hint="use --dataset jsonl:FILE or sharegpt:FILE")
        return cands

    def count(self, text: str) -> int:
        return len(self.tok(text).input_ids)

    def _exact(self, rng: random.Random, head: str, n: int) -> str:
        """head + random words such that the whole text is len(head tokens) + n tokens."""
        target = (self.count(head) if head else self._special) + n
        body = "".join(rng.choices(self.words, k=n))
        for _ in range(16):
            have = self.count(head + body)
            if have == target:
                return head + body
            if have > target:  # drop words from the end
                body = body[: body.rstrip().rfind(" ")] if " " in body.strip() else ""
            else:
                body += "".join(rng.choices(self.words, k=target - have))
        return head + body  # best effort; the caller records the real count

    def stream(self, seed: int) -> Iterator[BenchRequest]:
        rng = random.Random(seed)
        while True:
            n_in = _lengths(rng, self.input_len, self.range_ratio)
            text = self._exact(rng, self.prefix, n_in)
            yield BenchRequest(text, self.count(text), _lengths(rng, self.output_len, self.range_ratio))


class ShareGPTDataset:
    """First human turn as the prompt; the first reply's token count as max_tokens
    (unless output_len is given). Filters as vLLM does: both ≥ 4 tokens,
    prompt ≤ 1024 and prompt + reply ≤ 2048 tokens."""

    def __init__(self, path: str, tokenizer, output_len: int | None = None):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read ShareGPT file {path}: {e}") from e
        self.items: list[BenchRequest] = []
        for entry in data:
            conv = entry.get("conversations") or entry.get("conversation") or []
            if len(conv) < 2:
                continue
            prompt, reply = str(conv[0].get("value", "")), str(conv[1].get("value", ""))
            p_len = len(tokenizer(prompt).input_ids)
            o_len = output_len or len(tokenizer(reply, add_special_tokens=False).input_ids)
            if p_len < 4 or (output_len is None and o_len < 4) or p_len > 1024 or p_len + o_len > 2048:
                continue
            self.items.append(BenchRequest(prompt, p_len, o_len))
        if not self.items:
            raise ConfigError(f"no usable conversations in {path}", hint="expects [{'conversations': [{'from','value'}...]}]")

    def stream(self, seed: int) -> Iterator[BenchRequest]:
        return _shuffled_cycle(self.items, seed)


class JsonlDataset:
    """One JSON object per line: {"prompt": "..."} or {"messages": [...]} (chat), with an
    optional "output_len" / "max_tokens"; prompt lengths are counted if a tokenizer is given."""

    def __init__(self, path: str, output_len: int, tokenizer=None):
        self.items: list[BenchRequest] = []
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e}") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{n}: not JSON: {e}") from e
            messages = obj.get("messages")
            prompt = obj.get("prompt", obj.get("text"))
            if prompt is None and messages:
                prompt = str(messages[-1].get("content", ""))
            if prompt is None:
                raise ConfigError(f"{path}:{n}: needs a 'prompt' or 'messages' field")
            o_len = int(obj.get("output_len") or obj.get("max_tokens") or output_len)
            p_len = len(tokenizer(prompt).input_ids) if tokenizer is not None else -1
            self.items.append(BenchRequest(prompt, p_len, o_len, messages=messages))
        if not self.items:
            raise ConfigError(f"{path} has no prompts")

    def stream(self, seed: int) -> Iterator[BenchRequest]:
        return _shuffled_cycle(self.items, seed)


def _shuffled_cycle(items: list[BenchRequest], seed: int) -> Iterator[BenchRequest]:
    rng = random.Random(seed)
    for _ in itertools.count():
        order = list(items)
        rng.shuffle(order)
        yield from order


def make_dataset(spec: str, *, tokenizer_name: str | None, input_len: int, output_len: int | None,
                 range_ratio: float, prefix_len: int, seed: int):
    """'random' | 'sharegpt:FILE' | 'jsonl:FILE' -> a dataset with `.stream(seed)`."""
    kind, _, path = spec.partition(":")
    if kind == "random":
        return RandomDataset(load_tokenizer(tokenizer_name), input_len, output_len or 128, range_ratio, prefix_len, seed)
    if kind == "sharegpt" and path:
        return ShareGPTDataset(path, load_tokenizer(tokenizer_name), output_len)
    if kind == "jsonl" and path:
        return JsonlDataset(path, output_len or 128)
    raise InvalidRequestError(f"unknown dataset {spec!r}", param="dataset", hint="random | sharegpt:FILE | jsonl:FILE")
