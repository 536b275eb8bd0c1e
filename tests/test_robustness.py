"""One request must never take a server down (issue 14): a named regression test per row of the
issue's table, fault injection, engine restart, and a fuzz suite (hypothesis + raw-HTTP abuse)
against a real `pagedserve serve` and a real `serve --replicas 2` router.

Both run with tests/doubles/fault_site on PYTHONPATH and PAGEDSERVE_FAULT_INJECT set, which installs
the test-only faults of tests/doubles/faults.py in every process: a request with seed 4242 raises
inside its own sampling; one with seed 4343 raises in the shared model step, which kills the engine
process.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_cases import api_case, check_response, raw_case, send_raw
from tests.servers import running_server

ROOT = Path(__file__).resolve().parent.parent
KEY = "robust-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
FAULT_SITE = ROOT / "tests" / "doubles" / "fault_site"
ENV = {"PAGEDSERVE_FAULT_INJECT": "sample=4242,step=4343",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULT_SITE), os.environ.get("PYTHONPATH")]))}
ARGS = ["--max-model-len", "512", "--kv-cache-memory", "0.25", "--max-num-seqs", "8", "--api-key", KEY]
REF = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
FUZZ_CASES = int(os.environ.get("PAGEDSERVE_FUZZ_CASES", "80"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class HealthWatch:
    """Polls /health in a thread; records every status and the slowest answer."""

    def __init__(self, url: str, period: float = 0.1):
        self.url, self.period = url, period
        self.statuses: list[int] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10, trust_env=False) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    self.statuses.append(c.get(self.url + "/health").status_code)
                except httpx.HTTPError:
                    self.statuses.append(0)
                self.slowest = max(self.slowest, time.perf_counter() - t0)
                self._stop.wait(self.period)

    def __enter__(self) -> "HealthWatch":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


# -- fixtures -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with running_server(ARGS, env=ENV) as srv:
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=120, trust_env=False) as c:
            srv.client = c
            srv.model = c.get("/v1/models").json()["data"][0]["id"]
            srv.ref = c.post("/v1/completions", json={**REF, "model": srv.model}).json()["choices"][0]["text"]
            yield srv


def _consecutive_ports(n: int) -> int:
    from tests.test_cluster_launcher import consecutive_free_ports

    return consecutive_free_ports(n)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`serve --replicas 2` with the admin API left off (its default)."""
    port = _consecutive_ports(3)
    log = tmp_path_factory.mktemp("cluster") / "launcher.log"
    env = {**os.environ, **ENV}
    env.pop("PAGEDSERVE_ADMIN_API_KEY", None)
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.cli", "serve", "--replicas", "2", "--host",
                                 "127.0.0.1", "--port", str(port), *ARGS], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "replicas not ready in 240 s:\n" + log.read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2, trust_env=False).json().get("healthy_backends") == 2:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        with httpx.Client(base_url=url, headers=AUTH, timeout=120, trust_env=False) as c:
            ns = type("Cluster", (), {})()
            ns.url, ns.port, ns.client, ns.proc, ns.log = url, port, c, proc, log
            ns.replicas = [f"http://127.0.0.1:{port + 1}", f"http://127.0.0.1:{port + 2}"]
            ns.model = c.get("/v1/models").json()["data"][0]["id"]
            ns.ref = c.post("/v1/completions", json={**REF, "model": ns.model}).json()["choices"][0]["text"]
            yield ns
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text()[-4000:])


def error_of(r: httpx.Response, status: int, param: str | None = "?") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["code"] == status and "type" in err
    if param != "?":
        assert err["param"] == param, err
    return err


def all_engines(srv_url: str) -> int:
    return httpx.get(srv_url + "/health", trust_env=False, timeout=5).json()["engine_pid"]


# -- the rows, single server --------------------------------------------------------

