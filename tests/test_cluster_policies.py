"""Routing policies, request parsing and metric parsing, on fake backends (no I/O)."""
from __future__ import annotations

import collections
import json

import pytest

from pagedserve.cluster.backends import Backend, BackendPool, normalize_url
from pagedserve.cluster.launcher import plan_placement, replica_argv
from pagedserve.cluster.policies import DEFAULT_POLICY, POLICIES, RequestInfo, make_policy
from pagedserve.cluster.router import RouterConfig, parse_request
from pagedserve.cluster.scrape import parse_engine_metrics


def backends(n: int) -> list[Backend]:
    return [Backend(f"http://10.0.0.{i}:8000") for i in range(n)]


def test_registry_and_default():
    assert set(POLICIES) == {"round_robin", "least_outstanding", "engine_load", "prefix_affinity", "gpu_util"}
    assert DEFAULT_POLICY in POLICIES
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest")


def test_round_robin_cycles():
    bs = backends(3)
    p = make_policy("round_robin")
    picks = [p.choose(RequestInfo(), bs).url for _ in range(6)]
    assert picks == [b.url for b in bs] * 2


def test_least_outstanding_counts_requests_then_tokens():
    a, b, c = backends(3)
    a.inflight, b.inflight, c.inflight = 3, 1, 2
    p = make_policy("least_outstanding")
    assert p.choose(RequestInfo(), [a, b, c]) is b
    # Same request count: the one holding fewer estimated tokens (a few long generations weigh more).
    b.inflight = 2
    b.inflight_tokens, c.inflight_tokens = 1800, 300
    assert p.choose(RequestInfo(), [a, b, c]) is c
    # Ties rotate instead of always hitting the first backend.
    for x in (a, b, c):
        x.inflight, x.inflight_tokens = 0, 0
    assert {p.choose(RequestInfo(), [a, b, c]).url for _ in range(3)} == {a.url, b.url, c.url}


def test_engine_load_uses_scraped_metrics_corrected_by_router_traffic():
    a, b = backends(2)
    p = make_policy("engine_load")
    assert p.needs_metrics
    # Before any scrape: router-side counts.
    a.inflight, b.inflight = 2, 1
    assert p.choose(RequestInfo(), [a, b]) is b
    # Scraped: b is busy with traffic from elsewhere (another router), a is idle.
    a.running, a.waiting, a.inflight_at_scrape = 1.0, 0.0, 2
    b.running, b.waiting, b.inflight_at_scrape = 6.0, 3.0, 1
    assert p.choose(RequestInfo(), [a, b]) is a
    # Since the scrape this router sent 12 more requests to a: the estimate moves with them.
    a.inflight = 14
    assert p.choose(RequestInfo(), [a, b]) is b
    # A nearly full KV cache is avoided.
    a.inflight, b.inflight = 2, 1
    a.running, b.running, a.waiting, b.waiting = 2.0, 2.0, 0.0, 0.0
    a.inflight_at_scrape, b.inflight_at_scrape = 2, 1
    a.kv_usage, b.kv_usage = 0.99, 0.3
    assert p.choose(RequestInfo(), [a, b]) is b


def test_gpu_util_picks_lowest_and_rotates_ties():
    a, b, c = backends(3)
    p = make_policy("gpu_util")
    a.gpu_util, b.gpu_util, c.gpu_util = 80.0, 35.0, 100.0
    assert p.choose(RequestInfo(), [a, b, c]) is b
    a.gpu_util = b.gpu_util = c.gpu_util = 100.0  # saturated: it cannot tell them apart
    assert len({p.choose(RequestInfo(), [a, b, c]).url for _ in range(3)}) == 3


