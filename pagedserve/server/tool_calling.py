"""Tool calling for /v1/chat/completions: `tools`, `tool_choice`, `parallel_tool_calls` (vLLM's behaviour).

- "none": the tools still go to the chat template (unless --exclude-tools-when-tool-choice-none),
  the output is never parsed;
- "auto" (the default when tools are given): needs --enable-auto-tool-choice and
  --tool-call-parser; the parser finds calls in the free text;
- "required" / a named function: the output is grammar-constrained (constrained_calls.py), so
  every call parses and its arguments validate against the function's parameter schema.

`ToolPlan` is the checked request; `ToolOutput` turns one choice's text into OpenAI's
`tool_calls` (whole, or as streaming deltas: the same machine does both).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from pagedserve.errors import ConfigError, InvalidRequestError
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.structured import limits
from pagedserve.server.constrained_calls import (NamedCallParser, RequiredCallsParser, named_schema, parameters_of,
                                                required_schema)
from pagedserve.server.tool_parsers import TOOL_PARSERS, Piece


@dataclass
class ToolOptions:
    """The server's tool-calling flags."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False

    def __post_init__(self) -> None:
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise ConfigError(f"--tool-call-parser {self.tool_call_parser!r} is unknown; choose one of "
                              f"{', '.join(sorted(TOOL_PARSERS))}", param="tool_call_parser")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (e.g. hermes for Qwen2.5 and "
                              "the default model, llama3_json for Llama 3.x)", param="tool_call_parser")


