"""Tool-call parsers for `tool_choice: "auto"`, chosen by `--tool-call-parser` (vLLM's names).

A parser turns the model's text, fed delta by delta, into pieces: content text,
the start of call i (its function name) and fragments of call i's arguments
(JSON text). The non-streaming path feeds the whole text through the same
machine, so a streamed answer and a plain one always agree.

Auto-mode output is free text, so a call is emitted only once its JSON is
complete and parses: a malformed call never reaches the client as a call,
it comes back as plain content (never a 500). The constrained modes
(tool_choice "required" or a named function) stream arguments as they are
generated instead, see constrained_calls.py.
"""
from __future__ import annotations

import json

# Pieces: ("content", text) | ("start", index, name) | ("args", index, fragment)
Piece = tuple


def parse_call(text: str) -> tuple[str, str] | None:
    """`{"name": ..., "arguments" | "parameters": {...}}` -> (name, arguments JSON), or None if it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return call_from_obj(obj)


def call_from_obj(obj) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments already encoded
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


class ToolParser:
    """Base: pieces out of text deltas. Subclasses implement `feed` and `finish`."""

    name = ""

    def __init__(self) -> None:
        self.ncalls = 0
        self._held_ws = ""  # whitespace at the end of the content so far: dropped if a call follows
        self._skip_ws = False  # after a call: drop the whitespace that separates it from what follows

    def feed(self, text: str) -> list[Piece]:
        raise NotImplementedError

    def finish(self) -> list[Piece]:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------
    def _content(self, s: str, out: list[Piece], final: bool = False) -> None:
        """Content text, with the whitespace next to a call block removed (text without calls is kept exactly)."""
        if self._skip_ws:
            s = s.lstrip()
            if not s:
                return
            self._skip_ws = False
        s = self._held_ws + s
        t = s if final else s.rstrip()
        self._held_ws = s[len(t):]
        if t:
            out.append(("content", t))

    def _call(self, name: str, args: str, out: list[Piece]) -> None:
        self._held_ws = ""
        out.append(("start", self.ncalls, name))
        out.append(("args", self.ncalls, args))
        self.ncalls += 1
        self._skip_ws = True


def _held_prefix(buf: str, tag: str) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of `tag` (it may become the tag)."""
    for k in range(min(len(tag) - 1, len(buf)), 0, -1):
        if buf.endswith(tag[:k]):
            return k
    return 0


class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (Hermes 2/3, Qwen2.5, Qwen3)."""

    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.inside = False
        self._tag_ws = ""

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self.buf += text
        while True:
            if not self.inside:
                i = self.buf.find(self.start_tag)
                if i < 0:
                    keep = _held_prefix(self.buf, self.start_tag)
                    self._content(self.buf[:len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep:]
                    return out
                self._content(self.buf[:i], out)
                self._tag_ws, self._held_ws = self._held_ws, ""  # restored if the block is no call
                self.buf = self.buf[i + len(self.start_tag):]
                self.inside = True
            else:
                j = self.buf.find(self.end_tag)
                if j < 0:
                    return out
                self._block(self.buf[:j], True, out)
                self.buf = self.buf[j + len(self.end_tag):]
                self.inside = False

    def _block(self, body: str, closed: bool, out: list[Piece]) -> None:
        call = parse_call(body.strip())
        if call is not None:
            self._call(*call, out)
        else:  # not a call after all: the block is content, tags included
            self._content(self._tag_ws + self.start_tag + body + (self.end_tag if closed else ""), out)

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        if self.inside:  # an unclosed last block (stopped at its end tag, or ran out of tokens)
            self._block(self.buf, False, out)
        else:
            self._content(self.buf, out, final=True)
        self._content("", out, final=True)
        self.buf = ""
        return out


class Llama3JsonToolParser(ToolParser):
    """Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`,
    several separated by `;`. Output that does not start with one is plain content."""

    name = "llama3_json"
    tag = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self.buf = ""
        self.mode = "start"  # start -> json | text
        self.lead = ""  # whitespace before the first call, kept if the output turns out to be text
        self.decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[Piece]:
        out: list[Piece] = []
        self.buf += text
        if self.mode == "start":
            s = self.buf.lstrip()
            if not s or (self.tag.startswith(s) and len(s) < len(self.tag)):
                return out
            if s.startswith(self.tag):
                s = s[len(self.tag):]
            if s.lstrip()[:1] in ("{", ""):
                self.lead = self.buf[:len(self.buf) - len(self.buf.lstrip())]
                self.mode, self.buf = "json", s
            else:
                self.mode = "text"
        if self.mode == "text":
            self._content(self.buf, out, final=True)
            self.buf = ""
            return out
        self._decode(out)
        return out

    def _decode(self, out: list[Piece]) -> None:
        while True:
            s = self.buf.lstrip()
            if s.startswith(";"):
                s = s[1:].lstrip()
            if "}" not in s:
                self.buf = s
                return
            try:
                obj, end = self.decoder.raw_decode(s)
            except ValueError:  # incomplete (or malformed: decided at the end)
                self.buf = s
                return
            call = call_from_obj(obj)
            if call is None:
                self.buf = s
                self.mode = "text"  # valid JSON but not a call: the rest is content
                self._content(self.lead + s if self.ncalls == 0 else s, out, final=True)
                self.buf = ""
                return
            self._call(*call, out)
            self.buf = s[end:]

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        if self.mode == "start":
            self._content(self.buf, out, final=True)
        elif self.mode == "json" and self.buf.strip():
            self._content(self.lead + self.buf if self.ncalls == 0 else self.buf, out, final=True)
        self._content("", out, final=True)
        self.buf = ""
        return out


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesToolParser, Llama3JsonToolParser)}
"""--tool-call-parser choices; which model family uses which is in the README's "Tool calling" section."""


def extract(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Whole-text extraction: (content or None, [(name, arguments JSON)]); what streaming would have sent."""
    return collect(parser.feed(text) + parser.finish())


def collect(pieces: list[Piece]) -> tuple[str | None, list[tuple[str, str]]]:
    content, names, args = [], {}, {}
    for p in pieces:
        if p[0] == "content":
            content.append(p[1])
        elif p[0] == "start":
            names[p[1]] = p[2]
            args[p[1]] = ""
        else:
            args[p[1]] += p[2]
    calls = [(names[i], args[i]) for i in sorted(names)]
    return ("".join(content) or None) if calls else "".join(content), calls
