"""Prometheus metrics with vLLM's names, so existing dashboards and routers work unchanged.

Gauges (running, waiting, KV usage) come from the engine's per-step stats;
latencies are measured in the server process when outputs arrive, which is
what clients see. Every series carries `model_name`. Metrics new to
pagedserve use the `pagedserve:` prefix.
"""
from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pagedserve.engine.async_engine import EngineObserver
from pagedserve.engine.engine_process import EngineStats

prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# vLLM's buckets.
_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0]
_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
        960.0, 1920.0, 7680.0]
_TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class ServerMetrics(EngineObserver):
    def __init__(self, model_name: str):
        self.registry = reg = CollectorRegistry()
        lab = ["model_name"]
        m = model_name

        def gauge(name, doc):
            return Gauge(name, doc, lab, registry=reg).labels(m)

        def counter(name, doc):
            return Counter(name, doc, lab, registry=reg).labels(m)

        def hist(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=reg).labels(m)

        self.num_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc", "KV-cache usage (the pre-v1 vLLM name).")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Mean time per output token of each request.", _ITL)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency.", _E2E)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Time waiting before first scheduled.", _E2E)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", _TOKENS)
        self.req_gen = hist("vllm:request_generation_tokens", "Generated tokens per request.", _TOKENS)
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=reg)
        self._success_by = {r: self._success.labels(m, r) for r in ("stop", "length", "abort")}
        self._model = m
        self._rejected = Counter("pagedserve:requests_rejected", "Requests refused before reaching the engine.",
                                 ["model_name", "reason"], registry=reg)
        self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Speculative verify rows (one per sequence "
                                                                  "with drafts, per step).")
        self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens", "Drafted tokens.")
        self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens", "Drafted tokens kept.")
        self._spec_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                     "Drafted tokens kept, by position in the draft.", ["model_name", "position"],
                                     registry=reg)
        self.kv_blocks = gauge("pagedserve:kv_cache_blocks", "Blocks in the KV cache.")
        self.engine_up = gauge("pagedserve:engine_up", "1 when the engine is ready, 0 while loading or dead.")
        self._experts = Gauge("pagedserve:expert_layout_info", "A mixture-of-experts model's expert layout "
                              "(labels); absent for dense models.",
                              ["model_name", "experts", "top_k", "intermediate_size", "sparse_layers",
                               "shared_intermediate_size", "weights"], registry=reg)
        self._last = EngineStats()

    def set_expert_layout(self, info: dict) -> None:
        """From the engine's ready message (engine_process.expert_info)."""
        weights = info["layout"].rsplit(", ", 1)[-1]
        self._experts.labels(self._model, *(str(info[k]) for k in (
            "experts", "top_k", "intermediate_size", "sparse_layers", "shared_intermediate_size")), weights).set(1)

    # -- engine observer --------------------------------------------------------
    def on_stats(self, s: EngineStats) -> None:
        self.num_running.set(s.num_running)
        self.num_waiting.set(s.num_waiting)
        self.kv_usage.set(s.kv_cache_usage)
        self.gpu_cache_usage.set(s.kv_cache_usage)
        last = self._last
        if s.num_preemptions > last.num_preemptions:
            self.preemptions.inc(s.num_preemptions - last.num_preemptions)
        if s.prefix_cache_queries > last.prefix_cache_queries:
            self.prefix_queries.inc(s.prefix_cache_queries - last.prefix_cache_queries)
        if s.prefix_cache_hits > last.prefix_cache_hits:
            self.prefix_hits.inc(s.prefix_cache_hits - last.prefix_cache_hits)
        for c, now, was in ((self.spec_drafts, s.spec_num_drafts, last.spec_num_drafts),
                            (self.spec_draft_tokens, s.spec_num_draft_tokens, last.spec_num_draft_tokens),
                            (self.spec_accepted, s.spec_num_accepted_tokens, last.spec_num_accepted_tokens)):
            if now > was:
                c.inc(now - was)
        for pos, n in enumerate(s.spec_accepted_per_pos):
            was = last.spec_accepted_per_pos[pos] if pos < len(last.spec_accepted_per_pos) else 0
            if n > was:
                self._spec_per_pos.labels(self._model, str(pos)).inc(n - was)
        if s != EngineStats():  # a dead engine reports zeros; keep the cumulative baseline
            self._last = s

    def on_output(self, st, num_new_tokens: int, now: float, first: bool, prev: float | None) -> None:
        if first:
            self.prompt_tokens.inc(st.num_prompt)
        if num_new_tokens:
            if prev is None:
                self.ttft.observe(now - st.arrival)
            else:
                self.itl.observe(now - prev)
            self.generation_tokens.inc(num_new_tokens)

    def on_seq_finished(self, reason: str) -> None:
        c = self._success_by.get(reason)
        if c is None:
            c = self._success_by[reason] = self._success.labels(self._model, reason)
        c.inc()

    def on_request_finished(self, request_id: str, st, now: float, reason: str, times) -> None:
        if reason == "abort":
            self.on_seq_finished("abort")
        self.e2e.observe(now - st.arrival)
        self.req_prompt.observe(st.num_prompt)
        self.req_gen.observe(st.num_generated)
        if st.first is not None and st.num_generated > 1:
            self.tpot.observe((st.last - st.first) / (st.num_generated - 1))
        if times and times[1] is not None:
            self.queue_time.observe(max(0.0, times[1] - times[0]))

    # -- server-side ---------------------------------------------------------------
    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
