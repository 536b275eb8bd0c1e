"""Per-request generation settings, validated once when the request arrives."""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.errors import InvalidRequestError

_MAX_N = 128
_MAX_LOGPROBS = 20
_MAX_TOKEN_ID = 2**31 - 1  # the engine checks the real vocabulary size; this keeps tensors' int64 safe
_MAX_LOGIT_BIAS = 1024
_MAX_LENGTH_PENALTY = 10.0  # len ** penalty stays finite for any max_model_len up to 2^100


def _fail(param: str, msg: str) -> None:
    raise InvalidRequestError(f"{param}: {msg}", param=param)


@dataclass
class StructuredOutputsParams:
    """One output constraint, under vLLM's names; exactly one of the fields is set.

    `json` is a JSON Schema (dict or its JSON text), `regex` a regular expression,
    `choice` a list of allowed strings, `grammar` an EBNF/GBNF grammar, and
    `json_object` any JSON object (OpenAI's `response_format: {"type": "json_object"}`).

    JSON is compact by default (`disable_any_whitespace`: one fixed separator style), so a small
    greedy model cannot loop on whitespace; `disable_any_whitespace=False` allows any whitespace.
    `end_array_on_repeat` (set by tool_choice "required") ends a top-level array at the first
    item that repeats an earlier one (see structured/repeat_close.py).
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = True
    end_array_on_repeat: bool = False


@dataclass
class SamplingParams:
    """Mirrors vLLM's SamplingParams for the fields both support.

    temperature=0 means greedy. `n` samples share the prompt's KV blocks.
    `use_beam_search` keeps `beam_width` beams and returns the best `n` of them.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs per generated token
    prompt_logprobs: int | None = None  # not supported yet: rejected when set
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    beam_width: int | None = None  # default: n
    length_penalty: float = 1.0
    detokenize: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100] (OpenAI)
    structured_outputs: StructuredOutputsParams | None = None

    stop_list: list[str] = field(init=False, default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_slots(self) -> int:
        """Sequences the request occupies at its widest: beams, else its n samples."""
        return self.beam_width if self.use_beam_search else self.n

    @property
    def has_penalties(self) -> bool:
        """Repetition, presence or frequency penalties: the sampler reads the token history."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def is_plain_greedy(self) -> bool:
        """The next token is the argmax of the (grammar-masked) logits, with nothing else to compute or
        return: one stream, no penalties, no bias, no logprobs. `min_tokens` is the caller's to check per step
        (until it is reached, EOS and stop ids are blocked, so the row is sampled the long way)."""
        return (self.greedy and self.num_slots == 1 and not self.use_beam_search and self.logprobs is None
                and not self.has_penalties and not self.logit_bias)

    def can_overlap(self) -> bool:
        """Can the next token stay on the device for a step (overlapped scheduling)? Only if sampling reads
        nothing the host learns from the latest token: no penalties (token counts), no min_tokens (the
        blocked ids depend on the count), no grammar (advanced on the host), no logprobs (packed on the host),
        no beams or n > 1 forks. Temperature, top-k/p, min-p, seeds and logit_bias all run on the device."""
        return (self.num_slots == 1 and not self.use_beam_search and self.structured_outputs is None
                and self.logprobs is None and not self.has_penalties and self.min_tokens == 0)

    def can_speculate(self) -> bool:
        """Can drafts stand in for this request's next tokens (speculative decoding)? Beams and grammars
        decode one token a step; n > 1 speculates per child once the siblings have forked."""
        return not self.use_beam_search and self.structured_outputs is None

    def validate(self) -> None:
        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # rejects NaN

        if not is_int(self.n) or not 1 <= self.n <= _MAX_N:
            _fail("n", f"must be an integer in [1, {_MAX_N}], got {self.n!r}")
        if not is_num(self.temperature) or self.temperature < 0 or self.temperature > 100:
            _fail("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or (self.top_k < 0 and self.top_k != -1) or self.top_k > _MAX_TOKEN_ID:
            _fail("top_k", f"must be -1 (disabled), 0 (disabled) or a positive integer up to the vocabulary size, "
                           f"got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                _fail(name, f"must be in [-2, 2], got {v!r}")
        if not is_num(self.repetition_penalty) or not 0 < self.repetition_penalty <= 10:
            _fail("repetition_penalty", f"must be in (0, 10], got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            _fail("seed", f"must be a 64-bit integer, got {self.seed!r}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            _fail("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            _fail("min_tokens", f"must be a non-negative integer, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if len(self.stop_list) > 16 or not all(isinstance(s, str) and s for s in self.stop_list):
            _fail("stop", "must be a non-empty string or a list of at most 16 non-empty strings")
        if not all(is_int(t) and 0 <= t <= _MAX_TOKEN_ID for t in self.stop_token_ids):
            _fail("stop_token_ids", "must be a list of token ids (non-negative integers below the vocabulary size)")
        if not is_num(self.length_penalty) or not -_MAX_LENGTH_PENALTY <= self.length_penalty <= _MAX_LENGTH_PENALTY:
            _fail("length_penalty", f"must be a number in [-{_MAX_LENGTH_PENALTY}, {_MAX_LENGTH_PENALTY}], "
                                    f"got {self.length_penalty!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= _MAX_LOGPROBS):
            _fail("logprobs", f"must be an integer in [0, {_MAX_LOGPROBS}], got {self.logprobs!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > _MAX_LOGIT_BIAS:
                _fail("logit_bias", f"must map at most {_MAX_LOGIT_BIAS} token ids to numbers")
            for t, v in self.logit_bias.items():
                if not is_int(t) or not 0 <= t <= _MAX_TOKEN_ID:
                    _fail("logit_bias", f"keys must be token ids (non-negative integers), got {t!r}")
                if not is_num(v) or not -100 <= v <= 100:
                    _fail("logit_bias", f"values must be numbers in [-100, 100], got {v!r} for token {t}")
        if self.prompt_logprobs is not None:
            _fail("prompt_logprobs", "is not supported by pagedserve yet")
        if self.structured_outputs is not None:
            so = self.structured_outputs
            if not isinstance(so, StructuredOutputsParams):
                _fail("structured_outputs", f"must be a StructuredOutputsParams, got {type(so).__name__}")
            given = [k for k in ("json", "regex", "choice", "grammar") if getattr(so, k) is not None]
            given += ["json_object"] if so.json_object else []
            if len(given) != 1:
                _fail("structured_outputs", "give exactly one of json, regex, choice, grammar or json_object"
                      + (f" (got {', '.join(given)})" if given else " (got none)"))
            if self.use_beam_search:
                _fail("use_beam_search", "beam search cannot be combined with structured outputs "
                      "(response_format / structured_outputs / guided_*)")
        if self.use_beam_search:
            width = self.beam_width if self.beam_width is not None else self.n
            if not is_int(width) or not 1 <= width <= 32:
                _fail("beam_width", f"must be an integer in [1, 32], got {width!r}")
            if self.n > width:
                _fail("n", f"({self.n}) must not exceed beam_width ({width})")
            if self.logprobs is not None:
                _fail("logprobs", "is not supported with use_beam_search")
            self.beam_width = width

    def clone(self, **changes) -> "SamplingParams":
        from dataclasses import fields

        # Shallow on purpose: asdict would turn `structured_outputs` into a plain dict.
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d.update(changes)
        return SamplingParams(**d)
