"""Speculative decoding behind `pagedserve serve`: the flag, its start-up errors and vLLM's metrics."""
from __future__ import annotations

import json

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import running_server
from tests.test_startup_errors import _assert_one_line_error, _run

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def test_bad_speculative_config_is_one_line_before_loading():
    for cfg, words in (('{"method": "medusa9", "num_speculative_tokens": 2}', "unknown method"),
                       ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens")):
        p = _run("serve", "--speculative-config", cfg, timeout=60)
        _assert_one_line_error(p, words)
        assert "Loading" not in p.stderr


def test_served_greedy_matches_and_metrics_count():
    prompt = "Copy this sentence exactly: The quick brown fox jumps over the lazy dog. Copy:"
    with running_server(["--max-model-len", "256", "--kv-cache-memory", "0.1",
                         "--speculative-config", json.dumps(SPEC)]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=300, max_retries=0)
        out = client.completions.create(model=client.models.list().data[0].id, prompt=prompt, max_tokens=16,
                                        temperature=0)
        assert out.choices[0].text.startswith(" The quick brown fox")
        text = httpx.get(srv.url + "/metrics", timeout=60).text
    vals = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            vals[(s.name, s.labels.get("position"))] = s.value
    drafts = vals[("vllm:spec_decode_num_drafts_total", None)]
    drafted = vals[("vllm:spec_decode_num_draft_tokens_total", None)]
    accepted = vals[("vllm:spec_decode_num_accepted_tokens_total", None)]
    assert 0 < drafts and 0 < accepted <= drafted <= 3 * drafts
    assert vals[("vllm:spec_decode_num_accepted_tokens_per_pos_total", "0")] > 0
    assert sum(v for (n, _), v in vals.items() if n == "vllm:spec_decode_num_accepted_tokens_per_pos_total") == accepted
