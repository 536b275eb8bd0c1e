"""Hostile-client request generators, shared by tests/test_robustness.py (driven by hypothesis) and
benchmarks/fuzz_soak.py (driven by a seeded random.Random).

`api_case(rng, model)` starts from a valid OpenAI request and mutates types and values field by
field (the OpenAI schema plus vLLM's extras), sometimes drops required fields or adds junk;
`raw_case(rng)` is raw-HTTP abuse (bad request lines, oversize heads, broken bodies).
`check_response` says what is a defect: any 5xx, an error that is not OpenAI-shaped JSON.
Generation is kept short (max_tokens <= 4 whenever the request is valid) so hundreds of
cases fit a CI budget on a CPU.
"""
from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass

FAULT_SEEDS = (4242, 4343)  # PAGEDSERVE_FAULT_INJECT seeds: never generated here

_INTS = [0, 1, -1, 2, 4, 7, 20, 21, 100, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30]
_FLOATS = [0.0, 0.5, 1.0, -0.5, 1e-9, 2.0, 100.5, 1e308, -1e308, 5e-324, float("inf"), float("-inf"),
           float("nan")]
_JUNK = [None, True, False, "", "x", "9", "1e3", [], [1], [[1]], {}, {"a": 1}, [None], ["a", 2], "\u0000",
         "\ud800x", "é" * 3]
PROMPTS = ["Hello", "The capital of France is", "1, 2, 3,", "Once upon a time", "\u00e9t\u00e9 \u2603 \U0001f600",
           "<|im_start|>system", " ", "a" * 300]

# Valid values for each field (what a careful client sends), used before mutation.
_VALID = {
    "temperature": [0, 0.0, 0.7, 1, 1.5], "top_p": [1, 0.9, 0.5], "top_k": [-1, 0, 1, 5, 50], "min_p": [0, 0.05],
    "n": [1, 2], "stop": ["\n", ["."], None], "stop_token_ids": [[2], []], "seed": [0, 1, 12345],
    "presence_penalty": [0, 0.5, -1], "frequency_penalty": [0, 0.5], "repetition_penalty": [1, 1.1],
    "stream": [False, True], "stream_options": [{"include_usage": True}, None], "ignore_eos": [False, True],
    "min_tokens": [0, 1], "skip_special_tokens": [True, False], "include_stop_str_in_output": [False, True],
    "logit_bias": [{"1": 5}, {"42": -100}, {}], "user": ["u1"], "use_beam_search": [False],
    "length_penalty": [1.0, 0.5], "max_tokens": [1, 2, 4],
}
_COMPLETION_ONLY = {"logprobs": [None, 0, 1, 5], "echo": [False, True], "best_of": [None, 1], "suffix": [None]}
_CHAT_ONLY = {"logprobs": [False, True], "top_logprobs": [None, 0, 2], "max_completion_tokens": [1, 3],
              "add_generation_prompt": [True, False], "continue_final_message": [False],
              "chat_template_kwargs": [None, {}, {"enable_thinking": False}], "response_format": [{"type": "text"}],
              "tool_choice": ["none"], "parallel_tool_calls": [None, True]}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def junk_value(rng: random.Random):
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(_INTS) * rng.choice([1, 1, -1])
    if pick < 0.55:
        return rng.choice(_FLOATS)
    if pick < 0.9:
        return rng.choice(_JUNK)
    return "z" * rng.choice([1000, 70000])


def _messages(rng: random.Random) -> list:
    msgs = [{"role": "user", "content": rng.choice(PROMPTS)}]
    r = rng.random()
    if r < 0.1:
        msgs.insert(0, {"role": "system", "content": "Be brief."})
    elif r < 0.2:
        msgs[0]["content"] = [{"type": "text", "text": rng.choice(PROMPTS)}]
    elif r < 0.3:  # mutate a message
        m = msgs[0]
        key = rng.choice(["role", "content", "name", "tool_calls", "extra"])
        m[key] = junk_value(rng)
        if rng.random() < 0.3:
            del m[rng.choice(list(m))]
    elif r < 0.35:
        msgs[0]["content"] = [{"type": "text", "text": junk_value(rng)}]
    elif r < 0.4:
        msgs = rng.choice([[], [None], "hi", [{"content": "x"}], [{"role": "assistant"}]])
    return msgs