def test_row01_top_k_beyond_vocab_is_400_and_engine_lives(server):
    c = server.client
    pid = all_engines(server.url)
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "temperature": 1, "top_k": 2**63}
    err = error_of(c.post("/v1/completions", json=body), 400, "top_k")
    assert "vocabulary" in err["message"]
    err = error_of(c.post("/v1/completions", json={**body, "top_k": 10**6}), 400, "top_k")
    assert "[1, 49152]" in err["message"]
    assert c.post("/v1/completions", json={**body, "top_k": 49152}).status_code == 200
    assert all_engines(server.url) == pid


@pytest.mark.parametrize("lp", [1e308, -1000, float("inf")])
def test_row02_beam_length_penalty_out_of_range_is_400(server, lp):
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "use_beam_search": True, "n": 2,
            "length_penalty": lp}
    r = server.client.post("/v1/completions", content=json.dumps(body, allow_nan=True),
                           headers={"content-type": "application/json"})
    err = error_of(r, 400, "length_penalty")
    assert "[-10.0, 10.0]" in err["message"]
    ok = server.client.post("/v1/completions", json={**body, "length_penalty": -10})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2


def test_row05_request_chat_template_refused_without_trust_flag(server):
    base = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    tpl = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    error_of(server.client.post("/v1/chat/completions", json={**base, "chat_template": tpl}), 400, "chat_template")
    err = error_of(server.client.post("/v1/chat/completions", json={**base, "chat_template_kwargs":
                                                                    {"chat_template": tpl}}),
                   400, "chat_template_kwargs.chat_template")
    assert "--trust-request-chat-template" in err["message"]
    error_of(server.client.post("/tokenize", json={"messages": base["messages"], "chat_template": tpl}), 400,
             "chat_template")


def test_row05_chat_template_rendering_is_bounded(model_dir):
    """With --trust-request-chat-template, a hostile template is still sandboxed and bounded."""
    from pagedserve.errors import InvalidRequestError
    from pagedserve.model.loader import load_tokenizer
    from pagedserve.server import chat_template

    tok = load_tokenizer(model_dir, None)
    convo = [{"role": "user", "content": "hi"}]
    kw = dict(add_generation_prompt=True, continue_final_message=False, kwargs={})
    t0 = time.perf_counter()
    with pytest.raises(InvalidRequestError, match="exceeds"):  # 10^10 characters of output, stopped early
        chat_template.render(tok, convo, template="{% for i in range(100000) %}{% for j in range(100000) %}"
                             "xxxxxxxxxx{% endfor %}{% endfor %}", max_chars=100_000, **kw)
    with pytest.raises(InvalidRequestError, match="loop iterations"):  # 10^10 silent iterations, stopped early
        chat_template.render(tok, convo, template="{% for i in range(100000) %}{% for j in range(100000) %}"
                             "{% endfor %}{% endfor %}", **kw)
    with pytest.raises(InvalidRequestError, match="cannot apply"):  # the sandbox refuses attribute access
        chat_template.render(tok, convo, template="{{ ''.__class__.__mro__[1].__subclasses__() }}", **kw)
    assert time.perf_counter() - t0 < 10
    assert "hi" in chat_template.render(tok, convo, template=None, **kw)  # the model's own template


def test_row06_large_prompts_leave_health_fast(server):
    text = "hello world, this is a long text. " * (2_000_000 // 34)  # ~2 MB: tokenized in a worker thread
    with HealthWatch(server.url, 0.05) as hw:
        time.sleep(0.3)
        r = server.client.post("/tokenize", json={"prompt": text})
        huge = server.client.post("/v1/completions", json={"model": server.model, "prompt": "x " * (15 << 19)})
        time.sleep(0.3)
    assert r.status_code == 200 and r.json()["count"] > 400_000
    error_of(huge, 400, "prompt")  # 15 MiB: refused from its length alone, without tokenizing it
    assert set(hw.statuses) == {200} and len(hw.statuses) > 5
    assert hw.slowest < 1.0, f"/health took {hw.slowest:.2f}s during the tokenization"


def test_row06_tokenize_and_detokenize_follow_api_key(server):
    for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1, 2]})):
        error_of(httpx.post(server.url + path, json=body, trust_env=False), 401)
        assert server.client.post(path, json=body).status_code == 200