def _bad(param: str, msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {msg}", param=param)


def check_tools(tools: list) -> list[dict]:
    """The `function` objects of `tools`, each with a name and a valid parameters JSON Schema."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    functions, seen = [], set()
    for i, t in enumerate(tools):
        if t.get("type", "function") != "function":
            raise _bad(f"tools.{i}.type", f"only 'function' tools are supported, got {t.get('type')!r}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"tools.{i}.function", "missing: a tool is {'type': 'function', 'function': {'name', "
                                              "'description', 'parameters'}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools.{i}.function.name", "every function needs a non-empty name")
        if name in seen:
            raise _bad(f"tools.{i}.function.name", f"the name {name!r} is used by two tools")
        seen.add(name)
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, dict):
                raise _bad(f"tools.{i}.function.parameters", "must be a JSON Schema object")
            param = f"tools.{i}.function.parameters"
            limits.check_value(params, param, schema=True)
            try:
                with limits.guard(param):
                    validator_for(params).check_schema(params)
            except SchemaError as e:
                where = "/".join(str(p) for p in e.path)
                raise _bad(param, f"not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else "")) from None
        functions.append(fn)
    return functions


@dataclass
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    template_tools: list[dict] | None  # what the chat template receives as `tools`
    functions: list[dict] = field(default_factory=list)
    named: str | None = None
    parallel: bool = True
    parser_name: str | None = None

    @property
    def parses(self) -> bool:
        return self.mode != "none"

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> StructuredOutputsParams | None:
        """The engine constraint that makes "required"/named calls always parse and validate."""
        if self.mode == "required":
            return StructuredOutputsParams(json=required_schema(self.functions, self.parallel),
                                           disable_any_whitespace=True, end_array_on_repeat=True)
        if self.mode == "named":
            fn = next(f for f in self.functions if f["name"] == self.named)
            return StructuredOutputsParams(json=named_schema(fn), disable_any_whitespace=True)
        return None

    async def checked_constraint(self) -> StructuredOutputsParams:
        """The constraint, after checking that the grammar library compiles it: a schema it cannot
        compile is a 400 naming that tool's parameters (answers are cached by the checker)."""
        from pagedserve.server.constraints import check_constraint

        for i, fn in enumerate(self.functions):
            if self.mode == "required" or fn["name"] == self.named:
                await check_constraint(StructuredOutputsParams(json=parameters_of(fn), disable_any_whitespace=True),
                                       f"tools.{i}.function.parameters")
        with limits.guard("tool_choice"):
            so = self.constraint()
        await check_constraint(so, "tool_choice")
        return so

    def output(self) -> "ToolOutput":
        if self.mode == "named":
            parser = NamedCallParser(self.named)
        elif self.mode == "required":
            parser = RequiredCallsParser()
        else:
            parser = TOOL_PARSERS[self.parser_name]()
        return ToolOutput(parser, self.parallel)


def plan_tools(tools: list | None, tool_choice, parallel_tool_calls: bool | None,
               opts: ToolOptions) -> ToolPlan | None:
    """Check a request's tool fields; None when it has neither tools nor a tool_choice."""
    if tools is None and tool_choice in (None, "none"):
        return None
    functions = check_tools(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    parallel = parallel_tool_calls is not False
    names = [f["name"] for f in functions]
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise _bad("tool_choice", "a named tool choice is {'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise _bad("tool_choice", f"names the function {name!r}, which is not in tools "
                                      f"({', '.join(map(repr, names)) or 'none given'})")
        return ToolPlan("named", tools, functions, named=name, parallel=parallel)
    if tool_choice not in ("none", "auto", "required"):
        raise _bad("tool_choice", f"must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                                  f"{{'name': ...}}}}, got {tool_choice!r}")
    if tool_choice == "none":
        return ToolPlan("none", None if opts.exclude_tools_when_tool_choice_none else (tools or None), functions)
    if not functions:
        raise _bad("tool_choice", f"{tool_choice!r} needs a non-empty `tools` list")
    if tool_choice == "auto" and not (opts.enable_auto_tool_choice and opts.tool_call_parser):
        raise _bad("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                  'to be set on the server (or send tool_choice "required", "none" or a named '
                                  'function)')
    return ToolPlan(tool_choice, tools, functions, parallel=parallel, parser_name=opts.tool_call_parser)


class ToolOutput:
    """One choice's text -> OpenAI message fields. `feed`/`finish` give streaming deltas;
    `message` runs the same steps on the whole text."""

    def __init__(self, parser, parallel: bool = True):
        self.parser = parser
        self.parallel = parallel
        self.ids: dict[int, str] = {}
        self.calls = 0

    def _deltas(self, pieces: list[Piece]) -> list[dict]:
        out: list[dict] = []
        for p in pieces:
            kind = p[0]
            if kind == "content":
                if out and "content" in out[-1]:
                    out[-1]["content"] += p[1]
                else:
                    out.append({"content": p[1]})
                continue
            i = p[1]
            if not self.parallel and i > 0:
                continue  # parallel_tool_calls=false: only the first call
            if kind == "start":
                self.ids[i] = f"call_{uuid.uuid4().hex[:24]}"
                self.calls += 1
                out.append({"tool_calls": [{"index": i, "id": self.ids[i], "type": "function",
                                            "function": {"name": p[2], "arguments": ""}}]})
            elif i in self.ids:
                out.append({"tool_calls": [{"index": i, "function": {"arguments": p[2]}}]})
        return out

    def feed(self, text: str) -> list[dict]:
        return self._deltas(self.parser.feed(text)) if text else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        deltas = self._deltas(self.parser.finish())
        return deltas, self.finish_reason(finish_reason)

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return "tool_calls" if self.calls and finish_reason == "stop" else finish_reason

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The whole answer. A call whose arguments do not parse (max_tokens cut it) is dropped, so
        every call returned is complete; the finish_reason stays "length"."""
        deltas = self.feed(text)
        more, reason = self.finish(finish_reason)
        content: list[str] = []
        calls: dict[int, dict] = {}
        for d in deltas + more:
            if "content" in d:
                content.append(d["content"])
            for tc in d.get("tool_calls", ()):
                if "id" in tc:
                    calls[tc["index"]] = {"id": tc["id"], "type": "function",
                                          "function": {"name": tc["function"]["name"], "arguments": ""}}
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
        calls = {i: c for i, c in calls.items() if _parses(c["function"]["arguments"])}
        msg: dict = {"role": "assistant", "content": "".join(content) or (None if calls else "")}
        if calls:
            msg["tool_calls"] = [calls[i] for i in sorted(calls)]
        return msg, reason


def _parses(arguments: str) -> bool:
    try:
        json.loads(arguments)
    except ValueError:
        return False
    return True
