"""ASGI request-body and HEAD helpers of the router (bounded body reads, a body-less HEAD answer)."""
from __future__ import annotations

MAX_BODY_BYTES = 16 << 20  # as the server's limit: a larger body gets 413 in the router, before any backend


class TooLarge(Exception):
    """The body is over the limit (413)."""


def content_length(scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return int(v) if v.isdigit() and len(v) < 19 else None
    return None


async def read_body(receive, limit: int = MAX_BODY_BYTES, declared: int | None = None) -> bytes | None:
    """The whole request body (None if the client went away first); TooLarge past `limit` bytes,
    at once when the declared Content-Length says so (without waiting for the bytes)."""
    if declared is not None and declared > limit:
        raise TooLarge(f"the request body has {declared} bytes; the limit is {limit}")
    msg = await receive()
    if msg["type"] == "http.disconnect":
        return None
    body = msg.get("body", b"")
    if not msg.get("more_body"):
        if len(body) > limit:
            raise TooLarge(f"the request body exceeds the limit of {limit} bytes")
        return body
    parts, size = [body], len(body)
    while msg.get("more_body"):
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def head_only(send):
    """Wrap `send` for a HEAD request: the GET answer's status and headers, no body bytes."""
    async def head_send(msg):
        if msg["type"] == "http.response.body":
            if msg.get("more_body"):
                return
            msg = {"type": "http.response.body", "body": b""}
        await send(msg)
    return head_send
