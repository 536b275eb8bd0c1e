"""Routing policies: one small class each, `choose(request, candidates) -> Backend`.

`candidates` are the healthy backends not yet tried for this request (never empty).
Router-side load (`inflight`, `inflight_tokens`) is kept by the router for every policy;
engine load and GPU utilization are refreshed by the router's scrape loop when the
policy asks for them (`needs_metrics`, `needs_gpu_util`).

See benchmarks/router_policies.py for the study that picked DEFAULT_POLICY.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Sequence

from pagedserve.cluster.backends import Backend


@dataclass
class RequestInfo:
    """What a policy may look at: parsed once from the request body by the router."""

    path: str = "/v1/completions"
    model: str | None = None
    prompt_tokens: int = 0  # estimate: characters / 4
    max_tokens: int = 256  # from the request (max_tokens / max_completion_tokens), else a default
    affinity_key: str | None = None  # session id / user / prompt prefix (prefix_affinity)
    stream: bool = False

    @property
    def est_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens


class Policy:
    name = "base"
    needs_metrics = False  # scrape backends' /metrics (running, waiting, KV usage)
    needs_gpu_util = False  # poll GPU utilization (NVML / nvidia-smi / backend metrics)

    def choose(self, req: RequestInfo, candidates: Sequence[Backend]) -> Backend:
        raise NotImplementedError


class RoundRobin(Policy):
    """Each request to the next backend in turn, blind to load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, req, candidates):
        return candidates[next(self._counter) % len(candidates)]


class _RotatingTieBreak:
    """Among equal scores, rotate instead of always taking the first backend."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick_min(self, candidates: Sequence[Backend], score) -> Backend:
        n = len(candidates)
        start = next(self._counter) % n
        best, best_s = None, math.inf
        for i in range(n):
            b = candidates[(start + i) % n]
            s = score(b)
            if s < best_s:
                best, best_s = b, s
        return best


class LeastOutstanding(Policy, _RotatingTieBreak):
    """Least work in flight through this router: requests + estimated tokens / 1024 (prompt +
    max_tokens), so among replicas with as many requests the one holding fewer or shorter
    generations wins, and a few very long generations count like one more request. Exact and
    instantaneous; it counts only this router's requests, yet with several routers it still
    beat engine_load in the study (each router keeps its own share balanced)."""

    name = "least_outstanding"

    def __init__(self, token_weight: float = 1.0 / 1024) -> None:
        _RotatingTieBreak.__init__(self)
        self.token_weight = token_weight  # one request counts like 1024 estimated tokens

    def choose(self, req, candidates):
        w = self.token_weight
        return self.pick_min(candidates, lambda b: b.inflight + w * b.inflight_tokens)


class EngineLoad(Policy, _RotatingTieBreak):
    """Least engine load from the backends' /metrics (vLLM names: vllm:num_requests_running,
    vllm:num_requests_waiting, vllm:kv_cache_usage_perc). Scrapes are an interval old, so the
    count is corrected by what this router sent or saw finish since; waiting requests weigh
    more (they mean the batch is full) and a nearly full KV cache is avoided. It sees load
    that does not pass through this router, but the scrape is stale: several routers reading
    the same scrape pile onto the same replica until the next one."""

    name = "engine_load"
    needs_metrics = True

    def __init__(self, waiting_weight: float = 2.0, kv_threshold: float = 0.9, kv_penalty: float = 8.0) -> None:
        _RotatingTieBreak.__init__(self)
        self.waiting_weight = waiting_weight
        self.kv_threshold = kv_threshold
        self.kv_penalty = kv_penalty

    def score(self, b: Backend) -> float:
        if b.running is None:  # not scraped yet (or no metrics): router-side count only
            return float(b.inflight)
        s = b.running + self.waiting_weight * (b.waiting or 0.0) + (b.inflight - b.inflight_at_scrape)
        kv = b.kv_usage or 0.0
        if kv > self.kv_threshold:
            s += self.kv_penalty * (kv - self.kv_threshold) / (1.0 - self.kv_threshold)
        return s

    def choose(self, req, candidates):
        return self.pick_min(candidates, self.score)


class GpuUtil(Policy, _RotatingTieBreak):
    """The seed's method: the backend whose GPU reports the lowest utilization (NVML /
    nvidia-smi for local replicas, else the backend's reported DCGM_FI_DEV_GPU_UTIL or
    pagedserve:gpu_utilization_perc). Kept for comparison: utilization saturates at 100% as
    soon as a GPU runs any batch, so it cannot tell a busy replica from a drowning one, and
    between two polls every request herds to the same 'least busy' GPU. Ties rotate."""

    name = "gpu_util"
    needs_gpu_util = True

    def choose(self, req, candidates):
        return self.pick_min(candidates, lambda b: b.gpu_util if b.gpu_util is not None else 0.0)


def _hash64(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class PrefixAffinity(Policy):
    """Consistent hashing with bounded loads (Mirrokni et al.) on the request's affinity key:
    the `x-session-id` header, else the OpenAI `user` field, else the first characters of the
    prompt. The same key lands on the same replica (prefix-cache hits) unless that replica
    already holds more than `load_factor` x its fair share of in-flight requests; then the
    request walks the ring to the next replica under the bound."""

    name = "prefix_affinity"

    def __init__(self, load_factor: float = 1.25, vnodes: int = 64, slack: float = 0) -> None:
        if load_factor < 1.0:
            raise ValueError("load_factor must be >= 1")
        self.load_factor = load_factor
        self.slack = slack
        self.vnodes = int(vnodes)
        self._ring_urls: tuple = ()
        self._ring_keys: list[int] = []
        self._ring_nodes: list[str] = []

    def _ring(self, candidates: Sequence[Backend]) -> None:
        urls = tuple(sorted(b.url for b in candidates))
        if urls == self._ring_urls:
            return
        points = sorted((_hash64(f"{u}#{i}"), u) for u in urls for i in range(self.vnodes))
        self._ring_keys = [p[0] for p in points]
        self._ring_nodes = [p[1] for p in points]
        self._ring_urls = urls

    def choose(self, req, candidates):
        if len(candidates) == 1:
            return candidates[0]
        if req.affinity_key is None:
            return min(candidates, key=lambda b: b.inflight)
        # The ring holds the candidates only: a down replica's keys move to their ring
        # neighbours and come back when it does (the ring is rebuilt on a membership change).
        self._ring(candidates)
        by_url = {b.url: b for b in candidates}
        total = sum(b.inflight for b in candidates)
        bound = math.ceil(self.load_factor * (total + 1) / len(candidates) + self.slack)
        n = len(self._ring_keys)
        i = bisect.bisect(self._ring_keys, _hash64(req.affinity_key)) % n
        seen = set()
        for step in range(n):
            url = self._ring_nodes[(i + step) % n]
            if url in seen:
                continue
            seen.add(url)
            b = by_url[url]
            if b.inflight + 1 <= bound:
                return b
            if len(seen) == len(by_url):
                break
        return min(candidates, key=lambda b: b.inflight)


POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastOutstanding, EngineLoad, PrefixAffinity, GpuUtil)
}

# The winner of benchmarks/router_policies.py (see README "Cluster").
DEFAULT_POLICY = "least_outstanding"


def make_policy(name: str, **kwargs) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return cls(**kwargs)
