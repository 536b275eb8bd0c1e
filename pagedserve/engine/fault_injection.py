"""Test-only fault injection: make the engine fail on purpose for requests tests mark.

Inert unless the engine process starts with PAGEDSERVE_FAULT_INJECT set; never set it in
production. The value is comma-separated `KIND=SEED` items; a request is marked by its
`seed` sampling parameter:

- `sample=SEED`: raise inside that request's sampling (a per-request bug: the engine must
  abort only that request and keep the rest of the batch running);
- `step=SEED`: raise in the shared model step of any batch that holds that request (a true
  engine fault: the engine process dies and the server must restart it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


class InjectedFault(RuntimeError):
    pass


@dataclass
class FaultInjector:
    sample_seed: int | None = None
    step_seed: int | None = None

    @classmethod
    def from_env(cls) -> "FaultInjector":
        spec = os.environ.get("PAGEDSERVE_FAULT_INJECT", "")
        inj = cls()
        for item in filter(None, (x.strip() for x in spec.split(","))):
            kind, _, seed = item.partition("=")
            if kind in ("sample", "step") and seed.lstrip("-").isdigit():
                setattr(inj, f"{kind}_seed", int(seed))
        return inj

    def on_sample(self, rows) -> None:
        if self.sample_seed is not None and any(r.params.seed == self.sample_seed for r in rows):
            raise InjectedFault(f"injected sampling fault (seed {self.sample_seed})")

    def on_step(self, scheduled) -> None:
        if self.step_seed is not None and any(e.request.params.seed == self.step_seed for e in scheduled):
            raise InjectedFault(f"injected engine fault (seed {self.step_seed})")
