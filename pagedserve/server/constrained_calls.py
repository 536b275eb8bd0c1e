"""Grammar-constrained tool calls: `tool_choice: "required"` and a named function.

The engine is made to emit only JSON matching a schema (SamplingParams.structured_outputs),
so every call parses and its arguments validate against the function's parameter schema:

- named function: the output is the arguments object itself;
- required: the output is `[{"name": <one of the tools>, "parameters": {...}}, ...]`, each
  item's parameters constrained by the schema of the tool it names (exactly one item when
  `parallel_tool_calls` is false). The engine ends the array at the first item that repeats an
  earlier one (structured/repeat_close.py), and that item is not a call.

The stream parsers here emit the same pieces as tool_parsers.py, but stream each call's
arguments as they are generated: they are the raw JSON text of the `parameters` value,
so the fragments concatenate to exactly what the non-streaming answer carries. A call that
max_tokens cuts is streamed up to the cut (ToolOutput.message drops it from a whole answer).
"""
from __future__ import annotations

import json

from pagedserve.server.tool_parsers import Piece


def parameters_of(function: dict) -> dict:
    """The function's parameter schema; a function without one takes an empty object."""
    params = function.get("parameters")
    return params if params is not None else {"type": "object", "properties": {}}


def named_schema(function: dict) -> dict:
    return parameters_of(function)


