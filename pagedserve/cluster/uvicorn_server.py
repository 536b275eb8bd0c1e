"""Running ASGI apps (router, simulated backends) on uvicorn inside an existing event loop."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.util

import uvicorn


def uvicorn_config(app, host: str, port: int, **kw) -> uvicorn.Config:
    """httptools + uvloop when installed (several times faster than h11), no access log, bounded request heads."""
    from pagedserve.http_limits import uvicorn_kwargs

    return uvicorn.Config(
        app, host=host, port=port, log_level=kw.pop("log_level", "warning"), access_log=False,
        lifespan=kw.pop("lifespan", "on"), **uvicorn_kwargs(),
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        timeout_keep_alive=kw.pop("timeout_keep_alive", 30), backlog=4096, **kw)


class Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner (several servers can share
    one loop, and the launcher stops its replicas before exiting)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def start_server(app, host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[Server, asyncio.Task, int]:
    """Serve `app` in the running loop; returns (server, task, bound port) once it listens.
    Stop it with `server.should_exit = True; await task`."""
    server = Server(uvicorn_config(app, host, port, **kw))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the startup error
            raise RuntimeError(f"server on {host}:{port} exited during startup")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound


def new_event_loop() -> asyncio.AbstractEventLoop:
    if importlib.util.find_spec("uvloop"):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
