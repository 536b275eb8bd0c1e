"""`--speculative-config` / `LLM(speculative_config=...)`: vLLM's keys, checked once at start-up."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from pagedserve.errors import ConfigError

METHODS = ("ngram", "draft_model")
_PARAM = "speculative_config"
_HINT = 'e.g. \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\''


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram: the longest / shortest history suffix looked up. vLLM's defaults: 5 for both when neither is
    # given, else the one given for the missing one.
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None  # draft_model: its checkpoint (same tokenizer as the target)
    disable_by_batch_size: int | None = None  # no drafts while this many requests (or more) are unfinished

    @classmethod
    def parse(cls, raw: "SpeculativeConfig | dict | str | None") -> "SpeculativeConfig | None":
        """A dict or its JSON text -> a checked config; None stays None."""
        if raw is None or isinstance(raw, cls):
            return raw
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative_config is not valid JSON: {e.msg}", param=_PARAM,
                                  hint=_HINT) from None
        if not isinstance(raw, dict):
            raise ConfigError("speculative_config must be a JSON object", param=_PARAM, hint=_HINT)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"speculative_config: unknown key(s) {', '.join(unknown)}", param=_PARAM,
                              hint=f"known keys: {', '.join(sorted(known))}")
        method = raw.get("method")
        if method is None and raw.get("model"):
            method = "draft_model"
        if method not in METHODS:
            raise ConfigError(f"speculative_config: unknown method {method!r}", param=_PARAM,
                              hint=f"use one of: {', '.join(METHODS)}")
        k = raw.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"speculative_config: num_speculative_tokens must be an integer >= 1, got {k!r}",
                              param=_PARAM, hint="how many tokens to draft per step: 2 to 5 is usual")
        lo, hi = raw.get("prompt_lookup_min"), raw.get("prompt_lookup_max")
        lo, hi = (5, 5) if lo is None and hi is None else (lo if lo is not None else hi, hi if hi is not None else lo)
        cfg = cls(**{**raw, "method": method, "prompt_lookup_min": lo, "prompt_lookup_max": hi})
        if method == "ngram":
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ConfigError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                                  f"{lo!r} and {hi!r}", param=_PARAM, hint=_HINT)
        if method == "draft_model" and not cfg.model:
            raise ConfigError("speculative_config: method draft_model needs \"model\" (a smaller model with the "
                              "same tokenizer)", param=_PARAM, hint=_HINT)
        d = cfg.disable_by_batch_size
        if d is not None and (not isinstance(d, int) or d < 1):
            raise ConfigError(f"speculative_config: disable_by_batch_size must be an integer >= 1, got {d!r}",
                              param=_PARAM, hint="the number of unfinished requests from which no drafts are made")
        return cfg
