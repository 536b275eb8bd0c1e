"""The OpenAI-compatible server, end to end: a real `pagedserve serve` process on 127.0.0.1,
driven by the official `openai` client (sync, async, streaming) and raw HTTP.

One server for the whole module (loading the model is the slow part). Its last test
sends SIGTERM and checks the in-flight stream is drained and the exit code is 0.
"""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
import signal
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve import SamplingParams
from tests.conftest import MAX_TOKENS, PROMPTS
from tests.servers import running_server

KEY = "sk-test-pagedserve"
MODEL = "smol"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 64


@pytest.fixture(scope="module")
def server():
    with running_server(["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                         "--kv-cache-memory", "0.25", "--api-key", KEY, "--served-model-name", MODEL, "smol-alias",
                         # The SIGTERM test's stream must finish inside the drain window, also on a loaded CI core.
                         "--shutdown-timeout", "120"],
                        env={"PAGEDSERVE_ENGINE_LOAD_DELAY": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


def metrics(http) -> dict[str, float]:
    """name{other labels} -> value for this model's series."""
    out = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            if s.labels.get("model_name") != MODEL:
                continue
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[s.name + (f"{{{extra}}}" if extra else "")] = s.value
    return out


async def read_stream(stream) -> tuple[str, str | None, object]:
    """A one-choice completions stream from the async openai client -> (text, finish_reason, usage)."""
    text, finish, usage = "", None, None
    async for ch in stream:
        if ch.choices:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    return text, finish, usage


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, **kw)


def parallel(*calls):
    """Run independent requests at once: the engine batches them, so tests stay fast on few cores."""
    with ThreadPoolExecutor(len(calls)) as ex:
        futures = [ex.submit(call) for call in calls]
        return [f.result() for f in futures]


# -- start-up and discovery -------------------------------------------------------------------

def test_health_503_while_loading(server):
    seen = [c for c in server.health_seen if c]  # 0 = not listening yet
    assert seen[0] == 503, server.health_seen
    assert seen[-1] == 200


def test_models_version_health(http):
    r = http.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    data = r.json()["data"]
    assert [m["id"] for m in data] == [MODEL, "smol-alias"]
    assert data[0]["max_model_len"] == MAX_MODEL_LEN
    assert http.get("/version").json()["version"]
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["engine_pid"] > 0


# -- correctness against the offline engine -----------------------------------------------------

def test_completions_greedy_match_offline(client, llm, tok):
    prompts = PROMPTS[:4]
    refs = llm.generate(prompts, greedy(MAX_TOKENS), use_tqdm=False)
    resp, one = parallel(
        lambda: client.completions.create(model=MODEL, prompt=prompts, max_tokens=MAX_TOKENS, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=MAX_TOKENS, temperature=0))
    assert resp.model == MODEL and resp.object == "text_completion"
    assert [c.index for c in resp.choices] == list(range(len(prompts)))
    for c, ref in zip(resp.choices, refs):
        assert c.text == ref.outputs[0].text
        assert c.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert resp.usage.completion_tokens == sum(len(r.outputs[0].token_ids) for r in refs)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert one.choices[0].text == refs[0].outputs[0].text
    assert one.usage.prompt_tokens == len(tok.encode(prompts[0]))


def test_chat_greedy_matches_offline(client, llm, tok):
    msgs = [{"role": "user", "content": "Name a large animal that lives in the ocean."}]
    ref = llm.chat(msgs, greedy(20), use_tqdm=False)[0]
    resp = client.chat.completions.create(model="smol-alias", messages=msgs, max_completion_tokens=20, temperature=0)
    assert resp.model == MODEL and resp.object == "chat.completion"
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.outputs[0].text
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert resp.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False)) == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_chat_stream_order(client, llm):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello to Bob."}]}]
    ref = llm.chat([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to Bob."}],
                   greedy(16), use_tqdm=False)[0].outputs[0]
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage is None
    body, finish, usage = chunks[1:-2], chunks[-2], chunks[-1]
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in body)
    assert finish.choices[0].finish_reason == ref.finish_reason and not finish.choices[0].delta.content
    assert usage.choices == [] and usage.usage.completion_tokens == len(ref.token_ids)
    assert "".join(c.choices[0].delta.content for c in body) == ref.text
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


async def test_async_completion_stream(server, llm, tok):
    prompt = PROMPTS[5]
    ref = llm.generate(prompt, greedy(16), use_tqdm=False)[0].outputs[0]
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0) as ac:
        async def streamed():
            return await read_stream(await ac.completions.create(
                model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                stream_options={"include_usage": True}))

        (text, finish, usage), chat = await asyncio.gather(
            streamed(), ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                   max_tokens=8))
    assert text == ref.text and finish == ref.finish_reason
    assert usage.prompt_tokens == len(tok.encode(prompt)) and usage.completion_tokens == len(ref.token_ids)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens <= 8


