"""Test-only faults: make the engine fail on purpose for requests a test marks by their `seed`.

- `sample_seed`: raise inside that request's sampling (a per-request bug: the engine must abort only
  that request and keep the rest of the batch running);
- `step_seed`: raise in the shared model step of any batch that holds that request (a true engine
  fault: the engine process dies and the server must restart it).

`install()` patches the engine's classes in this process; production code never imports this module.
Child processes get them from PAGEDSERVE_FAULT_INJECT (`sample=SEED,step=SEED`) with
tests/doubles/fault_site on their PYTHONPATH: its sitecustomize.py installs them at start-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from pagedserve.engine import llm_engine
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling import StepSampler


class InjectedFault(RuntimeError):
    pass


@dataclass
class Faults:
    sample_seed: int | None = None
    step_seed: int | None = None


ACTIVE = Faults()  # what the patched methods check; tests set its fields
_originals: dict[str, object] = {}


def _marked(params_list, seed: int | None) -> bool:
    return seed is not None and any(p.seed == seed for p in params_list)


def install() -> Faults:
    """Patch sampling, overlapped sampling and the model step (once per process); returns ACTIVE."""
    if _originals:
        return ACTIVE
    _originals.update(sample_rows=StepSampler.sample_rows, execute=LLMEngine._execute,
                      launch=llm_engine.launch_sampling)

    def sample_rows(self, logits, rows, src):
        if _marked([r.params for r in rows], ACTIVE.sample_seed):
            raise InjectedFault(f"injected sampling fault (seed {ACTIVE.sample_seed})")
        return _originals["sample_rows"](self, logits, rows, src)

    def launch_sampling(logits, sampled, scheduled, generator, max_model_len):
        if _marked([e.request.params for e in sampled], ACTIVE.sample_seed):
            raise InjectedFault("injected sampling fault")  # the engine falls back to the synchronous step
        return _originals["launch"](logits, sampled, scheduled, generator, max_model_len)

    def execute(self, scheduled, now, prev):
        if _marked([e.request.params for e in scheduled], ACTIVE.step_seed):
            raise InjectedFault(f"injected engine fault (seed {ACTIVE.step_seed})")
        return _originals["execute"](self, scheduled, now, prev)

    StepSampler.sample_rows = sample_rows
    LLMEngine._execute = execute
    llm_engine.launch_sampling = launch_sampling
    return ACTIVE


def install_from_env() -> Faults:
    faults = install()
    for item in filter(None, (x.strip() for x in os.environ.get("PAGEDSERVE_FAULT_INJECT", "").split(","))):
        kind, _, seed = item.partition("=")
        if kind in ("sample", "step") and seed.lstrip("-").isdigit():
            setattr(faults, f"{kind}_seed", int(seed))
    return faults
