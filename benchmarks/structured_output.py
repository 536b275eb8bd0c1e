#!/usr/bin/env python
"""Structured outputs: what a JSON-schema constraint costs, what compiling costs, and that it never stalls.

On the default model (SmolLM2-135M-Instruct), offline engine, greedy:
  (1) throughput, batch 1 and 32: the same prompts with no constraint (ignore_eos) and with a JSON
      schema (an array of records with minItems far beyond max_tokens, so every constrained row is
      masked on every step and both runs decode the same number of tokens); output tok/s and cost %;
  (2) schema compile time, cold (first time: schema -> grammar -> token masks) and cached;
  (3) stalls: while a large schema compiles (off the step loop), the step gaps of running
      unconstrained requests, against their gaps before it was submitted;
  (4) xgrammar vs llguidance on this vocabulary (compile, per-token mask), when llguidance is installed;
  (5) per-token mask cost of the grammars as built before and after the "answers that end" defaults
      (compact JSON, bounded numbers, the repeated-call rule of tool_choice "required").

Prints tables and writes JSON (default benchmarks/results/structured_output_<device>.json).
Timings on a shared machine are noisy: --repeat N keeps the best of N runs.

    python benchmarks/structured_output.py [--device cuda] [--max-tokens 256] [--repeat 3]
    python benchmarks/structured_output.py --sections mask      # (5) only: no model, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see offline_throughput.py

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 99999},
    "name": {"type": "string", "maxLength": 12},
    "status": {"enum": ["active", "inactive", "pending"]},
    "score": {"type": "number"}}, "required": ["id", "name", "status"]}
THROUGHPUT_SCHEMA = {"type": "object", "properties": {
    "records": {"type": "array", "items": RECORD, "minItems": 500}}, "required": ["records"]}


def wide_schema(n: int, tag: str = "f") -> dict:
    """n fields of mixed kinds (patterns, bounds, enums, nested arrays): compile time grows with n."""
    props = {}
    for i in range(n):
        k = i % 4
        props[f"{tag}{i}"] = (
            {"type": "string", "pattern": f"^[a-z]{{1,{i % 9 + 2}}}$"} if k == 0 else
            {"type": "integer", "minimum": -i, "maximum": 1000 + i} if k == 1 else
            {"enum": [f"v{i}_{j}" for j in range(8)]} if k == 2 else
            {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number"},
                                                                        "y": {"type": "string", "maxLength": 8}},
                                        "required": ["x"]}, "maxItems": 5})
    return {"type": "object", "properties": props, "required": list(props)[::2]}


COMPILE_SCHEMAS = {
    "small (2 fields)": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                         "required": ["name", "age"]},
    "nested records": THROUGHPUT_SCHEMA,
    "wide (40 fields)": wide_schema(40),
    "wide (160 fields)": wide_schema(160),
}


class _Timed:
    """Wraps the engine's structured-output hooks to add up the time spent in them (the direct cost)."""

    def __init__(self, mgr):
        self.mgr, self.seconds, self.calls = mgr, 0.0, 0
        for name in ("apply_masks", "accept"):
            setattr(mgr, name, self._wrap(getattr(mgr, name), name == "apply_masks"))

    def _wrap(self, fn, count: bool):
        def timed(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += count
        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def throughput(llm, batch: int, max_tokens: int, repeat: int) -> dict:
    """Runs alternate (none, json, none, json, ...) so load changes on a shared machine hit both alike;
    the best run of each is kept. The time spent in the structured-output hooks is measured too."""
    from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

    prompts = [f"Record {i}: list the company's records as JSON." for i in range(batch)]
    modes = {"none": None, "json_schema": StructuredOutputsParams(json=THROUGHPUT_SCHEMA)}
    params = {m: SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=so)
              for m, so in modes.items()}
    for p in params.values():
        llm.generate(prompts[:2], p, use_tqdm=False)  # warm: compile (cached afterwards), kernels
    timer = _Timed(llm.engine.structured)
    res: dict = {}
    for _ in range(repeat):
        for m, p in params.items():
            timer.reset()
            t0 = time.perf_counter()
            outs = llm.generate(prompts, p, use_tqdm=False)
            dt = time.perf_counter() - t0
            ntok = sum(len(o.outputs[0].token_ids) for o in outs)
            if m not in res or ntok / dt > res[m]["tok_s"]:
                res[m] = {"tok_s": ntok / dt, "seconds": dt, "output_tokens": ntok,
                          "finish": sorted({o.outputs[0].finish_reason for o in outs})}
                if m == "json_schema":
                    res[m].update(hook_ms_per_step=timer.seconds / max(timer.calls, 1) * 1e3,
                                  hook_pct_of_run=100 * timer.seconds / dt)
    res["cost_pct"] = 100 * (1 - res["json_schema"]["tok_s"] / res["none"]["tok_s"])
    return res


