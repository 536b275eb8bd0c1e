"""Per-run statistics, SLOs and goodput, and the knee of a load sweep. Pure functions, no I/O."""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from pagedserve.bench.client import RequestRecord
from pagedserve.errors import InvalidRequestError

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: list[float], scale: float = 1000.0) -> dict:
    """mean / P50 / P90 / P99 / max, scaled (seconds -> ms by default); None entries for no data."""
    out: dict = {"n": len(values)}
    out["mean"] = sum(values) / len(values) * scale if values else None
    for p in PERCENTILES:
        v = percentile(values, p)
        out[f"p{p}"] = v * scale if v is not None else None
    out["max"] = max(values) * scale if values else None
    return out


# -- SLOs ---------------------------------------------------------------------------
_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}
SLO_KEYS = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class SLO:
    """Per-request latency limits in seconds (None = no limit)."""

    ttft: float | None = None
    tpot: float | None = None
    itl: float | None = None  # applies to every inter-token gap of the request
    e2e: float | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, k) is not None for k in SLO_KEYS)

    def met_by(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        if self.ttft is not None and (r.ttft is None or r.ttft > self.ttft):
            return False
        if self.tpot is not None and r.tpot is not None and r.tpot > self.tpot:
            return False
        if self.itl is not None and r.itl and max(r.itl) > self.itl:
            return False
        if self.e2e is not None and (r.e2e is None or r.e2e > self.e2e):
            return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{k}≤{_fmt_seconds(getattr(self, k))}" for k in SLO_KEYS if getattr(self, k) is not None)


def _fmt_seconds(s: float) -> str:
    return f"{s:g}s" if s >= 1 else f"{s * 1000:g}ms"


def parse_duration(text: str) -> float:
    """'500ms', '0.5s', '2m', '50' (bare numbers are milliseconds, as in vLLM's --goodput) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([a-zµ]*)\s*", text)
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        raise InvalidRequestError(f"bad duration {text!r}", param="slo", hint="use e.g. 500ms, 0.5s, 2m")
    return float(m.group(1)) * _UNITS.get(m.group(2) or "ms")


def parse_slo(text: str | None) -> SLO:
    """'ttft=500ms,tpot=50ms,e2e=10s' -> SLO."""
    if not text:
        return SLO()
    kw = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        key = key.strip().lower().replace("e2el", "e2e")
        if not sep or key not in SLO_KEYS:
            raise InvalidRequestError(f"bad SLO term {part!r}", param="slo",
                                      hint="use ttft=500ms,tpot=50ms,itl=100ms,e2e=10s")
        kw[key] = parse_duration(val)
    return SLO(**kw)


# -- one run ------------------------------------------------------------------------
def summarize(records: list[RequestRecord], duration: float, slo: SLO | None = None) -> dict:
    """The statistics of one run (one load level). Latencies in ms, throughputs per second.

    Failed requests count in the success rate, the error table and the achieved
    concurrency, never in the latency distributions or token throughput.
    """
    slo = slo or SLO()
    ok = [r for r in records if r.success]
    n = len(records)
    duration = max(duration, 1e-9)
    errors = Counter(r.error_kind for r in records if not r.success)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(1 for r in ok if slo.met_by(r)) if slo else len(ok)
    busy = sum(r.e2e or 0.0 for r in records)
    return {
        "requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "success_rate": len(ok) / n if n else 0.0,
        "errors": dict(sorted(errors.items())),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "mean_input_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "token_sources": dict(Counter(r.token_source for r in ok)),
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([x for r in ok for x in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
        "slo": slo.describe() or None,
        "slo_attainment": good / n if n else 0.0,
        "goodput": good / duration,  # requests per second that succeeded within every SLO
        "achieved_concurrency": busy / duration,  # Little's law: mean requests in flight
        "max_concurrency": _max_in_flight(records),
    }


def _max_in_flight(records: list[RequestRecord]) -> int:
    events = sorted([(r.start, 1) for r in records] + [(r.start + (r.e2e or 0.0), -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


# -- the sweep's knee ---------------------------------------------------------------
def level_ok(summary: dict, slo: SLO | None, slo_target: float = 0.99, min_success: float = 0.99) -> tuple[bool, str]:
    """Whether a level is production-worthy: few errors and, with an SLO, enough requests within it."""
    if summary["success_rate"] < min_success:
        return False, "errors"
    if slo and summary["slo_attainment"] < slo_target:
        return False, "slo"
    return True, ""


def find_knee(loads: list[float], throughputs: list[float], ok: list[bool], reasons: list[str] | None = None,
              min_gain: float = 0.05) -> dict:
    """The highest load worth running at: where more load stops adding `min_gain` (5%) throughput.

    Levels are taken in load order up to the first one that breaks the SLO or the
    error budget (`ok` False). Among those, the knee is the lightest level that no
    heavier level beats by `min_gain` or more — so one noisy dip does not end the
    search while throughput still grows further up. Returns {"index", "load",
    "reason", "next_index"}; reason is 'plateau', 'slo' / 'errors' (the next level
    breaks it), 'still_rising' (the heaviest level tested is the knee: test higher
    loads) or 'none_ok' (even the lightest level fails; index and load are None).
    `index` refers to the lists as given (they need not be sorted).
    """
    reasons = reasons or ["slo"] * len(loads)
    order = sorted(range(len(loads)), key=lambda i: loads[i])
    good: list[int] = []
    broken = None
    for i in order:
        if not ok[i]:
            broken = i
            break
        good.append(i)
    if not good:
        return {"index": None, "load": None, "reason": "none_ok", "next_index": broken,
                "break_reason": reasons[broken] or "slo"}
    for pos, i in enumerate(good):
        if all(throughputs[j] < throughputs[i] * (1 + min_gain) for j in good[pos + 1:]):
            break
    if pos + 1 < len(good):
        return _knee(i, loads, "plateau", good[pos + 1])
    if broken is not None:
        return _knee(i, loads, reasons[broken] or "slo", broken)
    return _knee(i, loads, "still_rising", None)


def _knee(index: int, loads: list[float], reason: str, next_index: int | None) -> dict:
    return {"index": index, "load": loads[index], "reason": reason, "next_index": next_index}
