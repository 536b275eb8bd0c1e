"""Data-parallel serving: a load-aware HTTP router in front of OpenAI-compatible replicas.

- `backends`: per-replica state (health, router-side load, scraped engine load).
- `policies`: how a request picks a replica (round_robin, least_outstanding, engine_load,
  prefix_affinity, gpu_util).
- `router`: the ASGI router (streaming pass-through, retries, ejection, health checks, /metrics).
- `launcher`: `pagedserve serve --replicas N`: N replica processes + router + supervisor.
- `sim`: a simulated continuous-batching backend (tests and the policy benchmark).

The router knows only HTTP and metrics: it works in front of pagedserve, vLLM or SGLang.
"""
from pagedserve.cluster.policies import DEFAULT_POLICY, POLICIES, make_policy

__all__ = ["DEFAULT_POLICY", "POLICIES", "make_policy"]