def compile_times(engine) -> dict:
    from pagedserve.sampling_params import StructuredOutputsParams
    from pagedserve.structured.grammar import validate

    mgr, out = engine.structured, {}
    mgr._info.result()  # tokenizer info: built once at engine start, in the background
    mgr.compile_async(StructuredOutputsParams(regex="[a-z]+")).result()  # the compile workers are up
    for name, schema in COMPILE_SCHEMAS.items():
        schema = {**schema, "description": "cold"}  # not the key the throughput run compiled
        so = StructuredOutputsParams(json=schema)
        t0 = time.perf_counter()
        validate(so)
        v = time.perf_counter() - t0
        t0 = time.perf_counter()
        mgr.compile_async(so).result()
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(100):
            mgr.compile_async(StructuredOutputsParams(json=schema)).result()
        cached = (time.perf_counter() - t0) / 100
        out[name] = {"validate_ms": v * 1e3, "cold_ms": cold * 1e3, "cached_ms": cached * 1e3}
    return out


def stall_check(llm, batch: int) -> dict:
    """Unconstrained requests decode; a large schema is submitted; record every step's duration."""
    from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

    eng = llm.engine
    plain = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"stall-plain-{i}", f"Story {i}: once upon a time", plain)
    for _ in range(3):
        eng.step()  # prefill done, decoding
    before = []
    for _ in range(10):
        t0 = time.perf_counter()
        eng.step()
        before.append(time.perf_counter() - t0)
    so = StructuredOutputsParams(json=wide_schema(240, "s"))
    t_submit = time.perf_counter()
    eng.add_request("stall-json", "JSON:", SamplingParams(temperature=0, max_tokens=8, structured_outputs=so))
    fut = eng.structured.pending["stall-json"][1]
    during = []
    while not fut.done():  # steps that start while the grammar compiles (it cannot be admitted in them)
        t0 = time.perf_counter()
        eng.step()
        during.append(time.perf_counter() - t0)
    compile_s = time.perf_counter() - t_submit
    t0 = time.perf_counter()
    eng.step()  # admits it: its prefill, first matcher and mask (and any first-use kernel compilation)
    admit_ms = (time.perf_counter() - t0) * 1e3
    during = during or [0.0]
    for rid in list(eng.requests):
        eng.abort_request(rid)
    return {"batch": batch, "compile_s": compile_s, "steps_during_compile": len(during),
            "step_ms_median_before": statistics.median(before) * 1e3, "step_ms_max_before": max(before) * 1e3,
            "step_ms_median_during": statistics.median(during) * 1e3, "step_ms_max_during": max(during) * 1e3,
            "admission_step_ms": admit_ms}


def library_comparison(tokenizer, vocab: int) -> dict:
    """xgrammar vs llguidance: tokenizer info, compile (+ first mask), per-token mask on a real document."""
    import torch
    import xgrammar as xgr

    schema = COMPILE_SCHEMAS["wide (40 fields)"]
    small = {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}}, "required": ["id", "tags"]},
        "score": {"type": "number"}, "ok": {"type": "boolean"}}, "required": ["user", "score"]}
    doc = json.dumps({"user": {"id": 5, "tags": ["a", "b"], "email": "ab@cd.com"}, "score": 1.5, "ok": True})
    ids = tokenizer.encode(doc, add_special_tokens=False)
    out = {"vocab_size": vocab}
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    r = {"tokenizer_info_s": time.perf_counter() - t}
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    for name, s in (("nested", small), ("wide40", schema)):
        t = time.perf_counter()
        comp.compile_json_schema(json.dumps(s))
        r[f"compile_{name}_ms"] = (time.perf_counter() - t) * 1e3
    m, bm, ts = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(small))), xgr.allocate_token_bitmask(1, vocab), []
    for tok in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bm, 0)
        ts.append(time.perf_counter() - t)
        m.accept_token(tok)
    r.update(mask_us_median=statistics.median(ts) * 1e6, mask_us_max=max(ts) * 1e6)
    logits, bm32 = torch.randn(32, vocab), xgr.allocate_token_bitmask(32, vocab)
    t = time.perf_counter()
    for _ in range(100):
        xgr.apply_token_bitmask_inplace(logits, bm32)
    r["apply_32_rows_us"] = (time.perf_counter() - t) / 100 * 1e6
    out["xgrammar"] = r
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError:
        out["llguidance"] = "not installed (pip install llguidance to compare)"
        return out
    t = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    r = {"tokenizer_info_s": time.perf_counter() - t}
    for name, s in (("nested", small), ("wide40", schema)):
        t = time.perf_counter()
        mm = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(s))
        b = llguidance.torch.allocate_token_bitmask(1, vocab)
        llguidance.torch.fill_next_token_bitmask(mm, b, 0)
        r[f"compile_{name}_ms"] = (time.perf_counter() - t) * 1e3  # llguidance compiles lazily: + first mask
    mm = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(small))
    b, ts = llguidance.torch.allocate_token_bitmask(1, vocab), []
    for tok in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(mm, b, 0)
        ts.append(time.perf_counter() - t)
        mm.consume_token(tok)
    r.update(mask_us_median=statistics.median(ts) * 1e6, mask_us_max=max(ts) * 1e6)
    out["llguidance"] = r
    return out


