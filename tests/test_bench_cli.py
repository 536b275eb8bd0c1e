"""`pagedserve bench serve` end to end against the mock server: table, JSON, CSV and plots."""
from __future__ import annotations

import csv
import json

import pytest

from pagedserve.cli import build_parser, main
from tests.test_bench_loadgen import mock_server


def test_bench_serve_sweep_writes_every_report(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"question {i} [[http500]]" if i == 3 else f"question {i}"})
                              for i in range(8)))
    with mock_server("--ttft", "0.05", "--itl", "0.01", "--tokens-per-chunk", "2") as url:
        rc = main(["bench", "serve", "--url", url, "--dataset", f"jsonl:{data}", "--output-len", "6",
                   "--concurrency", "1,2,4", "--num-prompts", "8", "--slo", "ttft=2s,e2e=5s", "--warmup", "1",
                   "--save-json", str(tmp_path / "r.json"), "--save-csv", str(tmp_path / "r.csv"),
                   "--plot", str(tmp_path / "plots"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("Concurrency", "Success", "TTFT P50", "TTFT P99", "Output", "tok/s", "Recommendation:",
                 "client overhead", "http_500", "server's own TTFT"):
        assert text in out, text
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["mode"] == "concurrency" and [lv["load"] for lv in doc["levels"]] == [1, 2, 4]
    assert doc["config"]["model"] == "mock"
    for lv in doc["levels"]:
        assert len(lv["requests"]) == 8  # every request has a record, the failed one included
        assert lv["summary"]["errors"] == {"http_500": 1}  # the shuffled stream repeats the file: one 500 per 8
        ok = [r for r in lv["requests"] if r["success"]]
        assert all(r["output_tokens"] == 6 and r["chunks"] == 3 and r["token_source"] == "usage" for r in ok)
        assert {"ttft", "tpot", "itl", "e2e", "send_delay", "error_kind"} <= set(lv["requests"][0])
        assert "cpu_peak_fraction" in lv["client"]
        # The server's own view (/metrics) covers the level's 7 completed requests; the client adds little.
        assert lv["server"]["ttft_count"] == 7
        assert 0 <= lv["summary"]["ttft_ms"]["mean"] - lv["server"]["ttft_mean_ms"] < 30
    # 1 -> 7/8 success is below the 99% error budget: no level is production-safe.
    assert doc["knee"]["reason"] == "none_ok"
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["load"] for r in rows] == ["1", "2", "4"] and "ttft_ms_p99" in rows[0]
    assert len(list(csv.DictReader((tmp_path / "r_requests.csv").open()))) == 24
    for name in ("throughput_vs_load.png", "ttft_vs_load.png", "latency_cdf.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    # `bench report` re-judges the saved run: the same numbers, another SLO.
    capsys.readouterr()
    assert main(["bench", "report", str(tmp_path / "r.json"), "--slo", "ttft=1ms",
                 "--save-csv", str(tmp_path / "again.csv")]) == 0
    out = capsys.readouterr().out
    assert "SLO: ttft≤1ms" in out
    # Nothing is recommended: every level misses a 1 ms TTFT, or, when the machine is busy enough for the
    # saved client stats to show the load generator as the limit, no level is usable at all.
    assert "No tested load is production-safe" in out or "No usable level: the load generator" in out
    again = list(csv.DictReader((tmp_path / "again.csv").open()))
    assert [r["output_throughput"] for r in again] == [r["output_throughput"] for r in rows]
    assert all(float(r["goodput"]) == 0 for r in again)


def test_bench_serve_rate_mode_and_knee(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"q {i}"}) for i in range(4)))
    with mock_server("--ttft", "0.02", "--itl", "0.005") as url:
        rc = main(["bench", "serve", "--url", url + "/v1", "--endpoint", "chat", "--dataset", f"jsonl:{data}",
                   "--output-len", "4", "--request-rate", "20,inf", "--num-prompts", "10,6", "--burstiness", "2",
                   "--save-json", str(tmp_path / "r.json"), "--no-progress", "--warmup", "0"])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [lv["load"] for lv in doc["levels"]] == [20.0, "inf"]
    assert all(lv["summary"]["success_rate"] == 1.0 for lv in doc["levels"])
    assert [len(lv["requests"]) for lv in doc["levels"]] == [10, 6]  # one count per level
    bound = [lv["load"] for lv in doc["levels"] if lv["client"]["client_bound"]]
    if bound:  # a starved shared box: a client-bound level is never the knee
        assert doc["knee"]["load"] not in bound and doc["knee"]["reason"] != "still_rising"
    else:
        assert doc["knee"]["reason"] in ("plateau", "still_rising")
    assert "Rate" in capsys.readouterr().out


def test_bench_serve_unreachable_server_is_one_clear_error(capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--dataset", "jsonl:/nonexistent",
               "--concurrency", "1", "--no-progress"])
    assert rc == 1
    assert "cannot reach the server" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "1,x"], "not a number"),
    (["--concurrency", "0"], "must be > 0"),
    (["--slo", "ttft=fast"], "bad duration"),
    (["--concurrency", "1,2", "--num-prompts", "1,2,3"], "3 counts for 2 load levels"),
    (["--workers", "0"], "--workers must be ≥ 1"),
    (["--workers", "many"], "not a number or 'auto'"),
    (["--request-rate", "inf", "--duration", "5"], "needs --num-prompts"),
])
def test_bench_serve_bad_flags(argv, message, capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", *argv]) == 1
    assert message in capsys.readouterr().err


def test_bench_cli_registers_both_subcommands():
    parser = build_parser()
    args = parser.parse_args(["bench", "serve", "--concurrency", "1,2"])
    assert args.func.__module__ == "pagedserve.bench.serve"
    args = parser.parse_args(["bench", "throughput"])
    assert callable(args.func)



@pytest.mark.parametrize("ready_timeout", [60, 0])
def test_bench_serve_waits_while_the_server_is_loading(ready_timeout, capsys):
    """A server answers 503 while its model loads: the warm-up retries (up to --ready-timeout) instead of the
    sweep counting the 503s as failed requests."""
    with mock_server("--ttft", "0.01", "--itl", "0.01", "--loading-requests", "3") as url:
        rc = main(["bench", "serve", "--url", url, "--output-len", "4", "--concurrency", "2", "--num-prompts", "4",
                   "--ready-timeout", str(ready_timeout), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr()
    text = out.out + out.err
    if ready_timeout:
        assert "warm-up request failed" not in text and "http_503" not in text
    else:  # no waiting: the warm-up fails and two measured requests meet the remaining 503s
        assert "warm-up request failed: http_503" in text and "http_503" in out.out
