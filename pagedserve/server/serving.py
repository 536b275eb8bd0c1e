"""OpenAI completions and chat completions on top of the AsyncEngine.

One HTTP request becomes one engine request per prompt (a completions prompt
list) sharing one output stream; `n` samples stay inside the engine request
(they share the prompt's KV blocks). Every check that can fail is done here,
before anything reaches the engine, so a streaming response never starts
with an error: prompt length vs max_model_len, token ids vs the vocabulary,
n vs max_num_seqs, KV blocks, queue length.

Token counts in `usage` are the engine's token lists (prompt ids as tokenized
here, output ids as sampled), never counts of stream chunks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from functools import partial
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from pagedserve.engine.async_engine import AsyncEngine, RequestStream
from pagedserve.engine.engine_process import EngineOutput, SeqDelta
from pagedserve.engine.request_checks import EngineLimits, check_request
from pagedserve.errors import (InvalidRequestError, ModelNotFoundError, NotReadyError, PagedServeError,
                               PromptTooLongError, QueueFullError)
from pagedserve.sampling_params import SamplingParams
from pagedserve.server import chat_template
from pagedserve.server.constraints import check_constraint, constraint_from_request
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                                        TokenizeRequest, parse)
from pagedserve.server.tool_calling import ToolOptions, ToolOutput, ToolPlan, plan_tools
from pagedserve.server.tool_prompt import adapt, history_tool_calls, template_source

log = logging.getLogger("pagedserve.server")

_LP_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps the same way
_TOKENIZE_MAX_LEN = 1 << 20  # /tokenize counts tokens of texts beyond max_model_len too, up to this many
_INLINE_CHARS = 32 << 10  # texts longer than this are tokenized in a worker thread, not on the event loop


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _lp(v: float) -> float:
    return v if v > _LP_FLOOR else _LP_FLOOR  # -inf and NaN compare False: both become the floor


def error_body(e: PagedServeError) -> dict:
    return {"error": {"message": str(e), "type": e.type, "param": e.param, "code": e.status}}


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(e: PagedServeError) -> Response:
    headers = {}
    if e.status == 429:
        headers["Retry-After"] = "1"
    elif e.status == 503 and getattr(e, "retry_after", True):
        headers["Retry-After"] = "5"
    elif e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(error_body(e), e.status, headers)


class SSEResponse(Response):
    """Server-sent events from an async generator; a client disconnect cancels the generator at once.

    (Starlette's StreamingResponse only notices a disconnect on its next write
    under some ASGI versions; a queued request would keep its slot until then.)
    """

    media_type = "text/event-stream"

    def __init__(self, gen: AsyncIterator[str], headers: dict | None = None):
        self.gen = gen
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        async def produce():
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.gen:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        await race_disconnect(receive, produce())
        await self.gen.aclose()


async def race_disconnect(receive, coro):
    """Run `coro`; if the client disconnects first, cancel it (its finally blocks abort the engine requests)."""

    async def listen():
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return

    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(listen())
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task in done:
        listener.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    return None


class _Choice:
    """Accumulated state of one output choice."""

    __slots__ = ("text", "ntok", "logprobs", "finish_reason", "stop_reason", "offset")

    def __init__(self, offset: int = 0):
        self.text: list[str] = []
        self.ntok = 0
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.offset = offset  # completions logprobs: text_offset of the next token


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, metrics: ServerMetrics, served_names: list[str],
                 max_queue_len: int | None = None, log_requests: bool = True, tools: ToolOptions | None = None,
                 trust_request_chat_template: bool = False):
        self.engine = engine
        self.trust_request_chat_template = trust_request_chat_template
        self.max_token_chars = 0  # longest token text in the vocabulary; set with the tokenizer
        self.metrics = metrics
        self.served_names = served_names
        self.model_name = served_names[0]
        self.max_queue_len = max_queue_len
        self.log_requests = log_requests
        self.tool_options = tools or ToolOptions()
        self.tokenizer = None  # set when loaded
        self.created = int(time.time())

    # -- checks ------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine.is_ready and self.tokenizer is not None

    def check_ready(self) -> None:
        self.engine.check_ready()
        if self.tokenizer is None:
            raise NotReadyError("the tokenizer is still loading; retry shortly")

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.served_names:
            raise ModelNotFoundError(f"The model `{name}` does not exist; this server serves "
                                     f"{', '.join(repr(n) for n in self.served_names)}", param="model")

    def check_queue(self, count: int) -> None:
        limit = self.max_queue_len
        if limit is None:
            return
        waiting = self.engine.num_pending_first
        if waiting + count > limit:
            self.metrics.rejected("queue_full")
            raise QueueFullError(f"the server's queue is full: {waiting} requests waiting and --max-queue-len is "
                                 f"{limit}; retry after a short delay")

    def _info(self, key: str):
        return self.engine.info[key]

    def check_prompt(self, ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """The engine's own checks (`request_checks`), run here so a refusal is a 400 before submitting."""
        check_request(ids, params, EngineLimits.from_info(self.engine.info), param)

    def sampling_params(self, req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        bias = None
        if req.logit_bias:
            bias = {}
            for k, v in req.logit_bias.items():
                if not (k.isascii() and k.isdigit() and len(k) < 12):
                    raise InvalidRequestError(f"logit_bias: keys must be token ids (decimal integers), got {k!r}",
                                              param="logit_bias")
                bias[int(k)] = v

        def opt(v, default):
            return default if v is None else v

        return SamplingParams(
            n=req.n, temperature=opt(req.temperature, 1.0), top_p=opt(req.top_p, 1.0), top_k=opt(req.top_k, -1),
            min_p=opt(req.min_p, 0.0), presence_penalty=opt(req.presence_penalty, 0.0),
            frequency_penalty=opt(req.frequency_penalty, 0.0), repetition_penalty=opt(req.repetition_penalty, 1.0),
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens, use_beam_search=req.use_beam_search,
            length_penalty=req.length_penalty, logit_bias=bias)

    def set_tokenizer(self, tokenizer) -> None:
        try:
            self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=0)
        except Exception:  # noqa: BLE001 - no vocabulary listing: no early length check
            self.max_token_chars = 0
        self.tokenizer = tokenizer

    async def add_constraint(self, req, params: SamplingParams) -> None:
        """response_format / structured_outputs / guided_*: checked here (a 400 naming the field), then
        carried to the engine as `params.structured_outputs`."""
        found = constraint_from_request(req)
        if found is None:
            return
        so, param = found
        await check_constraint(so, param)
        params.structured_outputs = so
        params.validate()  # e.g. beam search cannot be constrained

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt",
                     max_len: int | None = None) -> list[int]:
        """Token ids of `text`; long texts are tokenized in a worker thread so /health stays fast.

        A text longer than (max_model_len x the longest token's characters x 2) cannot fit the
        context whatever its tokens: it is refused without tokenizing it at all."""
        if max_len is None:
            max_len = self._info("max_model_len")
        if self.max_token_chars and len(text) > 2 * max_len * self.max_token_chars:
            raise PromptTooLongError(f"This model's maximum context length is {max_len} tokens, but the {param} "
                                     f"has {len(text)} characters, more than that many tokens can hold", param=param)
        if len(text) <= _INLINE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)

    async def apply_chat_template(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                                  continue_final_message: bool = False, kwargs: dict | None = None,
                                  template: str | None = None, tools: list[dict] | None = None) -> str:
        tok = self.tokenizer
        template, kwargs = chat_template.request_template(template, kwargs, self.trust_request_chat_template)
        if template is None and not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; use /v1/completions",
                                      param="messages")
        if continue_final_message and add_generation_prompt:
            add_generation_prompt = False
        convo = []
        for i, m in enumerate(messages):
            content = m.content
            if content is None and not (m.role == "assistant" and (m.tool_calls or continue_final_message)):
                raise InvalidRequestError(f"messages.{i}.content: required for a {m.role!r} message",
                                          param=f"messages.{i}.content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise InvalidRequestError(
                            f"messages.{i}.content: only text parts are supported, got type {part.type!r}",
                            param=f"messages.{i}.content")
                    texts.append(part.text)
                content = "\n".join(texts)
            msg = {"role": m.role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls:
                msg["tool_calls"] = history_tool_calls(m.tool_calls, i)
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            convo.append(msg)
        convo, tools = adapt(convo, tools, template_source(tok, {"chat_template": template} if template else kwargs))
        return await asyncio.to_thread(chat_template.render, tok, convo, template=template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, kwargs=kwargs, tools=tools)

    def _submit(self, base: str, prompts: list[list[int]], params: SamplingParams, arrival: float) -> RequestStream:
        self.check_queue(len(prompts))
        stream = self.engine.new_stream()
        try:
            for i, ids in enumerate(prompts):
                self.engine.add_request(stream, f"{base}-{i}", ids, params, arrival)
        except BaseException:
            self.engine.abort_stream(stream)
            raise
        return stream

    def _log(self, base: str, usage: dict, choices: dict, t0: float, status: str = "") -> None:
        if not self.log_requests:
            return
        reasons = sorted({c.finish_reason or "abort" for c in choices.values()}) or ["-"]
        log.info("%s %s prompt_tokens=%d completion_tokens=%d finish=%s %.2fs", base, status or "done",
                 usage["prompt_tokens"], usage["completion_tokens"], ",".join(reasons), time.time() - t0)

    # -- /v1/completions ---------------------------------------------------------
    async def completions(self, body: bytes, raw: Request) -> Response:
        t0 = time.time()
        req: CompletionRequest = parse(CompletionRequest, body)
        self.check_model(req.model)
        self.check_ready()
        if req.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequestError("best_of must equal n (or be omitted)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise InvalidRequestError("echo with logprobs needs prompt logprobs, which are not supported yet",
                                      param="echo")
        p = req.prompt
        if isinstance(p, str):
            texts, id_lists = [p], None
        elif p and all(isinstance(x, str) for x in p):
            texts, id_lists = list(p), None
        elif p and all(isinstance(x, int) for x in p):
            texts, id_lists = [None], [list(p)]
        elif p and all(isinstance(x, list) for x in p):
            texts, id_lists = [None] * len(p), [list(x) for x in p]
        else:
            raise InvalidRequestError("prompt: must be a string, a list of strings, a list of token ids or a list "
                                      "of token-id lists, and not empty", param="prompt")
        if len(texts) > 1024:
            raise InvalidRequestError("prompt: at most 1024 prompts per request", param="prompt")
        params = self.sampling_params(req, req.max_tokens, req.logprobs)
        await self.add_constraint(req, params)
        if id_lists is None:
            id_lists = [await self.encode(t) for t in texts]
        for ids in id_lists:
            self.check_prompt(ids, params)
        if req.echo:
            texts = [t if t is not None else self.tokenizer.decode(ids) for t, ids in zip(texts, id_lists)]
        base = f"cmpl-{uuid.uuid4().hex}"
        stream = self._submit(base, id_lists, params, t0)
        ctx = _Ctx(base, stream, id_lists, texts if req.echo else None, params.n, req.stream_options, t0)
        headers = {"X-Request-Id": base}
        if req.stream:
            return SSEResponse(self._sse(ctx, "text_completion", self._completion_chunks), headers)
        result = await race_disconnect(raw.receive, self._collect(ctx))
        if result is None:
            return Response(status_code=499)
        choices = []
        for (pi, si), c in sorted(result.items()):
            text = "".join(c.text)
            if req.echo:
                text = texts[pi] + text
            lp = self._completion_logprobs(c.logprobs, 0)[0] if req.logprobs is not None else None
            choices.append({"index": pi * params.n + si, "text": text, "logprobs": lp,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return json_response({"id": base, "object": "text_completion", "created": int(t0), "model": self.model_name,
                              "choices": choices, "usage": ctx.usage()}, headers=headers)

    @staticmethod
    def _completion_logprobs(entries: list, offset: int) -> tuple[dict, int]:
        tokens, token_lps, tops, offsets = [], [], [], []
        for sampled, top in entries:
            tokens.append(sampled.token)
            token_lps.append(_lp(sampled.logprob))
            tops.append({t.token: _lp(t.logprob) for t in top} if top else {sampled.token: _lp(sampled.logprob)})
            offsets.append(offset)
            offset += len(sampled.token)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}, offset

    async def _collect(self, ctx: "_Ctx") -> dict:
        """Run a non-streaming request to the end; returns {(prompt index, output index): _Choice}."""
        try:
            async for outs in ctx.stream:
                ctx.absorb(outs)
        except BaseException:
            self.engine.abort_stream(ctx.stream)
            self._log(ctx.base, ctx.usage(), ctx.choices, ctx.t0, "aborted")
            raise
        self._log(ctx.base, ctx.usage(), ctx.choices, ctx.t0)
        return ctx.choices

    async def _completion_chunks(self, ctx: "_Ctx", head: str) -> AsyncIterator[str]:
        n = ctx.n
        want_lp = False
        if ctx.echo is not None:
            yield "".join(f'{head}{dumps({"index": pi * n + si, "text": t, "logprobs": None, "finish_reason": None})}'
                          f']{ctx.usage_tail(False)}}}\n\n'
                          for pi, t in enumerate(ctx.echo) for si in range(n))
        async for outs in ctx.stream:
            parts = []
            for key, c, text, lps in ctx.absorb(outs):
                if not text and c.finish_reason is None and not lps:
                    continue
                lp = None
                if lps:
                    want_lp = True
                    lp, c.offset = self._completion_logprobs(lps, c.offset)
                elif want_lp:
                    lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                choice = {"index": key[0] * n + key[1], "text": text, "logprobs": lp,
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                parts.append(f"{head}{dumps(choice)}]{ctx.usage_tail(True)}}}\n\n")
            if parts:
                yield "".join(parts)

    async def _sse(self, ctx: "_Ctx", obj: str,
                   chunks: Callable[["_Ctx", str], AsyncIterator[str]]) -> AsyncIterator[str]:
        """One SSE stream: `chunks(ctx, head)`'s content events, then the usage chunk (if asked for)
        and [DONE]; an engine error becomes an error event + [DONE]. Whatever ends the stream
        (done, error, client gone) aborts the request and logs it once."""
        head = (f'data: {{"id":"{ctx.base}","object":"{obj}","created":{int(ctx.t0)},'
                f'"model":{dumps(self.model_name)},"choices":[')
        status = "aborted"
        body = chunks(ctx, head)
        try:
            async for part in body:
                yield part
            if ctx.include_usage:
                yield f'{head}],"usage":{dumps(ctx.usage())}}}\n\n'
            yield "data: [DONE]\n\n"
            status = ""
        except PagedServeError as e:
            status = f"failed ({e.message})"
            yield f"data: {dumps(error_body(e))}\n\ndata: [DONE]\n\n"
        finally:
            await body.aclose()
            self.engine.abort_stream(ctx.stream)
            self._log(ctx.base, ctx.usage(), ctx.choices, ctx.t0, status)

    # -- /v1/chat/completions ------------------------------------------------------
    async def chat(self, body: bytes, raw: Request) -> Response:
        t0 = time.time()
        req: ChatCompletionRequest = parse(ChatCompletionRequest, body)
        self.check_model(req.model)
        self.check_ready()
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self.sampling_params(req, max_tokens, logprobs)
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls, self.tool_options)
        await self.add_constraint(req, params)
        if plan is not None and plan.constrained:
            if params.structured_outputs is not None:
                raise InvalidRequestError("tool_choice 'required' or a named function constrains the output "
                                          "already; drop response_format / structured_outputs", param="tool_choice")
            params.structured_outputs = await plan.checked_constraint()
            params.validate()  # e.g. beam search cannot be constrained
        text = await self.apply_chat_template(req.messages, req.add_generation_prompt, req.continue_final_message,
                                              req.chat_template_kwargs, req.chat_template,
                                              plan.template_tools if plan else None)
        ids = await self.encode(text, add_special_tokens=False, param="messages")  # the template has the specials
        self.check_prompt(ids, params, param="messages")
        base = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self._submit(base, [ids], params, t0)
        ctx = _Ctx(base, stream, [ids], None, params.n, req.stream_options, t0)
        headers = {"X-Request-Id": base}
        tooled = plan if plan is not None and plan.parses else None
        if req.stream:
            if tooled is not None:
                chunks = partial(self._tool_chunks, plan=tooled, want_lp=bool(req.logprobs))
            else:
                chunks = partial(self._chat_chunks, want_lp=bool(req.logprobs))
            return SSEResponse(self._sse(ctx, "chat.completion.chunk", chunks), headers)
        result = await race_disconnect(raw.receive, self._collect(ctx))
        if result is None:
            return Response(status_code=499)
        choices = []
        for (_, si), c in sorted(result.items()):
            message, reason = {"role": "assistant", "content": "".join(c.text)}, c.finish_reason
            if tooled is not None:
                message, reason = tooled.output().message(message["content"], reason)
            choices.append({"index": si, "message": message,
                            "logprobs": {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None,
                            "finish_reason": reason, "stop_reason": c.stop_reason})
        return json_response({"id": base, "object": "chat.completion", "created": int(t0), "model": self.model_name,
                              "choices": choices, "usage": ctx.usage()}, headers=headers)

    @staticmethod
    def _chat_logprobs(entries: list) -> list[dict]:
        out = []
        for sampled, top in entries:
            out.append({"token": sampled.token, "logprob": _lp(sampled.logprob),
                        "bytes": list(sampled.token.encode("utf-8")),
                        "top_logprobs": [{"token": t.token, "logprob": _lp(t.logprob),
                                          "bytes": list(t.token.encode("utf-8"))} for t in top]})
        return out

    async def _chat_chunks(self, ctx: "_Ctx", head: str, want_lp: bool) -> AsyncIterator[str]:
        yield "".join(f'{head}{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                      f'"finish_reason":null}}]{ctx.usage_tail(False)}}}\n\n' for i in range(ctx.n))
        async for outs in ctx.stream:
            parts = []
            for key, c, text, lps in ctx.absorb(outs):
                if text or lps:
                    lp = {"content": self._chat_logprobs(lps)} if want_lp else None
                    choice = {"index": key[1], "delta": {"content": text}, "logprobs": lp, "finish_reason": None}
                    parts.append(f"{head}{dumps(choice)}]{ctx.usage_tail(True)}}}\n\n")
                if c.finish_reason is not None:
                    choice = {"index": key[1], "delta": {}, "logprobs": None, "finish_reason": c.finish_reason,
                              "stop_reason": c.stop_reason}
                    parts.append(f"{head}{dumps(choice)}]{ctx.usage_tail(True)}}}\n\n")
            if parts:
                yield "".join(parts)

    async def _tool_chunks(self, ctx: "_Ctx", head: str, plan: ToolPlan, want_lp: bool) -> AsyncIterator[str]:
        """Chat chunks whose text goes through the tool-call parser: content and tool-call deltas."""
        outputs: dict[int, ToolOutput] = {i: plan.output() for i in range(ctx.n)}
        pending_lp: dict[int, list] = {}
        yield "".join(f'{head}{{"index":{i},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                      f'"finish_reason":null}}]{ctx.usage_tail(False)}}}\n\n' for i in range(ctx.n))
        async for outs in ctx.stream:
            parts = []
            for key, c, text, lps in ctx.absorb(outs):
                si = key[1]
                out = outputs[si]
                if lps:
                    pending_lp.setdefault(si, []).extend(lps)
                deltas = out.feed(text)
                reason = None
                if c.finish_reason is not None:
                    more, reason = out.finish(c.finish_reason)
                    deltas += more
                for d in deltas:
                    lp = pending_lp.pop(si, None)
                    lp = {"content": self._chat_logprobs(lp)} if want_lp and lp else None
                    choice = {"index": si, "delta": d, "logprobs": lp, "finish_reason": None}
                    parts.append(f"{head}{dumps(choice)}]{ctx.usage_tail(True)}}}\n\n")
                if reason is not None:
                    lp = pending_lp.pop(si, None)
                    lp = {"content": self._chat_logprobs(lp)} if want_lp and lp else None
                    choice = {"index": si, "delta": {}, "logprobs": lp, "finish_reason": reason,
                              "stop_reason": c.stop_reason}
                    parts.append(f"{head}{dumps(choice)}]{ctx.usage_tail(True)}}}\n\n")
            if parts:
                yield "".join(parts)

    # -- /tokenize, /detokenize ----------------------------------------------------------
    async def tokenize(self, body: bytes) -> Response:
        req: TokenizeRequest = parse(TokenizeRequest, body)
        self.check_model(req.model)
        self.check_ready()
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequestError("messages: must not be empty", param="messages")
            tools = plan_tools(req.tools, "none", None, ToolOptions()) if req.tools else None
            text = await self.apply_chat_template(req.messages, req.add_generation_prompt,
                                                  kwargs=req.chat_template_kwargs, template=req.chat_template,
                                                  tools=tools.template_tools if tools else None)
            ids = await self.encode(text, add_special_tokens=False, param="messages", max_len=_TOKENIZE_MAX_LEN)
        else:
            ids = await self.encode(req.prompt, add_special_tokens=req.add_special_tokens, max_len=_TOKENIZE_MAX_LEN)
        return json_response({"count": len(ids), "max_model_len": self._info("max_model_len"), "tokens": ids})

    async def detokenize(self, body: bytes) -> Response:
        req: DetokenizeRequest = parse(DetokenizeRequest, body)
        self.check_model(req.model)
        self.check_ready()
        vocab = self._info("vocab_size")
        if req.tokens and (min(req.tokens) < 0 or max(req.tokens) >= vocab):
            raise InvalidRequestError(f"tokens: token ids must be integers in [0, {vocab})", param="tokens")
        if len(req.tokens) <= _INLINE_CHARS // 4:
            return json_response({"prompt": self.tokenizer.decode(req.tokens)})
        return json_response({"prompt": await asyncio.to_thread(self.tokenizer.decode, req.tokens)})