MASK_CASES = {  # schema, a compact answer (valid under the grammars before and after)
    "city (the issue's)": ({"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"},
                                                             "population": {"type": "integer"}},
                            "required": ["name", "country", "population"]},
                           {"name": "Tokyo", "country": "Japan", "population": 13960000}),
    "mixed": ({"type": "object", "properties": {
        "id": {"type": "integer"}, "score": {"type": "number"}, "kind": {"enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}},
        "inner": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "integer"}},
                  "required": ["x", "y"]}}, "required": ["id", "score", "kind", "tags", "inner"]},
              {"id": 12345, "score": 3.25, "kind": "a", "tags": [1, 2, 3, 40, 55], "inner": {"x": -1.5, "y": 7}}),
    "json_object": (None, {"name": "Tokyo", "population": 13960000, "coords": [35.6, 139.7],
                           "tags": ["a", {"x": True, "y": None}]}),
    "tool calls (required)": ("tools", [{"name": "add", "parameters": {"a": 2, "b": 3}},
                                        {"name": "get_weather", "parameters": {"city": "Oslo"}}]),
}


def mask_cost(tokenizer, vocab: int, repeat: int) -> dict:
    """Mean and median us per token to fill the next-token mask (plus the repeated-call rule where it applies)
    and advance, over a compact answer, best of `repeat` passes. "before": the grammars as built before
    (any whitespace for response_format, unbounded numbers, no repeat rule); "after": as built now."""
    import xgrammar as xgr

    from pagedserve.sampling_params import StructuredOutputsParams as SO
    from pagedserve.server.constrained_calls import required_schema
    from pagedserve.structured.grammar import build_grammar
    from pagedserve.structured.repeat_close import RepeatCloser, TokenBytes

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    token_bytes = TokenBytes(info.decoded_vocab)
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}},
             {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                             "b": {"type": "integer"}},
                                            "required": ["a", "b"]}}]
    out = {}
    for name, (schema, doc) in MASK_CASES.items():
        if schema == "tools":
            schema = required_schema(tools)
            before = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
            after, closer = build_grammar(SO(json=schema, disable_any_whitespace=True, end_array_on_repeat=True)), True
        elif schema is None:
            before = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=True, strict_mode=False)
            after, closer = build_grammar(SO(json_object=True)), False
        else:
            before = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)
            after, closer = build_grammar(SO(json=schema)), False
        ids = tokenizer.encode(json.dumps(doc), add_special_tokens=False)
        row = {"tokens": len(ids)}
        for label, grammar, use_closer in (("before", before, False), ("after", after, closer)):
            compiled = comp.compile_grammar(grammar)
            bm = xgr.allocate_token_bitmask(1, vocab)
            best = None
            for _ in range(repeat):
                m, ts = xgr.GrammarMatcher(compiled), []
                rc = RepeatCloser(token_bytes) if use_closer else None
                for tok in ids + [None]:
                    t0 = time.perf_counter()
                    m.fill_next_token_bitmask(bm, 0)
                    if rc is not None and rc.restricts:
                        rc.restrict(bm[0].numpy().view("uint32"))
                    if tok is not None:
                        assert m.accept_token(tok), (name, label)
                        if rc is not None:
                            rc.feed(tok)
                    ts.append(time.perf_counter() - t0)
                if best is None or statistics.mean(ts) < statistics.mean(best):
                    best = ts
            row[label] = {"us_mean": statistics.mean(best) * 1e6, "us_median": statistics.median(best) * 1e6,
                          "us_max": max(best) * 1e6}
        out[name] = row
    return out


