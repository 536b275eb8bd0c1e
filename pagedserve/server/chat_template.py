"""Rendering chat templates with bounded output and work, off the event loop.

transformers already compiles chat templates in jinja2's ImmutableSandboxedEnvironment (no
attribute writes, no unsafe calls, `range` capped at 100,000). That sandbox does not bound
what a template produces: nested loops turn a 160-byte template into gigabytes. So every
compiled template gets, once, a join that stops at `max_chars` and a `range` that draws
from a per-render budget of iterations; breaking either is a 400 for the request.

A template sent by the client (`chat_template`, top-level or in `chat_template_kwargs`) is
refused unless the operator started the server with `--trust-request-chat-template` (vLLM's
flag); the bounds apply to the server's own template too.
"""
from __future__ import annotations

import threading
from typing import Any

from pagedserve.errors import InvalidRequestError

DEFAULT_MAX_CHARS = 4 << 20  # rendered prompt characters; far above what a max_model_len prompt needs
RANGE_BUDGET = 200_000  # range() iterations per render, all loops together

_local = threading.local()


class TemplateLimitError(Exception):
    pass


def _budgeted_range(*args):
    r = range(*args)
    left = getattr(_local, "range_left", RANGE_BUDGET) - len(r)
    if left < 0:
        raise TemplateLimitError(f"the chat template asked for more than {RANGE_BUDGET} loop iterations")
    _local.range_left = left
    return r


def _bounded_concat(pieces) -> str:
    limit = getattr(_local, "max_chars", DEFAULT_MAX_CHARS)
    out, size = [], 0
    for p in pieces:
        size += len(p)
        if size > limit:
            raise TemplateLimitError(f"the chat template's output exceeds {limit} characters")
        out.append(p)
    return "".join(out)


def _guard(template: str) -> None:
    """Install the bounds on transformers' cached compiled template (its environment is per template)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(template).environment
    if env.concat is not _bounded_concat:
        env.concat = _bounded_concat
        env.globals["range"] = _budgeted_range


def request_template(req_template: str | None, kwargs: dict | None, trusted: bool) -> tuple[str | None, dict]:
    """The client's template (if any, and allowed) and the remaining template kwargs."""
    kwargs = dict(kwargs or {})
    inner = kwargs.pop("chat_template", None)
    template = req_template if req_template is not None else inner
    if template is None:
        return None, kwargs
    param = "chat_template" if req_template is not None else "chat_template_kwargs.chat_template"
    if not trusted:
        raise InvalidRequestError(
            f"{param}: request-supplied chat templates are refused by this server; the operator can allow them "
            "with --trust-request-chat-template", param=param)
    if not isinstance(template, str):
        raise InvalidRequestError(f"{param}: must be a string", param=param)
    return template, kwargs


def render(tokenizer, convo: list[dict], *, template: str | None, add_generation_prompt: bool,
           continue_final_message: bool, kwargs: dict, max_chars: int = DEFAULT_MAX_CHARS,
           tools: list[dict] | None = None) -> str:
    """apply_chat_template(tokenize=False) under the bounds; runs in a worker thread."""
    # Names apply_chat_template itself takes must not arrive through chat_template_kwargs.
    extra: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in _RESERVED}
    if tools:
        extra["tools"] = tools  # the request's tools (tool_prompt.adapt), as the template expects them
    _local.range_left = RANGE_BUDGET
    _local.max_chars = max_chars
    try:
        chosen = template if template is not None else tokenizer.get_chat_template()
        _guard(chosen)  # also where a request template's syntax errors surface
        return tokenizer.apply_chat_template(convo, chat_template=chosen, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message, **extra)
    except TemplateLimitError as e:
        raise InvalidRequestError(f"messages: {e}", param="messages") from None
    except (MemoryError, RecursionError) as e:
        raise InvalidRequestError(f"messages: the chat template failed ({type(e).__name__})",
                                  param="messages") from None
    except Exception as e:  # noqa: BLE001 - template errors (raise_exception, bad syntax) are the caller's
        raise InvalidRequestError(f"messages: cannot apply the chat template: {e}", param="messages") from None


_RESERVED = frozenset({"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                       "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                       "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
