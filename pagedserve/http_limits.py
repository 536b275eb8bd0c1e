"""Limits on a request's head (URL, header count, header bytes), enforced while it is parsed.

uvicorn's httptools protocol has no limit on the head: a 24 MiB header value is accumulated
(with quadratic copying) before the app could look at it. An ASGI middleware would be too
late, so this is a uvicorn protocol class: it feeds the parser at most MAX_HEAD_BYTES of a
request's head and answers a larger one with 431, more than MAX_HEADERS header lines with
431, and a URL over MAX_URL_BYTES with 414, each as an OpenAI error JSON on a closed
connection. Memory per connection stays bounded by the limits. Both the server and the
router run on it (`http_protocol()`); without httptools, h11's own head limit is used.
"""
from __future__ import annotations

import importlib.util
import json

MAX_HEAD_BYTES = 64 << 10  # request line + headers (nginx: 4 x 8 KiB; Node: 16 KiB)
MAX_HEADERS = 100  # header lines
MAX_URL_BYTES = 8 << 10  # request target (path + query)

_REASONS = {413: b"Content Too Large", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class _Reject(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": status}}).encode()
    return b"".join([b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Bad Request")),
                     b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                     body])


def _make_protocol():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with bounded request heads."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._url_bytes = 0
            self._num_headers = 0
            self._closed_by_limit = False

        def data_received(self, data: bytes) -> None:
            if self._closed_by_limit:
                return
            try:
                while data:
                    if not self._in_head:
                        super().data_received(data)  # body bytes: the app's own limit (16 MiB) applies
                        return
                    room = MAX_HEAD_BYTES - self._head_bytes
                    piece, data = data[:room], data[room:]
                    self._head_bytes += len(piece)
                    super().data_received(piece)
                    if self._closed_by_limit:
                        return
                    if self._in_head and self._head_bytes >= MAX_HEAD_BYTES:
                        raise _Reject(431, f"the request head (request line and headers) exceeds {MAX_HEAD_BYTES} "
                                           "bytes")
            except _Reject as e:
                self._reject(e)

        def _reject(self, e: _Reject) -> None:
            self._closed_by_limit = True
            self.logger.warning("refused a request: %s", e)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(error_response(e.status, str(e)))
                self.transport.close()

        # Parser callbacks: a _Reject raised here surfaces from feed_data as the callback error's context;
        # uvicorn would answer it with a plain 400, so it is caught first.
        def _guard(self, fn, *args) -> None:
            try:
                fn(*args)
            except _Reject as e:
                self._reject(e)
                raise

        def on_message_begin(self) -> None:
            self._url_bytes = self._num_headers = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > MAX_URL_BYTES:
                self._reject(_Reject(414, f"the request URL exceeds {MAX_URL_BYTES} bytes"))
                raise _Reject(414, "URL too long")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._num_headers += 1
            if self._num_headers > MAX_HEADERS:
                self._reject(_Reject(431, f"the request has more than {MAX_HEADERS} header lines"))
                raise _Reject(431, "too many headers")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            if self._closed_by_limit:
                return  # the limit's own answer went out already
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(error_response(400, f"invalid HTTP request: {msg}"))
                self.transport.close()

    return LimitedHttpToolsProtocol


_protocol = None


def http_protocol():
    """The uvicorn `http=` argument for servers and routers: the bounded httptools protocol, else h11."""
    global _protocol
    if importlib.util.find_spec("httptools") is None:
        return "h11"
    if _protocol is None:
        _protocol = _make_protocol()
    return _protocol


def uvicorn_kwargs() -> dict:
    """Extra uvicorn.Config arguments: the protocol, and h11's head limit for when httptools is missing."""
    return {"http": http_protocol(), "h11_max_incomplete_event_size": MAX_HEAD_BYTES}
