"""Cumulative acceptance counters (vLLM's `spec_decode_*` metrics) and the periodic log line."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("pagedserve.engine")


@dataclass
class SpecDecodingStats:
    num_drafts: int = 0  # verify rows (sequences with >= 1 draft, per step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [j]: drafts kept at position j
    log_interval_s: float = 10.0
    _last_log: float = field(default_factory=time.monotonic, repr=False)
    _logged: tuple[int, int, int] = (0, 0, 0)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafts:
            self.accepted_per_pos += [0] * (num_drafts - len(self.accepted_per_pos))
        for j in range(num_accepted):
            self.accepted_per_pos[j] += 1

    def as_dict(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_accepted_per_pos": tuple(self.accepted_per_pos)}

    def maybe_log(self) -> None:
        """vLLM's `SpecDecoding metrics:` line, for the drafts since the last one, every log_interval_s."""
        now = time.monotonic()
        if now - self._last_log < self.log_interval_s:
            return
        d0, t0, a0 = self._logged
        drafts, tokens, accepted = (self.num_drafts - d0, self.num_draft_tokens - t0,
                                    self.num_accepted_tokens - a0)
        self._last_log = now
        if not drafts:
            return
        self._logged = (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens)
        log.info("SpecDecoding metrics: Mean acceptance length: %.2f, Accepted: %d tokens, Drafted: %d tokens, "
                 "Draft acceptance rate: %.1f%%", 1 + accepted / drafts, accepted, tokens,
                 100 * accepted / max(tokens, 1))
