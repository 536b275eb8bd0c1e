"""A stored answer (content type + bytes) and the test of whether a response is worth storing."""
from __future__ import annotations

from dataclasses import dataclass

_SSE_END = b"data: [DONE]\n\n"
_SSE_ERROR = b'data: {"error"'


@dataclass(frozen=True)
class CachedAnswer:
    content_type: bytes
    body: bytes

    @property
    def stream(self) -> bool:
        return self.content_type.startswith(b"text/event-stream")

    def encode(self) -> bytes:
        return self.content_type + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> "CachedAnswer":
        ct, _, body = raw.partition(b"\n")
        return cls(ct, body)


def complete_answer(status: int, content_type: bytes, body: bytes) -> bool:
    """Whether a response is a whole, successful answer worth replaying."""
    if status != 200:
        return False
    if content_type.startswith(b"application/json"):
        return True
    if content_type.startswith(b"text/event-stream"):
        return body.endswith(_SSE_END) and _SSE_ERROR not in body
    return False
