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
                           long_prompt_len=16, long_output_len=2)


def test_each_pass_draws_fresh_prompts_and_both_engines_the_same():
    a = _args()
    first, again, second = PV.workloads(a, 100, 0), PV.workloads(a, 100, 0), PV.workloads(a, 100, 1)
    assert [w[0] for w in first] == ["fixed b=1", "fixed b=4", "longtail n=3", "ctx4k b=2"]
    assert first == again  # each engine process draws the same prompts for a pass
    assert all(x[1] != y[1] for x, y in zip(first, second))  # no prefix-cache hits across passes


def test_table_ratios_medians_and_spreads():
    ours = {"engine": "pagedserve", "config": "bf16", "shape": "7b",
            "rows": [{"workload": "fixed b=1", "tok_s": 200.0, "spread": 0.05}]}
    peer = {"engine": "vllm", "config": "bf16", "shape": "7b",
            "rows": [{"workload": "fixed b=1", "tok_s": 100.0, "spread": 0.01}]}
    sync = dict(ours, config="bf16-sync")  # our A/B row is compared with vLLM's base config
    rows = PV.table([ours, peer, sync])
    assert [(r["config"], r["ratio"], r["spread"]) for r in rows] == [
        ("bf16", 2.0, [0.05, 0.01]), ("bf16-sync", 2.0, [0.05, 0.01])]