def required_schema(functions: list[dict], parallel: bool = True) -> dict:
    """A JSON array of one or more {name, parameters} objects, one alternative per function.

    Each function's `$defs`/`definitions` move to the top level under a per-function prefix (and its
    `#/...` references with them), since a `#/$defs/X` reference resolves against the document root."""
    defs: dict = {}
    alternatives = []
    for i, fn in enumerate(functions):
        params = _hoist(parameters_of(fn), f"f{i}_", f"#/items/anyOf/{i}/properties/parameters", defs)
        alternatives.append({"type": "object",
                             "properties": {"name": {"type": "string", "enum": [fn["name"]]}, "parameters": params},
                             "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _hoist(params: dict, prefix: str, root: str, defs: dict) -> dict:
    params = dict(params)
    for key in ("$defs", "definitions"):
        found = params.pop(key, None)
        for name, sub in (found.items() if isinstance(found, dict) else ()):  # a non-object: nothing to hoist
            defs[prefix + name] = sub
    ref_map = {"$defs": prefix, "definitions": prefix}

    def fix(node):
        if isinstance(node, dict):
            out = {k: fix(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                parts = ref[2:].split("/", 1) if ref.startswith("#/") else []
                if len(parts) == 2 and parts[0] in ref_map:
                    out["$ref"] = f"#/$defs/{prefix}{parts[1]}"
                else:  # "#" or another pointer into the parameters schema itself
                    out["$ref"] = root + ref[1:]
            return out
        if isinstance(node, list):
            return [fix(v) for v in node]
        return node

    params = fix(params)
    for name in [n for n in defs if n.startswith(prefix)]:
        defs[name] = fix(defs[name])
    return params


class NamedCallParser:
    """The whole output is the arguments of one call to `name`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False
        self.held_ws = ""
        self.ncalls = 1

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        if not self.started:
            out.append(("start", 0, self.name))
            self.started = True
            text = text.lstrip()
        s = self.held_ws + text
        t = s.rstrip()
        self.held_ws = s[len(t):]
        if t:
            out.append(("args", 0, t))
        return out

    def finish(self) -> list[Piece]:
        return [] if self.started else [("start", 0, self.name), ("args", 0, "{}")]


class RequiredCallsParser:
    """Streams `[{"name": ..., "parameters": {...}}, ...]` char by char: each call starts once its name
    is complete, and the raw text of its `parameters` value streams as argument fragments.

    An item whose text repeats an earlier item's is not a call (the engine ends the array there).
    So the pieces of an item are held back while its text is still a prefix of an earlier item's,
    and sent as soon as it differs: a repeat is never streamed, and the stream never takes back
    anything it sent."""

    ARG_KEYS = ("parameters", "arguments")

    def __init__(self) -> None:
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.ncalls = 0  # calls whose name is known (started)
        self.items: list[str] = []  # text of each completed item
        self.item: list[str] | None = None  # text of the item being read
        self.alike: list[str] = []  # earlier items that the current one is a prefix of, so far
        self.held: list[Piece] | None = None  # the current item's pieces while it may be a repeat
        self._reset_call()

    def _reset_call(self) -> None:
        self.key_chars: list[str] | None = None  # a key at depth 2 being read
        self.key: str | None = None
        self.val_key: str | None = None  # the key whose value is being read; None between values
        self.val_started = False
        self.val_chars: list[str] = []  # the name value
        self.name: str | None = None
        self.call_index: int | None = None
        self.pending: list[str] = []  # argument text seen before the name
        self.ws = ""  # whitespace inside the arguments, sent only if more of them follows

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        for c in text:
            self._char(c, out)
        return _coalesce(out)

    def finish(self) -> list[Piece]:
        return []  # an item cut short: what it streamed stays; held pieces (a repeat so far) are dropped

    def _emit(self, piece: Piece, out: list[Piece]) -> None:
        (out if self.held is None else self.held).append(piece)

    def _item_char(self, c: str, out: list[Piece]) -> None:
        """Record a char of the current item; release its held pieces once it differs from every earlier item."""
        k = len(self.item)
        self.item.append(c)
        if self.held is not None:
            self.alike = [e for e in self.alike if len(e) > k and e[k] == c]
            if not self.alike:
                out.extend(self.held)
                self.held = None

    def _end_item(self, out: list[Piece]) -> None:
        text = "".join(self.item)
        if self.held is not None and text in self.items:  # a repeat: not a call
            if self.name is not None:
                self.ncalls -= 1
        elif self.held is not None:
            out.extend(self.held)
        self.items.append(text)
        self.item, self.held, self.alike = None, None, []

    def _args(self, c: str, out: list[Piece]) -> None:
        if c.isspace():
            self.ws += c
            return
        s, self.ws = self.ws + c, ""
        if self.call_index is None:
            self.pending.append(s)
        else:
            self._emit(("args", self.call_index, s), out)

    def _end_value(self, out: list[Piece]) -> None:
        if self.val_key == "name" and self.name is None:
            try:
                name = json.loads("".join(self.val_chars))
            except ValueError:
                name = None
            if isinstance(name, str):
                self.name, self.call_index = name, self.ncalls
                self.ncalls += 1
                self._emit(("start", self.call_index, name), out)
                if self.pending:
                    self._emit(("args", self.call_index, "".join(self.pending)), out)
                    self.pending = []
        self.val_key, self.val_started, self.ws = None, False, ""

    def _char(self, c: str, out: list[Piece]) -> None:
        if self.item is not None:
            self._item_char(c, out)
        in_value = self.val_key is not None
        if self.in_str:
            if self.esc:
                self.esc = False
            elif c == "\\":
                self.esc = True
            elif c == '"':
                self.in_str = False
            if self.key_chars is not None:
                if self.in_str:
                    self.key_chars.append(c)
                else:
                    self.key = json.loads('"' + "".join(self.key_chars) + '"')
                    self.key_chars = None
            elif in_value:
                self._value_char(c, out)
            return
        if self.depth == 0:
            if c == "[":
                self.depth = 1
            return
        if self.depth == 1:
            if c == "{":
                self.depth = 2
                self._reset_call()
                self.item, self.alike = [c], list(self.items)
                self.held = [] if self.alike else None
            elif c == "]":
                self.depth = 0
            return
        if self.depth == 2:
            if in_value and c in ",}":
                self._end_value(out)
                in_value = False
            if not in_value:
                if c == '"':
                    self.in_str, self.key_chars = True, []
                elif c == ":":
                    self.val_key = self.key if self.key is not None else ""
                elif c == "}":
                    self.depth = 1
                    self._end_item(out)
                return
        if not self.val_started and c.isspace():
            return
        self.val_started = True
        if c == '"':
            self.in_str = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        self._value_char(c, out)

    def _value_char(self, c: str, out: list[Piece]) -> None:
        if self.val_key == "name":
            self.val_chars.append(c)
        elif self.val_key in self.ARG_KEYS:
            self._args(c, out)


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and p[0] == "args" and out[-1][0] == "args" and out[-1][1] == p[1]:
            out[-1] = ("args", p[1], out[-1][2] + p[2])
        else:
            out.append(p)
    return out