def test_prefix_affinity_sticky_balanced_bounded_and_consistent():
    bs = backends(4)
    p = make_policy("prefix_affinity", load_factor=1.25)
    keys = [f"system prompt {i}" for i in range(400)]
    first = {k: p.choose(RequestInfo(affinity_key=k), bs).url for k in keys}
    assert all(p.choose(RequestInfo(affinity_key=k), bs).url == first[k] for k in keys)  # sticky
    spread = collections.Counter(first.values())
    assert len(spread) == 4 and min(spread.values()) > 40  # every replica owns a share of the keys
    # Bounded load: the owner of a key is skipped once it holds more than its share.
    owner = next(b for b in bs if b.url == first[keys[0]])
    owner.inflight = 10
    for b in bs:
        if b is not owner:
            b.inflight = 2
    other = p.choose(RequestInfo(affinity_key=keys[0]), bs)
    assert other is not owner
    total = sum(b.inflight for b in bs)
    assert other.inflight + 1 <= -(-1.25 * (total + 1) // 4)
    # Consistency: a backend leaving moves only its own keys.
    for b in bs:
        b.inflight = 0
    gone = bs[1]
    rest = [b for b in bs if b is not gone]
    after = {k: p.choose(RequestInfo(affinity_key=k), rest).url for k in keys}
    moved = [k for k in keys if after[k] != first[k]]
    assert moved and all(first[k] == gone.url for k in moved)
    # No key (empty prompt, no user, no session): least loaded.
    bs[2].inflight = -1
    assert p.choose(RequestInfo(affinity_key=None), bs) is bs[2]


def test_parse_request_fields():
    cfg = RouterConfig(prefix_chars=16, default_max_tokens=100)
    body = json.dumps({"model": "m", "messages": [{"role": "system", "content": "You are terse." * 4},
                                                  {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_completion_tokens": 50, "stream": True}).encode()
    info = parse_request("/v1/chat/completions", body, None, cfg)
    assert info.model == "m" and info.stream and info.max_tokens == 50
    assert info.prompt_tokens > 10 and info.affinity_key == "system:You are t"
    info = parse_request("/v1/completions", json.dumps({"prompt": [1, 2, 3, 4], "user": "alice", "n": 2}).encode(), None, cfg)
    assert info.prompt_tokens == 4 and info.max_tokens == 200 and info.affinity_key == "alice" and not info.stream
    info = parse_request("/v1/completions", json.dumps({"prompt": "abc", "user": "alice"}).encode(), "sess-1", cfg)
    assert info.affinity_key == "sess-1"  # the x-session-id header wins
    info = parse_request("/v1/completions", b"not json", None, cfg)
    assert info.model is None and info.max_tokens == 100


def test_parse_engine_metrics_vllm_names():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B"} 2.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B"} 0.61
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="x"} 0.0
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-1"} 97 1700000000000
"""
    m = parse_engine_metrics(text)
    assert m == {"running": 9.0, "waiting": 3.0, "kv_usage": 0.61, "gpu_util": 97.0}
    assert parse_engine_metrics("sglang:num_running_reqs 4\nsglang:num_queue_reqs 1\n") == {"running": 4.0, "waiting": 1.0}


def test_pool_ejection_backoff_and_readmission(monkeypatch):
    import pagedserve.cluster.backends as bmod

    now = [1000.0]
    monkeypatch.setattr(bmod.time, "monotonic", lambda: now[0])
    pool = BackendPool(eject_base_s=1.0, failures_to_eject=3)
    b = pool.add("127.0.0.1:9")
    assert b.url == "http://127.0.0.1:9" and pool.healthy == [b]
    pool.record_failure(b, "HTTP 500")
    pool.record_failure(b, "HTTP 500")
    assert b.healthy
    pool.record_failure(b, "HTTP 500")
    assert not b.healthy and pool.healthy == []
    assert not pool.mark_up(b)  # still within its ejection period
    now[0] += 1.1
    assert pool.mark_up(b) and pool.healthy == [b]
    pool.record_failure(b, "refused", connect=True)  # connect errors eject at once, for twice as long
    assert not b.healthy and b.ejected_until - now[0] == pytest.approx(2.0)
    assert normalize_url("http://h:1/") == "http://h:1"
    with pytest.raises(ValueError):
        normalize_url("ftp://h")


def test_replica_argv_and_placement():
    argv = ["--max-model-len", "512", "--replicas", "2", "--port=9000", "--host", "0.0.0.0",
            "--router-policy", "round_robin", "--data-parallel-size=2", "--kv-cache-memory", "0.25", "model.gguf"]
    assert replica_argv(argv) == ["--max-model-len", "512", "--kv-cache-memory", "0.25", "model.gguf"]
    cpu = plan_placement(2, [], [0, 1, 2, 3])
    assert [p["cores"] for p in cpu] == [[0, 1], [2, 3]]
    assert cpu[0]["env"]["PAGEDSERVE_NUM_THREADS"] == "2" and cpu[0]["env"]["CUDA_VISIBLE_DEVICES"] == ""
    gpu = plan_placement(4, ["0", "1", "2", "3"], [0, 1])
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in gpu] == ["0", "1", "2", "3"] and gpu[2]["gpu_index"] == 2
    assert [p["cores"] for p in plan_placement(3, [], [0, 1])] == [[0], [1], [0]]
