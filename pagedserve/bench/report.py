"""Sweep reports: the table, the knee and a recommendation, JSON/CSV files and PNG plots."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pagedserve.bench.metrics import SLO, find_knee, level_ok, percentile

# (header, key path into a level summary, format, priority) — the seed's columns first; when the
# terminal is narrow, columns with the highest priority number are dropped first.
COLUMNS = [
    ("Success", ("success_rate",), "pct", 0),
    ("TTFT P50\nms", ("ttft_ms", "p50"), "ms", 0),
    ("TTFT P99\nms", ("ttft_ms", "p99"), "ms", 0),
    ("Output\ntok/s", ("output_throughput",), "f1", 0),
    ("TPOT P50\nms", ("tpot_ms", "p50"), "ms", 1),
    ("ITL P99\nms", ("itl_ms", "p99"), "ms", 3),
    ("E2E P50\ns", ("e2e_ms", "p50"), "s", 2),
    ("E2E P99\ns", ("e2e_ms", "p99"), "s", 3),
    ("Req/s", ("request_throughput",), "f2", 1),
    ("Total\ntok/s", ("total_token_throughput",), "f1", 4),
    ("Goodput\nreq/s", ("goodput",), "f2", 2),
    ("Achieved\nconc.", ("achieved_concurrency",), "f1", 2),
]


def get(summary: dict, path: tuple) -> float | None:
    v = summary
    for k in path:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v * 100:.1f}%"
    if kind == "ms":
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
    if kind == "s":
        return f"{v / 1000:.2f}"
    if kind == "f2":
        return f"{v:.2f}"
    return f"{v:.1f}"


def load_header(mode: str) -> str:
    return "Concurrency" if mode == "concurrency" else "Rate req/s"


def load_text(mode: str, load: float) -> str:
    if mode == "concurrency":
        return str(int(load))
    return "inf" if math.isinf(load) else f"{load:g}"


def analyze(mode: str, loads: list[float], summaries: list[dict], slo: SLO, slo_target: float,
            min_gain: float = 0.05, client_bound: list[bool] | None = None) -> dict:
    """Knee and one-line production recommendation for a sweep.

    A client-bound level (pagedserve/bench/saturation.py) counts as failing, with reason
    'client': its throughput may be the load generator's ceiling, so the knee search stops
    below it rather than report a plateau the client caused."""
    bound = client_bound or [False] * len(summaries)
    oks = [(False, "client") if b else level_ok(s, slo, slo_target) for s, b in zip(summaries, bound)]
    knee = find_knee(loads, [s["output_throughput"] for s in summaries], [o for o, _ in oks],
                     [r for _, r in oks], min_gain)
    knee["recommendation"] = recommend(mode, loads, summaries, knee, slo, slo_target, min_gain)
    knee["ok"] = [o for o, _ in oks]
    return knee


def recommend(mode: str, loads, summaries, knee: dict, slo: SLO, slo_target: float, min_gain: float) -> str:
    unit = "concurrent requests" if mode == "concurrency" else "requests/s"
    nxt = knee.get("next_index")
    if knee["index"] is None and knee["break_reason"] == "client":
        return (f"No usable level: the load generator itself limited (or failed at) {load_text(mode, loads[nxt])} "
                f"{unit} (see the warnings), so these numbers describe the client, not the server; rerun with "
                f"more --workers or on a machine with more free cores.")
    if knee["index"] is None:
        s = summaries[nxt]
        why = (f"{(1 - s['success_rate']) * 100:.1f}% of requests fail" if knee["break_reason"] == "errors"
               else f"only {s['slo_attainment'] * 100:.0f}% of requests meet the SLO ({slo.describe()})")
        return (f"No tested load is production-safe: even at {load_text(mode, loads[nxt])} {unit}, {why}; "
                f"test lower loads, relax the SLO or add capacity.")
    i = knee["index"]
    s = summaries[i]
    best = max(x["output_throughput"] for x in summaries) or 1.0
    head = (f"Run at most {load_text(mode, loads[i])} {unit} per server: {s['output_throughput']:.1f} output tok/s "
            f"({s['output_throughput'] / best:.0%} of the best measured), TTFT P99 {fmt(get(s, ('ttft_ms', 'p99')), 'ms')} ms")
    if knee["reason"] == "still_rising":
        return head + "; throughput was still rising at the highest load tested — sweep higher to find the knee."
    t = summaries[nxt]
    nl = load_text(mode, loads[nxt])
    if knee["reason"] == "plateau":
        return head + (f"; at {nl} throughput grows < {min_gain:.0%} while TTFT P99 becomes "
                       f"{fmt(get(t, ('ttft_ms', 'p99')), 'ms')} ms — add replicas rather than load.")
    if knee["reason"] == "client":
        return head + (f"; at {nl} the load generator itself was the limit (see the warnings), so the knee "
                       f"search stopped below it — rerun the heavier levels with more --workers to see whether "
                       f"the server scales further.")
    if knee["reason"] == "errors":
        return head + f"; at {nl}, {(1 - t['success_rate']) * 100:.1f}% of requests fail ({_errs(t)})."
    return head + (f"; at {nl} only {t['slo_attainment'] * 100:.0f}% of requests meet the SLO "
                   f"({slo.describe()}, target {slo_target:.0%}).")


def _errs(s: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in s["errors"].items()) or "none"


def print_report(console, mode: str, loads, summaries, analysis: dict, clients: list[dict],
                 servers: list[dict | None] | None = None) -> None:
    from rich import box
    from rich.table import Table

    cols = list(COLUMNS)
    while len(cols) > 4 and 14 + sum(10 for _ in cols) > console.width:  # ~10 columns per metric
        worst = max(c[3] for c in cols)
        cols.remove(next(c for c in reversed(cols) if c[3] == worst))
    table = Table(title="pagedserve bench serve", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column(load_header(mode).replace(" ", "\n"), justify="right", no_wrap=True)
    table.add_column("Reqs", justify="right")
    bound = [bool(c.get("client_bound")) for c in clients] if clients else [False] * len(summaries)
    if clients:
        table.add_column("Client", justify="left", no_wrap=True)
    for name, _, _, _ in cols:
        table.add_column(name, justify="right", no_wrap=True)
    for i, (load, s) in enumerate(zip(loads, summaries)):
        mark = "◀" if analysis["index"] == i else ("✗" if not analysis["ok"][i] else " ")
        style = "bold" if analysis["index"] == i else ("dim" if not analysis["ok"][i] else None)
        flag = (["bound"] if bound[i] else ["ok"]) if clients else []
        table.add_row(f"{load_text(mode, load)} {mark}", str(s["requests"]), *flag,
                      *(fmt(get(s, path), kind) for _, path, kind, _ in cols), style=style)
    console.print(table)
    for load, s in zip(loads, summaries):
        if s["errors"]:
            console.print(f"  errors at {load_header(mode).lower()} {load_text(mode, load)}: {_errs(s)}")
    srcs: dict = {}
    for s in summaries:
        for k, v in s["token_sources"].items():
            srcs[k] = srcs.get(k, 0) + v
    console.print(f"tokens counted from {', '.join(f'{k} ({v} requests)' for k, v in srcs.items()) or '-'}; "
                  f"TPOT = (E2E − TTFT) / (output tokens − 1); ◀ knee, ✗ fails the error budget or SLO"
                  + ("; Client 'bound': the load generator limited the level (never a knee)" if any(bound) else ""))
    if summaries and summaries[0]["slo"]:
        console.print(f"SLO: {summaries[0]['slo']}; goodput = requests/s that met all of it")
    if not clients:
        console.print(f"[bold]Recommendation:[/bold] {analysis['recommendation']}")
        return
    cpu = max((c.get("cpu_peak_fraction") or c["cpu_fraction"] for c in clients), default=0.0)
    lag = max((c["loop_lag_p99_ms"] or 0.0 for c in clients), default=0.0)
    sd = max((c.get("send_delay_p99_ms") or 0.0 for c in clients), default=0.0)
    nw = max((c.get("workers", 1) for c in clients), default=1)
    console.print(f"client overhead ({nw} {'worker process' if nw == 1 else 'worker processes'}): CPU {cpu:.0%} of "
                  f"one core in the busiest second, event-loop lag P99 {lag:.1f} ms, send delay P99 {sd:.1f} ms "
                  f"(worst level)")
    if servers and any(servers):
        parts = []
        for load, s, srv in zip(loads, summaries, servers):
            c_ttft = get(s, ("ttft_ms", "mean"))
            if srv and "ttft_mean_ms" in srv and c_ttft is not None:
                parts.append(f"{load_text(mode, load)}: {c_ttft - srv['ttft_mean_ms']:+.1f}")
        if parts:
            console.print("client TTFT − server's own TTFT (mean ms, from /metrics): " + ", ".join(parts))
    if analysis["index"] is not None:
        console.print(f"knee: {load_header(mode).lower()} {load_text(mode, loads[analysis['index']])} "
                      f"({analysis['reason'].replace('_', ' ')})")
    console.print(f"[bold]Recommendation:[/bold] {analysis['recommendation']}")


def to_json(path: str, config: dict, mode: str, results, summaries, analysis: dict, with_text: bool = False) -> None:
    levels = []
    for res, s in zip(results, summaries):
        levels.append({"mode": mode, "load": _num(res.spec.load), "label": res.spec.label,
                       "started_at": res.started_at, "summary": s, "client": res.client, "server": res.server,
                       "requests": [r.to_dict(with_text) for r in res.records]})
    doc = {"config": config, "mode": mode, "levels": levels,
           "knee": {k: _num(v) for k, v in analysis.items() if k != "ok"}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str))


def _num(v):
    return "inf" if isinstance(v, float) and math.isinf(v) else v


def to_csv(path: str, mode: str, results, summaries) -> list[str]:
    """One row per level at PATH; every request at PATH's stem + '_requests.csv'. Returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [_flatten(s) for s in summaries]
    keys = ["mode", "load"] + [k for k in flat[0] if k not in ("mode", "load")] if flat else []
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for res, row in zip(results, flat):
            w.writerow({"mode": mode, "load": _num(res.spec.load), **row})
    req_path = path.with_name(path.stem + "_requests.csv")
    fields = ["load", "index", "start", "scheduled", "success", "error_kind", "status", "ttft", "tpot", "e2e",
              "itl_mean", "itl_max", "prompt_tokens", "output_tokens", "token_source", "expected_prompt_len",
              "max_tokens", "chunks", "finish_reason", "error"]
    with req_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for res in results:
            for r in res.records:
                d = r.to_dict()
                d["itl_mean"] = sum(r.itl) / len(r.itl) if r.itl else None
                d["itl_max"] = max(r.itl) if r.itl else None
                w.writerow({"load": _num(res.spec.load), **d})
    return [str(path), str(req_path)]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("errors", "token_sources"):
            out.update(_flatten(v, f"{prefix}{k}_"))
        elif isinstance(v, dict):
            out[prefix + k] = ";".join(f"{a}={b}" for a, b in v.items())
        else:
            out[prefix + k] = v
    return out


