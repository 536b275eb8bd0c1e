"""Tools and tool-call history into the chat template.

A template that knows tools (Qwen2.5, Llama 3.1+, Hermes, Mistral...) gets them as
`tools=` and renders them itself; assistant `tool_calls` reach it with their arguments
as a dict (OpenAI sends a JSON string; templates index or `tojson` them), and `tool`
messages keep their role and `tool_call_id`.

A template that ignores tools (the default SmolLM2's) would silently drop them, so
the request is rewritten into the Hermes format instead, which `--tool-call-parser
hermes` reads back: the tool signatures go into the system message, past calls become
`<tool_call>` blocks in the assistant's content and tool results become
`<tool_response>` blocks in a user turn.
"""
from __future__ import annotations

import json

from pagedserve.errors import InvalidRequestError
from pagedserve.structured import limits


def template_source(tokenizer, kwargs: dict | None) -> str:
    src = (kwargs or {}).get("chat_template") or getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(src.values()) if isinstance(src, dict) else str(src)


def history_tool_calls(calls: list, i: int) -> list[dict]:
    """An assistant message's `tool_calls`, checked, with arguments decoded to a dict for the template."""
    out = []
    for j, call in enumerate(calls):
        param = f"messages.{i}.tool_calls.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"{param}: must be {{'id', 'type': 'function', 'function': {{'name', "
                                      f"'arguments'}}}} with a function name", param=param)
        args = fn.get("arguments", {})
        try:  # the message names the arguments; `param` stays the call
            if isinstance(args, str):
                args = limits.load_json(args, f"{param}.function.arguments") if args.strip() else {}
            else:
                limits.check_value(args, f"{param}.function.arguments")
        except InvalidRequestError as e:
            raise InvalidRequestError(e.message, param=param) from None
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def adapt(convo: list[dict], tools: list[dict] | None, src: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand to this template: as they are if it handles them, else in Hermes text."""
    knows_tools = "tools" in src
    knows_calls = "tool_calls" in src
    knows_tool_role = "'tool'" in src or '"tool"' in src
    if knows_tools and knows_calls and knows_tool_role:
        return convo, tools
    out: list[dict] = []
    for m in convo:
        if m.get("tool_calls") and not knows_calls:
            m = dict(m)
            blocks = [f"<tool_call>\n{json.dumps({'name': c['function']['name'], 'arguments': c['function']['arguments']}, ensure_ascii=False)}\n</tool_call>"
                      for c in m.pop("tool_calls")]
            m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
        elif m["role"] == "tool" and not knows_tool_role:
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
                continue
            m = {"role": "user", "content": block, "_tool_turn": True}
        out.append(m)
    for m in out:
        m.pop("_tool_turn", None)
    if tools and not knows_tools:
        section = hermes_tools_section(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": (out[0].get("content") or "") + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
        tools = None
    return out, tools if knows_tools else None


def hermes_tools_section(tools: list[dict]) -> str:
    """The system-prompt text that offers `tools` in the Hermes format (for templates without tool support)."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\n"
            "You can call functions to help answer the user. Their signatures are inside <tools></tools>:\n"
            f"<tools>\n{sigs}\n</tools>\n\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-json-object>}\n</tool_call>')
