"""A `pagedserve serve` child process for a test module's fixture."""
from __future__ import annotations

import contextlib
from typing import Iterator

from pagedserve.server.launch import ServerProcess


@contextlib.contextmanager
def running_server(args: list[str], **kw) -> Iterator[ServerProcess]:
    """Started and ready; on the way out (also when start-up fails) stopped, and the tail of its log
    printed so that pytest shows it next to a failure."""
    srv = ServerProcess(args, **kw)
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.terminate()
        print(srv.output(30))