def plot(out_dir: str, mode: str, loads, summaries, results, analysis: dict) -> list[str]:
    """throughput_vs_load.png, ttft_vs_load.png, latency_cdf.png in out_dir. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xs = [x if not math.isinf(x) else max([y for y in loads if not math.isinf(y)] or [1]) * 2 for x in loads]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    X = [xs[i] for i in order]
    S = [summaries[i] for i in order]
    xlabel = "concurrency" if mode == "concurrency" else "request rate (req/s)"
    logx = len(X) > 2 and min(X) > 0 and max(X) / min(X) >= 8
    knee_x = xs[analysis["index"]] if analysis.get("index") is not None else None
    paths = []

    def finish(ax, name):
        if logx:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_xticks(X, [load_text(mode, loads[i]) for i in order])
        ax.grid(True, alpha=0.3)
        if knee_x is not None:
            ax.axvline(knee_x, color="tab:red", ls="--", lw=1, label=f"knee ({load_text(mode, knee_x)})")
        ax.legend(loc="best")
        p = out / name
        ax.figure.tight_layout()
        ax.figure.savefig(p, dpi=110)
        plt.close(ax.figure)
        paths.append(str(p))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(X, [s["output_throughput"] for s in S], "o-", label="output tok/s")
    ax.plot(X, [s["total_token_throughput"] for s in S], "s--", alpha=0.6, label="total tok/s")
    ax.set_ylabel("tokens / s")
    value_axis(ax, "y", [s["output_throughput"] for s in S] + [s["total_token_throughput"] for s in S], log=False)
    ax.set_title("Throughput vs load")
    finish(ax, "throughput_vs_load.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(X, [get(s, ("ttft_ms", "p50")) for s in S], "o-", label="TTFT P50")
    ax.plot(X, [get(s, ("ttft_ms", "p99")) for s in S], "s-", label="TTFT P99")
    ax.set_ylabel("ms")
    value_axis(ax, "y", [get(s, ("ttft_ms", p)) for s in S for p in ("p50", "p99")])
    ax.set_title("Time to first token vs load")
    finish(ax, "ttft_vs_load.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for j, i in enumerate(order):
        res = results[i]
        color = cmap(j / max(1, len(order) - 1))
        for ax, vals in ((axes[0], [r.ttft for r in res.records if r.success and r.ttft is not None]),
                         (axes[1], [r.e2e for r in res.records if r.success and r.e2e is not None])):
            if vals:
                v = sorted(x * 1000 for x in vals)
                ax.step(v, [(k + 1) / len(v) for k in range(len(v))], where="post", color=color,
                        label=load_text(mode, loads[i]))
    for ax, name in ((axes[0], "TTFT"), (axes[1], "E2E latency")):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests ≤ x")
        value_axis(ax, "x", [x for line in ax.get_lines() for x in line.get_xdata()])
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{name} CDF")
    axes[1].legend(title=xlabel, fontsize=8, loc="lower right")
    fig.tight_layout()
    p = out / "latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))
    return paths


def value_axis(ax, which: str, values, log: bool = True) -> None:
    """Readable numbers on a value axis. Log scale only when the values span ≥ 10x, with major
    ticks at 1-2-5 steps (so at least three labels); otherwise linear, plain numbers, no
    offset. A narrow range on a log axis (e.g. 202-210 ms) has no decade tick and so showed
    no label at all."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    vals = [float(v) for v in values if v is not None and v > 0 and math.isfinite(v)]
    axis = ax.yaxis if which == "y" else ax.xaxis
    label = FuncFormatter(lambda v, _: f"{v:g}")
    if log and vals and max(vals) / min(vals) >= 10:
        (ax.set_yscale if which == "y" else ax.set_xscale)("log")
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    else:
        axis.set_major_locator(MaxNLocator(nbins=6))
    axis.set_major_formatter(label)


__all__ = ["analyze", "print_report", "to_json", "to_csv", "plot", "percentile"]