def print_mask_cost(res: dict) -> None:
    print("\nPer-token mask cost (fill + repeat rule + advance), us: before -> after (mean / median / max):")
    for name, r in res.items():
        b, a = r["before"], r["after"]
        print(f"  {name:<24} {r['tokens']:>3} tokens  mean {b['us_mean']:6.2f} -> {a['us_mean']:6.2f}   "
              f"median {b['us_median']:6.2f} -> {a['us_median']:6.2f}   max {b['us_max']:7.1f} -> {a['us_max']:7.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (GPU runs of a model shape)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=None, help="default: 64 on CPU, 256 on GPU")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sections", nargs="+", default=["all"], choices=["all", "mask"],
                    help="mask: only the per-token mask cost before/after (no model; writes *_mask.json)")
    args = ap.parse_args(argv)
    if args.sections == ["mask"]:
        from transformers import AutoTokenizer

        from pagedserve.model.default_model import default_model_dir

        tok = AutoTokenizer.from_pretrained(args.model or default_model_dir())
        res = {"mask_cost": mask_cost(tok, len(tok), max(args.repeat, 5))}
        print_mask_cost(res["mask_cost"])
        out = args.out or "benchmarks/results/structured_output_mask_cpu.json"
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\nwrote {out}")
        return 0

    import logging

    logging.basicConfig(level=logging.WARNING)
    from pagedserve import LLM

    llm = LLM(args.model, device=args.device, max_model_len=1024, load_format=args.load_format, max_num_seqs=max(args.batch_sizes),
              **({"kv_cache_memory": 1.0} if args.device == "cpu" else {}))
    dev = llm.engine.device.type
    max_tokens = args.max_tokens or (64 if dev == "cpu" else 256)
    result = {"device": str(llm.engine.device), "model": llm.engine.served_model_name, "max_tokens": max_tokens,
              "torch_threads": __import__("torch").get_num_threads(), "library": "xgrammar"}
    result["throughput"] = {str(b): throughput(llm, b, max_tokens, args.repeat) for b in args.batch_sizes}
    print(f"\nThroughput, greedy, {max_tokens} output tokens per request ({result['device']}):")
    print("(cost = measured tok/s difference; hooks = time inside mask + accept, the constraint's direct cost)")
    print(f"{'batch':>6} {'none tok/s':>11} {'json tok/s':>11} {'cost':>7} {'hooks ms/step':>14} {'hooks % of run':>15}")
    for b, r in result["throughput"].items():
        j = r["json_schema"]
        print(f"{b:>6} {r['none']['tok_s']:>11.1f} {j['tok_s']:>11.1f} {r['cost_pct']:>6.1f}% "
              f"{j['hook_ms_per_step']:>14.2f} {j['hook_pct_of_run']:>14.1f}%")

    result["compile"] = compile_times(llm.engine)
    print("\nSchema compile time (validate = the server's check; cold = grammar + token masks; cached = lookup):")
    print(f"{'schema':<20} {'validate ms':>12} {'cold ms':>10} {'cached ms':>10}")
    for name, r in result["compile"].items():
        print(f"{name:<20} {r['validate_ms']:>12.2f} {r['cold_ms']:>10.1f} {r['cached_ms']:>10.4f}")

    result["stall"] = stall_check(llm, max(args.batch_sizes))
    s = result["stall"]
    print(f"\nStep gaps of {s['batch']} decoding requests while a 240-field schema compiles ({s['compile_s']:.2f} s, "
          f"{s['steps_during_compile']} steps ran meanwhile):")
    print(f"  before: median {s['step_ms_median_before']:.1f} ms, max {s['step_ms_max_before']:.1f} ms;  "
          f"during: median {s['step_ms_median_during']:.1f} ms, max {s['step_ms_max_during']:.1f} ms;  "
          f"the step admitting it: {s['admission_step_ms']:.1f} ms")

    result["library_comparison"] = library_comparison(llm.tokenizer, llm.engine.args.vocab_size)
    print("\nLibrary comparison:", json.dumps(result["library_comparison"], indent=1))
    result["mask_cost"] = mask_cost(llm.tokenizer, llm.engine.args.vocab_size, args.repeat)
    print_mask_cost(result["mask_cost"])
    out = args.out or f"benchmarks/results/structured_output_{dev}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