def test_token_id_prompts_and_n(client, tok):
    a, b = tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])
    one, by_text, two, just_b = parallel(
        lambda: client.completions.create(model=MODEL, prompt=a, max_tokens=8, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=[a, b], max_tokens=8, temperature=0, n=2),
        lambda: client.completions.create(model=MODEL, prompt=b, max_tokens=8, temperature=0))
    assert one.choices[0].text == by_text.choices[0].text
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == two.choices[1].text == one.choices[0].text  # greedy: the n samples agree
    assert two.choices[2].text == two.choices[3].text == just_b.choices[0].text
    assert two.usage.prompt_tokens == len(a) + len(b)
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens + 2 * just_b.usage.completion_tokens


def test_sampling_fields(client, tok):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
              presence_penalty=0.5, frequency_penalty=0.5, user="tester",
              extra_body={"top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1})
    a, b, stop, ign, echo, lp, chat = parallel(
        lambda: client.completions.create(**kw),
        lambda: client.completions.create(**kw),
        lambda: client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0,
                                          stop=[","]),
        lambda: client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True}),
        lambda: client.completions.create(model=MODEL, prompt=PROMPTS[0], echo=True, max_tokens=4, temperature=0),
        lambda: client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to five."}],
                                               max_tokens=5, temperature=0, logprobs=True, top_logprobs=2))
    assert a.choices[0].text == b.choices[0].text  # the seed makes sampling reproducible
    assert "," not in stop.choices[0].text and stop.choices[0].finish_reason == "stop"
    assert stop.choices[0].model_extra["stop_reason"] == ","
    assert ign.usage.completion_tokens == 5 and ign.choices[0].finish_reason == "length"
    assert echo.choices[0].text.startswith(PROMPTS[0]) and len(echo.choices[0].text) > len(PROMPTS[0])
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == lp.usage.completion_tokens == 6
    assert "".join(logprobs.tokens) == lp.choices[0].text
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()))  # greedy picks the best
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token and c.logprob <= 0


def test_tokenize_detokenize(http, tok):
    assert http.post("/tokenize", json={"prompt": "Hello world"}).status_code == 401  # they follow --api-key
    r = http.post("/tokenize", json={"prompt": "Hello world"}, headers=AUTH).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": r["tokens"]}, headers=AUTH).json()["prompt"] == "Hello world"
    msgs = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    r = http.post("/tokenize", json={"messages": msgs}, headers=AUTH).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False)


# -- load -----------------------------------------------------------------------------------------

async def test_64_concurrent_streams(server, llm, tok, http):
    prompts = [f"Request number {i}: the weather in city {i} today is" for i in range(64)]
    refs = llm.generate(prompts, greedy(8, ignore_eos=True), use_tqdm=False)
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=600, max_retries=0) as ac:
        async def one(p):
            return await read_stream(await ac.completions.create(
                model=MODEL, prompt=p, max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))

        results = await asyncio.gather(*(one(p) for p in prompts))
    for (text, finish, usage), p, ref in zip(results, prompts, refs):
        assert finish == "length"
        assert usage.prompt_tokens == len(tok.encode(p)) and usage.completion_tokens == 8
        assert text == ref.outputs[0].text
    m = metrics(http)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert m["vllm:request_success_total{finished_reason=length}"] >= 64


# -- bad input ----------------------------------------------------------------------------------------

C, CH = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
OK_CH = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def c(**kw):
    return {**OK_C, **kw}


def ch(**kw):
    return {**OK_CH, **kw}


def drop(d, key):
    return {k: v for k, v in d.items() if k != key}


