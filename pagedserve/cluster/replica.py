"""Entry point of one replica process started by the launcher:
`python -m pagedserve.cluster.replica PARENT_PID serve --port ... [serve flags]`.

It asks Linux to send it SIGTERM if the launcher dies (even by SIGKILL), so a replica is
never left orphaned, then runs the ordinary `pagedserve` command line.
"""
from __future__ import annotations

import os
import signal
import sys


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except Exception:  # pragma: no cover
            pass
    if os.getppid() != parent:  # the launcher died before prctl took effect
        sys.exit(1)


def main() -> int:
    parent = int(sys.argv[1])
    _die_with_parent(parent)
    from pagedserve.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
