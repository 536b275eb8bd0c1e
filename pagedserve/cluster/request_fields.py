"""What the router reads from a request body for its policies (model, max_tokens, stream, a prompt prefix,
an affinity key): parsed once, tolerantly, since a bad body is the backend's to reject."""
from __future__ import annotations

import json

from pagedserve.cluster.policies import RequestInfo


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]; anything else is the backend's to refuse
        return "".join(t for p in content if isinstance(p, dict) and isinstance(t := p.get("text"), str))
    return ""


class BadRequest(Exception):
    """A body the router itself refuses (400)."""


def parse_request(path: str, body: bytes, session: str | None, cfg) -> RequestInfo:
    """The fields policies use, from an OpenAI request body (tolerant: bad JSON is the backend's to reject).
    `cfg` is the RouterConfig: its default_max_tokens and prefix_chars."""
    info = RequestInfo(path=path, max_tokens=cfg.default_max_tokens)
    if not body:
        info.affinity_key = session
        return info
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest("the request body is not accepted: JSON nested too deeply") from None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        info.affinity_key = session
        return info
    model = data.get("model")
    info.model = model if isinstance(model, str) else None
    info.stream = data.get("stream") is True
    mt = data.get("max_completion_tokens") or data.get("max_tokens")
    n = data.get("n")
    if isinstance(mt, int) and mt > 0:
        info.max_tokens = mt
    if isinstance(n, int) and n > 1:
        info.max_tokens *= min(n, 1024)
    text = ""
    n_tok = 0
    messages = data.get("messages")
    if isinstance(messages, list):
        text = "".join(f"{m.get('role', '')}:{_content_text(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):  # a batch of prompts
                text = prompt[0]
                n_tok = sum(len(p) for p in prompt) // 4
                info.max_tokens *= len(prompt)
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):  # token ids
                n_tok = len(prompt)
                text = ",".join(map(str, prompt[: cfg.prefix_chars // 4]))
            elif isinstance(prompt[0], list):  # a batch of token-id lists
                n_tok = sum(len(p) for p in prompt if isinstance(p, list))
                text = ",".join(map(str, prompt[0][: cfg.prefix_chars // 4]))
                info.max_tokens *= len(prompt)
    info.prompt_tokens = n_tok or len(text) // 4
    user = data.get("user")
    info.affinity_key = session or (user if isinstance(user, str) and user else None) or (text[: cfg.prefix_chars] or None)
    return info