class _Ctx:
    """One HTTP request in flight: its stream, choices and usage."""

    def __init__(self, base: str, stream: RequestStream, prompts: list[list[int]], echo: list[str] | None, n: int,
                 stream_options, t0: float):
        self.base = base
        self.stream = stream
        self.index = {f"{base}-{i}": i for i in range(len(prompts))}
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.echo = echo
        self.n = n
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous = bool(stream_options and stream_options.include_usage
                               and stream_options.continuous_usage_stats)
        self.t0 = t0
        self.choices: dict[tuple[int, int], _Choice] = {}
        if echo is not None:
            for pi, t in enumerate(echo):
                for si in range(n):
                    self.choices[(pi, si)] = _Choice(len(t))

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def usage_tail(self, _: bool) -> str:
        if self.continuous:
            return f',"usage":{dumps(self.usage())}'
        if self.include_usage:
            return ',"usage":null'
        return ""

    def absorb(self, outs: list[EngineOutput]) -> list[tuple[tuple[int, int], _Choice, str, list]]:
        """Fold a batch of engine outputs into the choices; returns merged (key, choice, new text, new logprobs)."""
        merged: dict[tuple[int, int], list] = {}
        for o in outs:
            pi = self.index[o.request_id]
            sd: SeqDelta
            for sd in o.seqs:
                key = (pi, sd.index)
                c = self.choices.get(key)
                if c is None:
                    c = self.choices[key] = _Choice()
                self.completion_tokens += len(sd.token_ids)
                c.ntok += len(sd.token_ids)
                if sd.text:
                    c.text.append(sd.text)
                if sd.logprobs:
                    c.logprobs.extend(sd.logprobs)
                if sd.finish_reason is not None:
                    c.finish_reason, c.stop_reason = sd.finish_reason, sd.stop_reason
                m = merged.get(key)
                if m is None:
                    merged[key] = [c, sd.text, list(sd.logprobs or ())]
                else:
                    m[1] += sd.text
                    if sd.logprobs:
                        m[2].extend(sd.logprobs)
        return [(k, m[0], m[1], m[2]) for k, m in merged.items()]