def test_row07_request_head_limits(server):
    host, port = "127.0.0.1", server.port
    before = rss_mib(server.proc.pid)
    status, _, body = send_raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * (24 << 20) + b"\r\n\r\n")
    assert status in (431, None)  # the server answers 431 and closes; the reset may eat the answer
    status, _, body = send_raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 200_000 + b"\r\n\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == 431
    many = b"".join(b"X-%d: v\r\n" % i for i in range(150))
    status, _, body = send_raw(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert status == 431 and "header lines" in json.loads(body)["error"]["message"]
    status, _, body = send_raw(host, port, b"GET /health?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414
    status, _, body = send_raw(host, port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 17000000\r\n"
                                           b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n" + b"x" * 65536)
    assert status == 413
    assert rss_mib(server.proc.pid) - before < 64
    assert server.client.get("/health").status_code == 200


def test_row08_stream_with_out_of_vocab_stop_token_ids_is_400_before_the_stream(server):
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "stream": True, "stop_token_ids": [10**6]}
    with server.client.stream("POST", "/v1/completions", json=body) as r:
        r.read()
    err = error_of(r, 400, "stop_token_ids")
    assert "[0, 49152)" in err["message"]


def test_row11_beam_search_with_logprobs_is_400(server):
    body = {"model": server.model, "prompt": "hi", "max_tokens": 2, "use_beam_search": True, "n": 2, "logprobs": 2}
    error_of(server.client.post("/v1/completions", json=body), 400, "logprobs")


def test_row12_null_means_default(server):
    c = server.client
    r = c.post("/v1/completions", json={**REF, "model": server.model, "echo": None, "logprobs": None, "n": None,
                                        "stream": None, "best_of": None, "stream_options": None, "stop": None})
    assert r.status_code == 200, r.text
    assert [ch["text"] for ch in r.json()["choices"]] == [server.ref]
    r = c.post("/v1/chat/completions", json={"model": server.model, "messages": [{"role": "user", "content": "hi"}],
                                             "max_tokens": 2, "n": None, "stream": None, "logprobs": None,
                                             "temperature": None, "top_p": None, "add_generation_prompt": None})
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_row14_user_message_without_content_is_400(server):
    body = {"model": server.model, "messages": [{"role": "user"}], "max_tokens": 1}
    error_of(server.client.post("/v1/chat/completions", json=body), 400, "messages.0.content")
    body["messages"] = [{"role": "user", "content": None}]
    error_of(server.client.post("/v1/chat/completions", json=body), 400, "messages.0.content")


# -- fuzzing a single server ----------------------------------------------------------------

def _fuzz(base_url: str, model: str, pids: list[int], cases: int, seed_strategy) -> None:
    defects: list[str] = []
    before = sum(rss_mib(p) for p in pids)
    with HealthWatch(base_url, 0.1) as hw, httpx.Client(base_url=base_url, headers=AUTH, timeout=120,
                                                        trust_env=False) as c:
        @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(seed_strategy)
        def one(rng: random.Random) -> None:
            case = api_case(rng, model)
            r = c.post(case.path, content=case.body, headers={"content-type": "application/json"})
            problem = check_response(r.status_code, "", r.content)
            if problem is None and case.valid and r.status_code != 200:
                problem = f"valid request answered {r.status_code}"
            if problem:
                defects.append(f"{case.path} {case.body[:300]!r}: {problem}")

        one()
    assert not defects, "\n".join(defects[:10])
    assert set(hw.statuses) == {200}, hw.statuses
    assert hw.slowest < 2.0, f"/health took {hw.slowest:.2f}s"
    assert sum(rss_mib(p) for p in pids) - before < 150


def test_fuzz_openai_schema_against_server(server):
    _fuzz(server.url, server.model, [server.proc.pid], FUZZ_CASES, st.randoms(use_true_random=False))


def _raw_http_abuse(target, seed: int) -> set[str]:
    """Each kind of raw-HTTP abuse once (up to 200 draws): every answer well-formed, then a valid request
    still answered correctly. Returns the kinds sent."""
    rng = random.Random(seed)
    seen: set[str] = set()
    for _ in range(200):
        name, data = raw_case(rng, f"127.0.0.1:{target.port}")
        if name in seen:
            continue
        seen.add(name)
        status, head, body = send_raw("127.0.0.1", target.port, data)
        problem = check_response(status, "", body, allow_no_answer=name == "garbage")
        assert problem is None, f"{name}: {problem}"
    r = target.client.post("/v1/completions", json={**REF, "model": target.model})
    assert r.json()["choices"][0]["text"] == target.ref
    return seen


def test_fuzz_raw_http_against_server(server):
    assert len(_raw_http_abuse(server, seed=0)) >= 20


# -- fault injection and engine death (single server; keep last among the server tests) ------

def test_fault_in_one_request_leaves_the_rest_of_the_batch_correct(server):
    c = server.client
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):"]
    body = {"model": server.model, "max_tokens": 8, "temperature": 0, "repetition_penalty": 1.05}
    ref = [c.post("/v1/completions", json={**body, "prompt": p}).json()["choices"][0]["text"] for p in prompts]
    pid = all_engines(server.url)
    with ThreadPoolExecutor(8) as pool:
        poison = pool.submit(c.post, "/v1/completions", json={**body, "prompt": prompts[0], "max_tokens": 64,
                                                               "temperature": 0.8, "seed": 4242})
        others = [pool.submit(c.post, "/v1/completions", json={**body, "prompt": p}) for p in prompts]
        err = error_of(poison.result(), 500)
        assert err["type"] == "internal_error" and "aborted" in err["message"]
        assert [f.result().json()["choices"][0]["text"] for f in others] == ref
    assert all_engines(server.url) == pid  # the engine process never died


def test_engine_death_restarts_the_engine_and_later_requests_succeed(server):
    c = server.client
    pid = all_engines(server.url)
    r = c.post("/v1/completions", json={**REF, "model": server.model, "seed": 4343})
    err = error_of(r, 503)
    assert "died while this request was running" in err["message"] and "retry-after" not in r.headers
    deadline = time.time() + 300  # a model load; slow only on a loaded CI machine
    while True:
        h = httpx.get(server.url + "/health", trust_env=False, timeout=5)
        if h.status_code == 200:
            break
        assert time.time() < deadline, f"engine not restarted:\n{server.output(40)}"
        time.sleep(0.3)
    assert h.json()["engine_pid"] != pid
    assert c.post("/v1/completions", json={**REF, "model": server.model}).json()["choices"][0]["text"] == server.ref


# -- the router with two real replicas --------------------------------------------------------

def replica_engine_pids(cl) -> list:
    out = []
    for u in cl.replicas:
        try:
            out.append(httpx.get(u + "/health", trust_env=False, timeout=5).json().get("engine_pid"))
        except (httpx.HTTPError, ValueError):
            out.append(None)
    return out


def test_row13_router_admin_api_is_off_by_default(cluster):
    for method, body in (("GET", None), ("POST", {"url": "http://127.0.0.1:9"}), ("DELETE", {"url": cluster.replicas[0]})):
        r = httpx.request(method, cluster.url + "/admin/backends", json=body, trust_env=False, timeout=10)
        err = error_of(r, 403)
        assert "--admin-api-key" in err["message"]
    assert httpx.get(cluster.url + "/health", trust_env=False).json()["healthy_backends"] == 2


def test_row09_router_deep_json_and_non_string_text_are_400(cluster):
    c = cluster.client
    deep = b'{"model":"m","prompt":' + b"[" * 10000 + b"]" * 10000 + b"}"
    err = error_of(c.post("/v1/completions", content=deep, headers={"content-type": "application/json"}), 400)
    assert "nested" in err["message"]
    for text in (5, None, ["a"], {"t": 1}):
        body = {"model": cluster.model, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
                "max_tokens": 1}
        error_of(c.post("/v1/chat/completions", json=body), 400)


def test_row10_router_answers_head(cluster):
    for path in ("/v1/models", "/health", "/metrics", "/nope"):
        r = httpx.head(cluster.url + path, headers=AUTH, trust_env=False, timeout=10)
        assert r.status_code == (404 if path == "/nope" else 200) and r.content == b""


def test_router_request_limits(cluster):
    status, _, body = send_raw("127.0.0.1", cluster.port, b"GET /health?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414
    status, _, body = send_raw("127.0.0.1", cluster.port,
                               b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 200_000 + b"\r\n\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == 431
    big = b'{"prompt":"' + b"a" * (17 << 20) + b'"}'
    error_of(cluster.client.post("/v1/completions", content=big), 413)


def test_row04_logit_bias_out_of_range_through_router_is_400(cluster):
    c = cluster.client
    pids = replica_engine_pids(cluster)
    body = {"model": cluster.model, "prompt": "hi", "max_tokens": 2}
    for _ in range(2):  # one on each replica (least-loaded policy spreads idle traffic)
        err = error_of(c.post("/v1/completions", json={**body, "logit_bias": {"1": 1000}}), 400, "logit_bias")
        assert "[-100, 100]" in err["message"]
    error_of(c.post("/v1/completions", json={**body, "logit_bias": {"99999999": 1}}), 400, "logit_bias")
    # In range, it works: a +100 bias on one token makes greedy decoding pick it.
    r = c.post("/v1/completions", json={**body, "temperature": 0, "logit_bias": {"42": 100}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert r.json()["choices"][0]["text"] == c.post("/detokenize", json={"tokens": [42, 42]}).json()["prompt"]
    assert replica_engine_pids(cluster) == pids


def test_fuzz_openai_schema_against_router(cluster):
    pids = [cluster.proc.pid]
    _fuzz(cluster.url, cluster.model, pids, FUZZ_CASES, st.randoms(use_true_random=False))
    assert httpx.get(cluster.url + "/health", trust_env=False).json()["healthy_backends"] == 2


def test_fuzz_raw_http_against_router(cluster):
    _raw_http_abuse(cluster, seed=1)


def test_row03_poison_request_through_the_router_is_not_replayed(cluster):
    """A request that kills the engine serving it gets a 503 and is not sent to the other replica; the
    cluster keeps serving, and the victim's engine restarts on its own."""
    c = cluster.client
    before = replica_engine_pids(cluster)
    assert None not in before
    with HealthWatch(cluster.url, 0.1) as hw:
        r = c.post("/v1/completions", json={**REF, "model": cluster.model, "seed": 4343})
        err = error_of(r, 503)
        assert "died while this request was running" in err["message"]
        victim = cluster.replicas.index(r.headers["x-pagedserve-backend"])
        survivor = 1 - victim
        for _ in range(4):  # the cluster keeps answering meanwhile
            ok = c.post("/v1/completions", json={**REF, "model": cluster.model})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == cluster.ref
        deadline = time.time() + 120
        while httpx.get(cluster.url + "/health", trust_env=False).json().get("healthy_backends") != 2:
            assert time.time() < deadline, "victim replica not back:\n" + cluster.log.read_text()[-3000:]
            time.sleep(0.5)
    after = replica_engine_pids(cluster)
    assert after[survivor] == before[survivor]  # the poison never reached the other replica
    assert after[victim] != before[victim]  # the victim restarted its engine by itself
    assert set(hw.statuses) == {200}  # the router never lost its last healthy backend
    metrics = c.get("/metrics").text
    assert 'pagedserve:router_not_retried_total{reason="backend_5xx"}' in metrics
