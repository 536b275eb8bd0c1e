"""`pagedserve bench serve` against a real `pagedserve serve` on the default model (a short sweep)."""
from __future__ import annotations

import json

import pytest

from tests.servers import running_server


@pytest.fixture(scope="module")
def real_server():
    with running_server(["--max-model-len", "512", "--kv-cache-memory", "0.25", "--max-num-seqs", "16"]) as srv:
        yield srv.url


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
