"""Process helpers shared by the engine process, the tensor-parallel workers and the cluster launcher.

Neutral ground: `pagedserve.engine`, `pagedserve.distributed` and `pagedserve.cluster` use these, and
none may import another's process code for them."""
from __future__ import annotations

import signal


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even mid-step."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # noqa: BLE001 - other platforms: the EOF on the input pipe still stops us
        pass


def describe_exit(rc: int) -> str:
    """A child's exit status in words: the signal's name (with the likely cause of SIGKILL) or the code."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}" + (" (out of memory? see dmesg)" if -rc == signal.SIGKILL else "")
    return f"exited with code {rc}"
