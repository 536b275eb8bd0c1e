"""`pagedserve bench serve` against a real `pagedserve serve` on the default model (a short sweep)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pagedserve.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    port = free_port()
    exe = Path(sys.executable).with_name("pagedserve")
    cmd = [str(exe), "serve", "--port", str(port), "--max-model-len", "512", "--kv-cache-memory", "0.25",
           "--max-num-seqs", "16"] if exe.exists() else \
          [sys.executable, "-m", "pagedserve.cli", "serve", "--port", str(port), "--max-model-len", "512"]
    log = (tmp_path_factory.mktemp("server") / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("server not healthy within 150 s: " + Path(log.name).read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pagedserve.server") is None, reason="pagedserve serve is not built yet")
def test_short_sweep_against_real_server(real_server, tmp_path, capsys):
    from pagedserve.cli import main

    rc = main(["bench", "serve", "--url", real_server, "--concurrency", "1,4", "--num-prompts", "4",
               "--input-len", "24", "--output-len", "8", "--ignore-eos", "--slo", "ttft=60s", "--timeout", "120",
               "--save-json", str(tmp_path / "r.json"), "--save-csv", str(tmp_path / "r.csv"),
               "--plot", str(tmp_path / "plots"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Concurrency" in out and "Recommendation:" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [lv["load"] for lv in doc["levels"]] == [1, 4]
    for lv in doc["levels"]:
        s = lv["summary"]
        assert s["success_rate"] == 1.0, s["errors"]
        assert s["token_sources"] == {"usage": 4}  # the server honours stream_options.include_usage
        assert s["output_throughput"] > 0 and s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0
        # The server's own histograms (/metrics, vLLM names) saw the same 4 requests and agree.
        assert lv["server"]["ttft_count"] == 4 and lv["server"]["e2e_count"] == 4
        assert s["ttft_ms"]["mean"] == pytest.approx(lv["server"]["ttft_mean_ms"], rel=0.25)
        assert s["e2e_ms"]["mean"] == pytest.approx(lv["server"]["e2e_mean_ms"], rel=0.1)
        for r in lv["requests"]:
            assert r["output_tokens"] == 8  # ignore_eos: exactly max_tokens
            assert r["prompt_tokens"] == r["expected_prompt_len"] == 24  # token-exact random prompts
    assert doc["knee"]["load"] in (1, 4)
    assert (tmp_path / "r.csv").exists()
    for name in ("throughput_vs_load.png", "ttft_vs_load.png", "latency_cdf.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
