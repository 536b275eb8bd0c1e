"""benchmarks/peer_vllm.py's offline repeats: fresh prompts per pass, the same for both engines; medians."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

_spec = importlib.util.spec_from_file_location(
    "peer_vllm", Path(__file__).resolve().parents[1] / "benchmarks" / "peer_vllm.py")
PV = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(PV)


def _args():
    return SimpleNamespace(batches=[1, 4], prompt_len=8, output_len=4, longtail=3, long_batches=[2],
                           long_prompt_lens=[16], long_output_len=2)


def test_each_pass_draws_fresh_prompts_and_both_engines_the_same():
    a = _args()
    first, again, second = PV.workloads(a, 100, 0), PV.workloads(a, 100, 0), PV.workloads(a, 100, 1)
    assert [w[0] for w in first] == ["fixed b=1", "fixed b=4", "longtail n=3", "ctx16 b=2"]
    assert first == again  # each engine process draws the same prompts for a pass
    assert all(x[1] != y[1] for x, y in zip(first, second))  # no prefix-cache hits across passes


def test_qwen_rows_and_checkpoint(tmp_path):
    """--qwen: 4K and 16K prompt rows; the dummy QWen checkpoint's configuration_qwen.py (ours) loads through
    transformers' remote-code path as vLLM's config loader uses it, with the 7B sizes."""
    import json

    from transformers import AutoConfig

    a = SimpleNamespace(batches=[1, 32, 256], prompt_len=8, output_len=4, longtail=0, long_batches=[1],
                        long_prompt_lens=[4096, 16384], long_output_len=2)
    rows = PV.workloads(a, PV.QWEN_TOKENIZER_SIZE, 0)
    assert [w[0] for w in rows] == ["fixed b=1", "fixed b=32", "fixed b=256", "ctx4k b=1", "ctx16k b=1"]
    assert len(rows[-1][1][0]) == 16384 and max(max(p) for _, ps, _ in rows for p in ps) < 151851
    d = PV.model_dir("qwen7b")
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=True)
    assert type(cfg).__name__ == "QWenConfig" and (cfg.hidden_size, cfg.intermediate_size, cfg.seq_length) == (
        4096, 22016, 8192)
    assert json.loads((d / "config.json").read_text())["architectures"] == ["QWenLMHeadModel"]
    assert (d / "qwen.tiktoken").stat().st_size > 2_000_000


def test_table_ratios_medians_and_spreads():
    ours = {"engine": "pagedserve", "config": "bf16", "shape": "7b",
            "rows": [{"workload": "fixed b=1", "tok_s": 200.0, "spread": 0.05}]}
    peer = {"engine": "vllm", "config": "bf16", "shape": "7b",
            "rows": [{"workload": "fixed b=1", "tok_s": 100.0, "spread": 0.01}]}
    sync = dict(ours, config="bf16-sync")  # our A/B row is compared with vLLM's base config
    rows = PV.table([ours, peer, sync])
    assert [(r["config"], r["ratio"], r["spread"]) for r in rows] == [
        ("bf16", 2.0, [0.05, 0.01]), ("bf16-sync", 2.0, [0.05, 0.01])]


def _gone(pid: int, within: float = 10.0) -> bool:
    import os
    import time

    end = time.time() + within
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_run_bounded_stops_the_whole_group_on_timeout(tmp_path):
    """subprocess.run's timeout killed the child alone; a grandchild (an engine core, a server) lived on."""
    import subprocess
    import sys

    import pytest

    pid_file = tmp_path / "pid"
    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)")
    with pytest.raises(subprocess.TimeoutExpired):
        PV.run_bounded([sys.executable, "-c", code], timeout=3)
    assert _gone(int(pid_file.read_text()))


def test_bench_agreement_stops_its_server_on_sigterm(tmp_path):
    """A harness's SIGTERM unwinds bench_agreement.py, whose server (its own session) is stopped with it."""
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_agreement.py"
    p = subprocess.Popen([sys.executable, str(script), "--peer", "none", "--concurrency", "1", "--output-len", "4000",
                          "--mock-itl", "0.05", "--mock-processes", "1", "--out", str(tmp_path / "a.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    for line in p.stdout:  # "$ ... mock_openai_server.py --port N ..." comes first
        m = re.search(r"mock_openai_server\.py --port (\d+)", line)
        if m:
            port = int(m.group(1))
            break
    assert port, "bench_agreement did not start its mock server"
    deadline = time.time() + 30
    while time.time() < deadline:  # wait until the server listens
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        raise AssertionError("the mock server never listened")
    time.sleep(1.0)  # the load is running
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.2)
        except OSError:
            return  # nobody listens: the server is gone
    raise AssertionError("the mock server outlived bench_agreement.py")


def test_dtype_agreement_counts():
    """benchmarks/qwen_dtype_agreement.py: identical outputs, first-token agreement, common-prefix length."""
    spec = importlib.util.spec_from_file_location(
        "qwen_dtype_agreement", Path(__file__).resolve().parents[1] / "benchmarks" / "qwen_dtype_agreement.py")
    QA = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(QA)
    bf16 = {"128": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    fp16 = {"128": [[1, 2, 3, 4], [5, 6, 9, 9]]}
    assert QA.compare(bf16, fp16) == {"128": {"requests": 2, "identical": 0.5, "first_token": 1.0,
                                              "mean_common_prefix": 3.0, "output_len": 4}}
    assert QA.prompts([8, 40], 2, 100) == QA.prompts([8, 40], 2, 100)  # both dtypes get the same prompts