@dataclass
class ApiCase:
    path: str
    body: bytes
    mutated: list[str]  # fields changed from a valid value (empty: the request is valid)
    valid: bool  # built only from valid values (the server must answer 200)


def api_case(rng: random.Random, model: str) -> ApiCase:
    chat = rng.random() < 0.5
    base: dict = {"model": model, "max_tokens": rng.choice([1, 2, 4]), "temperature": 0}
    fields = dict(_VALID, **(_CHAT_ONLY if chat else _COMPLETION_ONLY))
    if chat:
        base["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        base["prompt"] = rng.choice(PROMPTS)
    for k in rng.sample(sorted(fields), rng.randint(0, 3)):  # valid variety first
        v = rng.choice(fields[k])
        if v is not None:
            base[k] = v
    if base.get("seed") in FAULT_SEEDS:
        base["seed"] = 1
    mutated: list[str] = []
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        k = rng.choice(sorted(fields) + ["model", "prompt" if not chat else "messages", "unknown_field"])
        if k == "messages":
            base[k] = _messages(rng)
        elif k == "prompt":
            base[k] = rng.choice([junk_value(rng), [1, 2, 3], [[1, 2], [3]], [10**9], [], ["a", "b"], [True]])
        elif k == "model":
            base[k] = rng.choice(["nope", None, 3, model + " "])
        else:
            base[k] = junk_value(rng)
        if k == "seed" and base[k] in FAULT_SEEDS:
            base[k] = 0
        mutated.append(k)
    if mutated and rng.random() < 0.2:
        del base[rng.choice(sorted(base))]
    if mutated and base.get("use_beam_search") is True:
        base["max_tokens"] = 2
    # Keep generation short whatever the mutation did (a request without a bound may run to max_model_len,
    # minutes on a busy CPU); `null` and missing fields are exercised by the other fields.
    if not (isinstance(base.get("max_tokens"), int) and 1 <= base["max_tokens"] <= 4):
        if chat and not isinstance(base.get("max_completion_tokens"), int):
            base["max_completion_tokens"] = 4
        elif not chat:
            base["max_tokens"] = 4
    if chat and rng.random() < 0.05:
        base["chat_template"] = "{% for i in range(100000) %}{{ i }}{% endfor %}"
        mutated.append("chat_template")
    valid = not mutated
    if valid and chat and base.get("logprobs") is not True:
        base.pop("top_logprobs", None)
    if valid and not chat and base.get("echo") and base.get("logprobs") is not None:
        base["echo"] = False
    if valid and base.get("best_of") not in (None, base.get("n", 1)):
        base.pop("best_of")  # OpenAI: best_of must be at least n (pagedserve: equal)
    if valid and base.get("use_beam_search") and (base.get("logprobs") not in (None, False) or base.get("stream")):
        base["use_beam_search"] = False
    text = json.dumps(base, allow_nan=True)
    r = rng.random()
    if r < 0.03:  # syntax-level damage
        text = rng.choice([text[: len(text) // 2], text + "}", text.replace(":", "", 1), "\ufeff" + text,
                           text.replace('"', "'"), "[" + text + "]", "null", '{"prompt": ' + _deep(5000) + "}"])
        valid = False
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return ApiCase(path, text.encode("utf-8", "surrogatepass"), mutated, valid)


def raw_case(rng: random.Random, host: str) -> tuple[str, bytes]:
    """(name, raw HTTP bytes) of one abusive request."""
    body = b'{"model":"x","prompt":"hi","max_tokens":1}'
    h = f"Host: {host}\r\n".encode()
    cases = {
        "garbage": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
        "bad_request_line": b"GARBAGE\r\n\r\n",
        "bad_method": b"FOO /v1/models HTTP/1.1\r\n" + h + b"\r\n",
        "http10": b"GET /health HTTP/1.0\r\n\r\n",
        "long_url": b"GET /v1/models?" + b"a" * 20000 + b" HTTP/1.1\r\n" + h + b"\r\n",
        "many_headers": b"GET /health HTTP/1.1\r\n" + h + b"".join(b"X-H%d: v\r\n" % i for i in range(300)) + b"\r\n",
        "big_header": b"GET /health HTTP/1.1\r\n" + h + b"X-Big: " + b"v" * 200_000 + b"\r\n\r\n",
        "bad_content_length": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Length: abc\r\n\r\n" + body,
        "negative_content_length": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Length: -5\r\n\r\n",
        "short_body": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Length: 10\r\nConnection: close\r\n\r\n"
                      + body[:10],
        "bad_chunked": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "invalid_utf8": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Length: 8\r\nConnection: close\r\n\r\n"
                        + b'{"p":"\xff\xfe"}'[:8],
        "deep_json": _post(h, ("[" * 20000 + "]" * 20000).encode()),
        "deep_object": _post(h, b'{"prompt":' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}"),
        "big_body": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Length: 17000000\r\nConnection: close\r\n\r\n",
        "head_models": b"HEAD /v1/models HTTP/1.1\r\n" + h + b"Connection: close\r\n\r\n",
        "options": b"OPTIONS /v1/completions HTTP/1.1\r\n" + h + b"Connection: close\r\n\r\n",
        "get_on_post": b"GET /v1/completions HTTP/1.1\r\n" + h + b"Connection: close\r\n\r\n",
        "nul_in_path": b"GET /v1/mod%00els HTTP/1.1\r\n" + h + b"Connection: close\r\n\r\n",
        "absolute_uri": b"GET http://evil.example/health HTTP/1.1\r\n" + h + b"Connection: close\r\n\r\n",
        "admin_post": _post(h, b'{"url":"http://127.0.0.1:9"}', "/admin/backends"),
        "text_not_string": _post(h, b'{"messages":[{"role":"user","content":[{"type":"text","text":5}]}],'
                                    b'"max_tokens":1}', "/v1/chat/completions"),
        "wrong_content_type": b"POST /v1/completions HTTP/1.1\r\n" + h + b"Content-Type: text/plain\r\n"
                              b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
    }
    name = rng.choice(sorted(cases))
    return name, cases[name]


def _post(h: bytes, body: bytes, path: str = "/v1/completions") -> bytes:
    return (b"POST " + path.encode() + b" HTTP/1.1\r\n" + h + b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def send_raw(host: str, port: int, data: bytes, timeout: float = 30.0) -> tuple[int | None, bytes, bytes]:
    """Send raw bytes; returns (status or None if no answer, headers, body). Reads one response (by its
    content-length) or until the server closes; the write side stays open (a half-close reads as a
    client disconnect to uvicorn, which may then drop the request)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass  # the server may close early (oversize heads/bodies); read what it answered
        raw = b""
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                raw += c
                head, sep, body = raw.partition(b"\r\n\r\n")
                if sep:
                    length = [int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                              if k.strip().lower() == b"content-length" and v.strip().isdigit()]
                    if (length and len(body) >= length[0]) or data.startswith(b"HEAD "):
                        break
        except OSError:
            pass
    if not raw.startswith(b"HTTP/"):
        return None, b"", raw
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None, head, body
    return status, head, body


def check_response(status: int | None, headers: str, body: bytes, allow_no_answer: bool = False) -> str | None:
    """None if the answer is acceptable for a client error, else what is wrong (a defect)."""
    if status is None:
        return None if allow_no_answer else "no HTTP answer"
    if status >= 500:
        return f"HTTP {status}: {body[:200]!r}"
    if status >= 400:
        if not body:
            return None  # HEAD answers carry no body
        try:
            err = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"HTTP {status} error that is not OpenAI-shaped JSON: {body[:200]!r}"
        if not (isinstance(err.get("message"), str) and isinstance(err.get("type"), str) and "param" in err
                and err.get("code") == status):
            return f"HTTP {status} error JSON lacks message/type/param/code: {body[:200]!r}"
    return None
