"""Structured outputs (JSON schema, regex, choice, EBNF grammar) through xgrammar.

`grammar` turns one `StructuredOutputsParams` into a grammar (validation and cache key; no
tokenizer needed, so the server can check a request before it reaches the engine); `manager` is
the engine's side: compilation off the step loop, per-sequence matchers, per-step token masks.
"""
