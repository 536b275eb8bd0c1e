"""Tensor parallelism on CPU (gloo): TP=2 gives TP=1's greedy tokens (default model, tiny Qwen2/Llama/
MQA configs), the partition arithmetic (uneven heads, GQA, replicated KV heads, padded vocabulary),
the server with --tensor-parallel-size 2, a killed worker (a clear error / 503, no hang), no orphans.

Each TP=2 engine is one extra process; engines are shared per module where the tests allow.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from pagedserve.distributed.executor import TensorParallelWorkerError
from pagedserve.distributed.partition import chunks, plan_shards
from pagedserve.errors import ConfigError
from pagedserve.llm import LLM
from pagedserve.ports import free_port
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.launch import ServerProcess
from tests.tiny_models import tiny_model_dir

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
PREFIX = ("You are a careful assistant. Answer briefly and precisely, using plain words, and never more than "
          "one sentence. ")
PROMPTS = [
    "The capital of France is",
    PREFIX + "Question: what colour is the sky on a clear day? Answer:",
    "1, 2, 3, 4,",
    # Longer than max_num_batched_tokens=32: prefilled in chunks.
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who "
    "repaired every clock in the valley, and one winter night a stranger knocked on his door carrying",
]
PROMPTS_AGAIN = [PREFIX + "Question: how many legs does a spider have? Answer:", PROMPTS[3] + " a box"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                continue
    return out


def _wait_gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


# -- partition arithmetic ------------------------------------------------------------------------------

def test_chunks_uneven():
    assert chunks(3, 2) == [(0, 2), (2, 1)]
    assert chunks(8, 4) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert chunks(5, 3) == [(0, 2), (2, 2), (4, 1)]


def test_smollm_split_by_kv_groups_unevenly():
    s0, s1 = plan_shards(num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152, tp=2)
    assert (s0.kv_start, s0.kv_count, s0.q_start, s0.q_count) == (0, 2, 0, 6)
    assert (s1.kv_start, s1.kv_count, s1.q_start, s1.q_count) == (2, 1, 6, 3)
    assert (s0.inter_start, s0.inter_count, s1.inter_start, s1.inter_count) == (0, 768, 768, 768)
    assert s0.vocab_padded == s1.vocab_padded == 24576 and s1.vocab_start == 24576
    # Every query head sits with the KV head it reads (group of 3).
    for s in (s0, s1):
        assert {q // 3 for q in range(s.q_start, s.q_start + s.q_count)} == set(range(s.kv_start, s.kv_start + s.kv_count))


def test_fewer_kv_heads_than_ranks_replicates():
    shards = plan_shards(num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=64, vocab_size=100, tp=4)
    assert [(s.kv_start, s.kv_count) for s in shards] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert [(s.q_start, s.q_count) for s in shards] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    mqa = plan_shards(num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=64, vocab_size=100, tp=2)
    assert [(s.kv_start, s.kv_count, s.q_start, s.q_count) for s in mqa] == [(0, 1, 0, 2), (0, 1, 2, 2)]


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 4), (6, 2, 4), (4, 2, 3)])
def test_impossible_splits_refused(heads, kv, tp):
    with pytest.raises(ConfigError, match=f"tensor_parallel_size={tp} cannot split"):
        plan_shards(num_heads=heads, num_kv_heads=kv, head_dim=8, intermediate_size=64, vocab_size=100, tp=tp)


def test_padded_vocab_and_weight_slices_rebuild_the_full_computation():
    """Column shards concatenate to the full output, row shards sum to it, the bias counts once."""
    g = torch.Generator().manual_seed(0)
    nh, nkv, hd, inter, vocab, hidden = 6, 3, 4, 10, 10, 8
    shards = plan_shards(nh, nkv, hd, inter, vocab, tp=2)
    assert [(s.vocab_start, s.vocab_count, s.vocab_padded) for s in shards] == [(0, 5, 5), (5, 5, 5)]
    s3 = plan_shards(nh, nkv, hd, inter, vocab, tp=3)
    assert [(s.vocab_start, s.vocab_count, s.vocab_padded) for s in s3] == [(0, 4, 4), (4, 4, 4), (8, 2, 4)]
    emb = torch.randn(vocab, hidden, generator=g)
    pieces = [s.shard_hf_tensor("embed_tokens.weight", emb) for s in s3]
    assert all(p.shape == (4, hidden) for p in pieces) and torch.equal(pieces[2][2:], torch.zeros(2, hidden))
    assert torch.equal(torch.cat(pieces)[:vocab], emb)

    x = torch.randn(3, nh * hd, generator=g)
    o_w, o_b = torch.randn(hidden, nh * hd, generator=g), torch.randn(hidden, generator=g)
    q_w = torch.randn(nh * hd, hidden, generator=g)
    full = torch.nn.functional.linear(x, o_w, o_b)
    total = torch.zeros_like(full)
    q_rows = []
    for s in shards:
        xs = x[:, s.q_start * hd:(s.q_start + s.q_count) * hd]  # the rank's attention output columns
        b = s.shard_hf_tensor("layers.0.self_attn.o_proj.bias", o_b)
        assert (b is None) == (s.rank != 0)
        total += torch.nn.functional.linear(xs, s.shard_hf_tensor("layers.0.self_attn.o_proj.weight", o_w), b)
        q_rows.append(s.shard_hf_tensor("layers.0.self_attn.q_proj.weight", q_w))
    torch.testing.assert_close(total, full)
    assert torch.equal(torch.cat(q_rows), q_w)
    # The fused qkv parameter shards as its three parts would.
    qkv = torch.randn((nh + 2 * nkv) * hd, hidden, generator=g)
    s1 = shards[1]
    local = s1.shard_fused_tensor("layers.0.self_attn.qkv_proj.weight", qkv, nh * hd, nkv * hd, inter)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd])
    assert torch.equal(local, torch.cat([q[s1.q_start * hd:], k[s1.kv_start * hd:], v[s1.kv_start * hd:]]))


def test_config_refusals():
    from pagedserve.config import EngineConfig

    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


def test_cluster_placement_gives_each_replica_consecutive_gpus():
    from pagedserve.cluster.launcher import plan_placement

    plans = plan_placement(2, ["0", "1", "2", "3"], [0, 1], tp=2)
    assert [p["env"]["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1", "2,3"]
    assert [p["gpu_index"] for p in plans] == [0, 2]
    with pytest.raises(ConfigError, match="need 6 GPUs but 4"):
        plan_placement(3, ["0", "1", "2", "3"], [0, 1], tp=2)


def test_plan_accepts_uneven_split():
    from pagedserve.plan.memory_plan import PlanInput, make_plan
    from pagedserve.plan.model_shapes import load_shape

    plan = make_plan(PlanInput(model=load_shape(None), gpu=None, tensor_parallel_size=2))
    one = make_plan(PlanInput(model=load_shape(None), gpu=None, tensor_parallel_size=1))
    # The fullest rank holds 2 of the 3 KV heads.
    assert plan.kv_bytes_per_token * 3 == one.kv_bytes_per_token * 2


# -- engines -------------------------------------------------------------------------------------------

ENGINE_KW = dict(max_model_len=256, kv_cache_memory=0.05, max_num_batched_tokens=32, max_num_seqs=8)


@pytest.fixture(scope="module")
def default_pair(model_dir):
    """Greedy tokens of TP=1 and TP=2 on the default model, and the TP=2 engine's stats."""
    out = {}
    for tp in (1, 2):
        llm = LLM(str(model_dir), tensor_parallel_size=tp, **ENGINE_KW)
        try:
            first = _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
            again = _tokens(llm.generate(PROMPTS_AGAIN, GREEDY, use_tqdm=False))
            out[tp] = (first, again, llm.engine.stats())
        finally:
            if tp > 1:
                llm.engine.tp.executor.shutdown()
    return out


