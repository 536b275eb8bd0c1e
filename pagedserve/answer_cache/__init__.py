"""Answer cache: exact-match replay of complete answers to deterministic OpenAI requests.

Shared by the router and the server as one ASGI middleware (`AnswerCacheMiddleware`) in
front of the app, so neither's request path changes. Only POST /v1/completions and
/v1/chat/completions are considered, and only when the answer cannot vary between calls:
temperature 0 (or top_k 1) or a fixed `seed`. OpenAI's default temperature is 1, so a
request without temperature and without seed is never cached.

Key: the path, a hash of the Authorization header (a hit never hands one caller's answer to
a caller whose credentials were not accepted for it), an optional salt (the server mixes in
its API key) and the canonical JSON of the body (sorted keys, nulls dropped, `stream`
normalised to a bool, `user` ignored: it labels the caller, it does not change the answer).
`stream` stays in the key: a stream and a JSON answer are different bytes.

What is stored: an HTTP 200 JSON answer, or an SSE stream that ended with `data: [DONE]`
and carried no error event; a client that disconnects mid-answer stores nothing. A hit
replays the stored bytes exactly (a stream in one write: same events, not the same timing).

Request header `Cache-Control: no-cache` skips the lookup (the fresh answer refreshes the
entry); `no-store` skips lookup and store. Responses carry `X-Answer-Cache: hit|miss|bypass`.

Backends: `InMemoryBackend` (LRU by bytes with a max-bytes bound, per-entry TTL; one per
process) and `RedisBackend` (shared between router instances; the shared bound is Redis's
own `maxmemory` with `maxmemory-policy allkeys-lru`, entries expire with `SET ... PX`). A
Redis that goes away at run time turns lookups into misses (logged once), never errors.

One job per module: `config` (settings), `keys` (what is cacheable, under which key), `entry` (a stored
answer), `memory` / `redis_backend` (the backends), `cache` (lookups, stores, metrics), `middleware` (ASGI),
`args` (the command-line flags).
"""
