"""The offline throughput benchmark end to end in --quick mode: every scenario, HF included, sane JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("offline_throughput", ROOT / "benchmarks" / "offline_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_offline_throughput_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the script sets it for its own process; keep ours clean
    out = tmp_path / "offline.json"
    assert _script().main(["--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for text in ("out tok/s", "vs HF", "KV eff.", "pagedserve", "hf"):
        assert text in table, text

    doc = json.loads(out.read_text())
    assert doc["meta"]["quick"] is True and doc["meta"]["threads"] >= 1
    by_scenario = {}
    for sc in doc["scenarios"]:
        by_scenario.setdefault(sc["workload"]["scenario"], []).append(sc)
    assert set(by_scenario) == {"fixed", "longtail", "shared-prefix"}

    for sc in doc["scenarios"]:
        w, results = sc["workload"], sc["results"]
        assert "hf" in results and "pagedserve" in results
        for label, r in results.items():
            # Exact output lengths (ignore_eos): both engines deliver exactly the useful tokens asked for.
            assert r["output_tokens"] == w["output_tokens"] > 0, label
            assert r["computed_tokens"] >= r["output_tokens"]
            assert r["elapsed_s"] > 0 and r["output_tok_s"] > 0 and r["steps"] > 0
            for key in ("kv_efficiency", "kv_efficiency_min", "kv_efficiency_static"):
                assert 0 < r[key] <= 1, (label, key, r[key])
            assert r["kv_efficiency_min"] <= r["kv_efficiency"]
            assert 0 < r["kv_peak_tokens"] and 0 < r["kv_peak_tokens_static"] and r["cpu_s"] > 0
        assert sc["ratio_vs_hf"]["hf"] == 1.0
        assert all(x > 0 for x in sc["ratio_vs_hf"].values())

    # Long tail: HF's static batches run every row to the batch's longest output.
    lt = by_scenario["longtail"][0]
    w = lt["workload"]
    assert w["output_len"]["min"] < w["output_len"]["max"]
    assert lt["results"]["hf"]["computed_tokens"] > lt["results"]["hf"]["output_tokens"]
    assert lt["results"]["pagedserve"]["computed_tokens"] == w["output_tokens"]

    # Shared prefix: prefix caching on finds the system prompt, off never does.
    sp = by_scenario["shared-prefix"][0]["results"]
    assert sp["pagedserve"]["prefix_cache_hit_rate"] > 0
    assert sp["pagedserve-no-prefix-cache"]["prefix_cache_hit_rate"] is None