def test_default_model_tp2_matches_tp1(default_pair):
    assert default_pair[2][0] == default_pair[1][0]
    assert all(len(t) == 24 for t in default_pair[2][0])


def test_default_model_tp2_prefix_hits_match(default_pair):
    assert default_pair[2][1] == default_pair[1][1]
    stats = default_pair[2][2]
    assert stats["prefix_cache_hits"] >= 32  # the shared PREFIX blocks were reused
    # Per-rank KV cache: rank 0 holds 2 of the 3 KV heads (30 layers, head_dim 64, fp32), so the same
    # 0.05 GiB per rank holds 1.5x the blocks; every rank uses rank 0's (smallest) count.
    per_block = 2 * 30 * 16 * 64 * 4
    assert default_pair[1][2]["num_kv_blocks"] == int(0.05 * 2**30 // (per_block * 3))
    assert stats["num_kv_blocks"] == int(0.05 * 2**30 // (per_block * 2))


@pytest.mark.parametrize("name", ["qwen2", "llama", "mistral", "llama_bias_linear_rope", "llama3_rope_tied"])
def test_tiny_models_tp2_match_tp1(tmp_path, name):
    """qwen2: q/k/v bias; mistral: one KV head replicated on both ranks; bias_linear: row-parallel o/down
    biases (added once); rope_tied: tied embeddings, the LM head shares the embedding shard."""
    d = tiny_model_dir(tmp_path / name, name)
    prompts = ["the quick brown fox", "hello world 你好", "lazy dog. the quick brown fox jumps over the lazy dog"]
    res = {}
    for tp in (1, 2):
        llm = LLM(str(d), tensor_parallel_size=tp, **ENGINE_KW)
        try:
            res[tp] = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
        finally:
            if tp > 1:
                llm.engine.tp.executor.shutdown()
    assert res[2] == res[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tp") / "llama", "llama")


def test_dummy_weights_equal_across_tp(tiny_dir):
    """Dummy weights are drawn full-size and sliced: the TP=2 model is the TP=1 model."""
    res = {}
    for tp in (1, 2):
        llm = LLM(str(tiny_dir), tensor_parallel_size=tp, load_format="dummy", **ENGINE_KW)
        try:
            res[tp] = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=8, temperature=0, logprobs=2),
                                   use_tqdm=False)[0].outputs[0]
        finally:
            if tp > 1:
                llm.engine.tp.executor.shutdown()
    assert res[2].token_ids == res[1].token_ids
    assert res[2].cumulative_logprob == pytest.approx(res[1].cumulative_logprob, abs=1e-4)


def test_shutdown_leaves_no_orphans(tiny_dir):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, **ENGINE_KW)
    pids = llm.engine.tp.executor.pids
    assert len(pids) == 1 and all(_alive(p) for p in pids)
    assert llm.generate("hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.tp.executor.shutdown()
    assert _wait_gone(pids, 10) == []


@pytest.mark.parametrize("when", ["idle", "mid-generation"])
def test_killed_worker_raises_clear_error(tiny_dir, when):
    llm = LLM(str(tiny_dir), tensor_parallel_size=2, **ENGINE_KW)
    ex = llm.engine.tp.executor
    pid = ex.pids[0]
    try:
        params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        if when == "idle":
            os.kill(pid, signal.SIGKILL)
            _wait_gone([pid])
        else:
            threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(TensorParallelWorkerError, match=r"worker rank 1 \(pid \d+\) killed by SIGKILL"):
            for _ in range(50):  # mid-generation: keep the engine busy until the kill lands
                llm.generate(["the quick brown fox"] * 8, params, use_tqdm=False)
        assert time.monotonic() - t0 < 60
    finally:
        ex.shutdown()


def test_cli_refuses_impossible_split_in_one_line(model_dir):
    r = subprocess.run([sys.executable, "-m", "pagedserve.cli", "generate", "hi", "--model", str(model_dir),
                        "--tensor-parallel-size", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "tensor_parallel_size=4 cannot split this model" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


# -- the server ----------------------------------------------------------------------------------------

def _engine_and_workers(url: str) -> tuple[int, list[int]]:
    engine = httpx.get(url + "/health", timeout=30).json()["engine_pid"]
    return engine, _children(engine)


def test_server_tp2_answers_openai_client(default_pair):
    srv = ServerProcess(["--tensor-parallel-size", "2", "--max-model-len", "256", "--kv-cache-memory", "0.05",
                         "--disable-log-requests"])
    srv.start()
    try:
        srv.wait_ready()
        engine, workers = _engine_and_workers(srv.url)
        assert len(workers) == 1
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0)
        r = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[0], max_tokens=24, temperature=0)
        from transformers import AutoTokenizer
        from pagedserve.model.default_model import default_model_dir

        tok = AutoTokenizer.from_pretrained(default_model_dir())
        assert r.choices[0].text == tok.decode(default_pair[1][0][0])
        stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPTS[2], max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == tok.decode(default_pair[1][0][2])
    finally:
        assert srv.terminate() == 0
    assert _wait_gone([engine, *workers]) == []


def test_server_worker_death_gives_503_not_hang(tiny_dir):
    srv = ServerProcess(["--tensor-parallel-size", "2", "--max-model-len", "256", "--kv-cache-memory", "0.05",
                         "--disable-log-requests"], model=str(tiny_dir))
    srv.start()
    try:
        srv.wait_ready()
        engine, workers = _engine_and_workers(srv.url)
        body = {"prompt": "the quick brown fox", "max_tokens": 8}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
        os.kill(workers[0], signal.SIGKILL)
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 503
        msg = r.json()["error"]["message"]
        assert "tensor-parallel worker rank 1" in msg and "killed by SIGKILL" in msg
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503
    finally:
        srv.terminate()
    assert _wait_gone([engine, *workers]) == []


def test_tp_benchmark_arguments_and_splits():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import tp_throughput as bench

    args = bench.parse_args(["--concurrency", "1,64,512", "--skip-offline"])
    assert args.concurrency_levels == [1, 64, 512] and args.skip_offline and not args.dry_run
    assert bench.splits(4) == [(4, 1), (2, 2), (1, 4)]
    assert bench.splits(8) == [(4, 1), (2, 2), (1, 4)]
    assert bench.splits(3) == bench.splits(2) == [(2, 1), (1, 2)]
    assert bench.splits(1) == [(1, 1)] and bench.splits(0) == []
    dry = bench.parse_args(["--dry-run"])
    assert dry.concurrency_levels == [1, 4] and dry.output_len == 8 and bench.visible_devices(dry) == 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--concurrency", "0"])
