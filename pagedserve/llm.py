"""Offline API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`, as vLLM users expect."""
from __future__ import annotations

import itertools
from typing import Sequence as Seq

from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.errors import InvalidRequestError
from pagedserve.outputs import RequestOutput
from pagedserve.runtime import configure_engine_threads
from pagedserve.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        configure_engine_threads()  # the engine runs in this process: its pool gets this process's cores
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise InvalidRequestError(f"got {len(params)} sampling_params for {len(prompts)} prompts",
                                          param="sampling_params")
        else:
            params = [params] * len(prompts)
        order: dict[str, int] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = str(next(self._ids))
                if isinstance(prompt, dict):
                    self.engine.add_request(rid, prompt.get("prompt"), p, prompt_token_ids=prompt.get("prompt_token_ids"),
                                            final_only=True)
                else:
                    self.engine.add_request(rid, prompt, p, final_only=True)
                order[rid] = i
        except Exception:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return self._run(order, use_tqdm)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        results: list[RequestOutput | None] = [None] * len(order)
        bar = None
        if use_tqdm and len(order) > 1:
            from tqdm import tqdm

            bar = tqdm(total=len(order), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        if bar is not None:
                            bar.update(1)
                if self.engine.request_errors:  # e.g. a grammar that did not compile
                    _, err = self.engine.request_errors[0]
                    self.engine.request_errors.clear()
                    raise err
                for rid, why in self.engine.take_failed():
                    if rid in order:
                        from pagedserve.errors import RequestFailedError

                        raise RequestFailedError(f"request {order[rid]} failed in the engine: {why}")
        except BaseException:
            # A failed step (or Ctrl-C) must not leave half-run requests behind to wedge later calls.
            for rid in order:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        tok = self.engine.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; pass chat_template=",
                                      param="messages")
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template)
        except Exception as e:  # jinja errors from malformed messages
            raise InvalidRequestError(f"messages: cannot apply the chat template: {e}", param="messages") from e

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in convs:
            text = self.apply_chat_template(conv, add_generation_prompt, chat_template)
            # The template already holds the special tokens: do not add BOS again.
            prompts.append({"prompt": text, "prompt_token_ids": self.engine.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def beam_search(self, prompts: Prompt | Seq[Prompt], beam_width: int, max_tokens: int,
                    length_penalty: float = 1.0, ignore_eos: bool = False) -> list[RequestOutput]:
        """Beam search with `beam_width` beams; each output lists the beams ranked best first."""
        params = SamplingParams(n=beam_width, use_beam_search=True, beam_width=beam_width, max_tokens=max_tokens,
                                length_penalty=length_penalty, ignore_eos=ignore_eos, temperature=0)
        return self.generate(prompts, params, use_tqdm=False)