BAD = [
    # (id, path, body: dict | bytes, status, param or None)
    ("no-prompt", C, drop(OK_C, "prompt"), 400, "prompt"),
    ("prompt-int", C, c(prompt=5), 400, "prompt"),
    ("prompt-null", C, c(prompt=None), 400, "prompt"),
    ("prompt-empty-list", C, c(prompt=[]), 400, "prompt"),
    ("prompt-empty-ids", C, c(prompt=[[]]), 400, "prompt"),
    ("prompt-empty-string", C, c(prompt=""), 400, "prompt"),
    ("prompt-mixed", C, c(prompt=["a", 1]), 400, "prompt"),
    ("prompt-id-too-big", C, c(prompt=[1, 10**9]), 400, "prompt"),
    ("prompt-id-negative", C, c(prompt=[-1, 2]), 400, "prompt"),
    ("prompt-id-float", C, c(prompt=[1.5, 2]), 400, "prompt"),
    ("prompt-too-long", C, c(prompt=[1] * MAX_MODEL_LEN), 400, "prompt"),
    ("prompt-plus-max-tokens", C, c(prompt=[1] * 500, max_tokens=100), 400, "max_tokens"),
    ("temperature-negative", C, c(temperature=-1), 400, "temperature"),
    ("temperature-string", C, c(temperature="hot"), 400, "temperature"),
    ("temperature-huge", C, c(temperature=1e308), 400, "temperature"),
    ("top-p-zero", C, c(top_p=0), 400, "top_p"),
    ("top-p-big", C, c(top_p=1.5), 400, "top_p"),
    ("top-k-negative", C, c(top_k=-2), 400, "top_k"),
    ("top-k-float", C, c(top_k=1.5), 400, "top_k"),
    ("min-p-big", C, c(min_p=2), 400, "min_p"),
    ("n-zero", C, c(n=0), 400, "n"),
    ("n-huge", C, c(n=10**20), 400, "n"),
    ("n-string", C, c(n="2"), 400, "n"),
    ("n-over-max-num-seqs", C, c(n=100), 400, "n"),
    ("max-tokens-zero", C, c(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", C, c(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-huge", C, c(max_tokens=10**30), 400, "max_tokens"),
    ("max-tokens-float", C, c(max_tokens=1.5), 400, "max_tokens"),
    ("max-tokens-bool", C, c(max_tokens=True), 400, "max_tokens"),
    ("min-tokens-over-max", C, c(min_tokens=10), 400, "min_tokens"),
    ("stop-int", C, c(stop=5), 400, "stop"),
    ("stop-empty-string", C, c(stop=[""]), 400, "stop"),
    ("stop-too-many", C, c(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("stop-token-ids-negative", C, c(stop_token_ids=[-1]), 400, "stop_token_ids"),
    ("seed-string", C, c(seed="x"), 400, "seed"),
    ("seed-huge", C, c(seed=2**70), 400, "seed"),
    ("presence-penalty-big", C, c(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty-small", C, c(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition-penalty-zero", C, c(repetition_penalty=0), 400, "repetition_penalty"),
    ("logprobs-big", C, c(logprobs=21), 400, "logprobs"),
    ("logprobs-negative", C, c(logprobs=-1), 400, "logprobs"),
    ("echo-string", C, c(echo="yes"), 400, "echo"),
    ("echo-with-logprobs", C, c(echo=True, logprobs=1), 400, "echo"),
    ("stream-string", C, c(stream="yes"), 400, "stream"),
    ("stream-options-string", C, c(stream_options="x"), 400, "stream_options"),
    ("logit-bias-out-of-range", C, c(logit_bias={"1": 500}), 400, "logit_bias"),
    ("logit-bias-key-not-id", C, c(logit_bias={"x": 5}), 400, "logit_bias"),
    ("top-k-over-vocab", C, c(top_k=10**6), 400, "top_k"),
    ("length-penalty-huge", C, c(use_beam_search=True, n=2, length_penalty=1e308), 400, "length_penalty"),
    ("beam-with-logprobs", C, c(use_beam_search=True, n=2, logprobs=1), 400, "logprobs"),
    ("stop-token-ids-over-vocab", C, c(stop_token_ids=[10**6], stream=True), 400, "stop_token_ids"),
    ("chat-user-without-content", CH, ch(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("chat-request-template", CH, ch(chat_template="{{ 1 }}"), 400, "chat_template"),
    ("best-of", C, c(best_of=3), 400, "best_of"),
    ("suffix", C, c(suffix="x"), 400, "suffix"),
    ("model-int", C, c(model=123), 400, "model"),
    ("unknown-model", C, c(model="gpt-4"), 404, "model"),
    ("malformed-json", C, b'{"prompt": "x",', 400, None),
    ("json-array", C, b"[1, 2, 3]", 400, None),
    ("empty-body", C, b"", 400, None),
    ("not-json", C, b"hello there", 400, None),
    ("invalid-utf8", C, b'{"prompt": "\xff\xfe\xfa", "max_tokens": 4}', 400, None),
    ("nan", C, b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("infinity", C, b'{"prompt": "x", "temperature": Infinity}', 400, None),
    ("deep-nesting", C, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None),
    ("chat-no-messages", CH, drop(OK_CH, "messages"), 400, "messages"),
    ("chat-empty-messages", CH, ch(messages=[]), 400, "messages"),
    ("chat-bad-role", CH, ch(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("chat-content-int", CH, ch(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("chat-message-string", CH, ch(messages=["hi"]), 400, "messages.0"),
    ("chat-image-part", CH, ch(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages.0.content"),
    ("chat-top-logprobs-alone", CH, ch(top_logprobs=2), 400, "top_logprobs"),
    ("chat-top-logprobs-big", CH, ch(logprobs=True, top_logprobs=50), 400, "logprobs"),
    ("chat-max-completion-tokens-zero", CH, ch(max_completion_tokens=0), 400, "max_tokens"),
    ("chat-unknown-model", CH, ch(model="nope"), 404, "model"),
    ("chat-json-schema-no-schema", CH, ch(response_format={"type": "json_schema"}), 400,
     "response_format.json_schema.schema"),
    ("chat-response-format-unknown", CH, ch(response_format={"type": "yaml"}), 400, "response_format.type"),
    # tools without tool_choice mean "auto", which needs --enable-auto-tool-choice (not set here)
    ("chat-tools-auto-not-enabled", CH, ch(tools=[{"type": "function", "function": {"name": "f"}}]), 400,
     "tool_choice"),
    ("chat-too-long", CH, ch(messages=[{"role": "user", "content": "hello " * 600}]), 400, "messages"),
    ("chat-logprobs-int", CH, ch(logprobs=3), 400, "logprobs"),
    ("tokenize-nothing", "/tokenize", {"model": MODEL}, 400, "prompt"),
    ("tokenize-prompt-int", "/tokenize", {"prompt": 3}, 400, "prompt"),
    ("detokenize-out-of-range", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("detokenize-strings", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("unknown-route", "/v1/nothing-here", OK_C, 404, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input(http, name, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = http.post(path, headers={**AUTH, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert "Traceback" not in r.text


def test_bad_requests_http_level(server, http):
    assert len(BAD) >= 50
    # Auth on /v1/*: missing and wrong keys; /health and /metrics stay open.
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = http.post(C, json=OK_C, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert http.get("/v1/models").status_code == 401
    # Wrong method, and a body over the size limit (declared; the server answers before reading it).
    r = http.get(C, headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(f"POST {C} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                  f"\r\nContent-Length: {64 << 20}\r\n\r\n{{\"prompt\": ".encode())
        resp = b""
        while b'"code"' not in resp:
            chunk = s.recv(65536)
            if not chunk:
                break
            resp += chunk
    assert resp.startswith(b"HTTP/1.1 413"), resp
    assert b'"code":413' in resp


def test_healthy_after_bad_inputs(client, http):
    assert http.get("/health").status_code == 200
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert r.usage.completion_tokens >= 1
    m = metrics(http)
    assert m["vllm:num_requests_running"] == 0 and m["pagedserve:requests_rejected_total{reason=unauthorized}"] >= 3


# -- lifecycle ---------------------------------------------------------------------------------------

def _wait_metrics(http, pred, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(http)
        if pred(m):
            return m
        time.sleep(0.2)
    raise AssertionError(f"metrics never satisfied the condition: {m}")


def test_disconnect_frees_blocks(server, http):
    before = metrics(http).get("vllm:request_success_total{finished_reason=abort}", 0)
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        with c.stream("POST", C, json=body, headers=AUTH) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
            m = metrics(http)
            assert m["vllm:num_requests_running"] == 1 and m["vllm:kv_cache_usage_perc"] > 0
    # The client is gone: the request is aborted and its blocks freed.
    m = _wait_metrics(http, lambda m: m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0)
    assert m["vllm:request_success_total{finished_reason=abort}"] == before + 1
    gen = m["vllm:generation_tokens_total"]
    time.sleep(1.0)
    assert metrics(http)["vllm:generation_tokens_total"] == gen  # nothing generates for the dead stream
    # A non-streaming request whose client gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + C, json={**body, "stream": False}, headers=AUTH, timeout=3)
    _wait_metrics(http, lambda m: m["vllm:request_success_total{finished_reason=abort}"] == before + 2
                  and m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0)


def test_metrics_names(http):
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:request_success_total",
                 "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:request_queue_time_seconds_bucket", "pagedserve:engine_up"):
        assert f'{name}{{' in text, name
    m = metrics(http)
    assert m["pagedserve:engine_up"] == 1
    assert m["vllm:prompt_tokens_total"] > 0 and m["vllm:generation_tokens_total"] > 0
    assert m["vllm:prefix_cache_hits_total"] > 0  # repeated prompts above hit the prefix cache
    assert m["vllm:time_to_first_token_seconds_count"] > 64


def test_sigterm_drains_in_flight_stream(server):
    """Last: SIGTERM stops accepting, lets the running stream finish, stops the engine, exits 0."""
    body = {"model": MODEL, "prompt": "Write a poem.", "max_tokens": 24, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.url, timeout=300) as c:
        with c.stream("POST", C, json=body, headers=AUTH) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"]
    assert rest[-1] == "data: [DONE]"
    usage = json.loads(rest[-2][6:])["usage"]
    assert usage["completion_tokens"] == 24
    assert server.proc.wait(120) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
