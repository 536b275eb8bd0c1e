"""Process helpers shared by the engine process and the tensor-parallel workers.

Neutral ground: `pagedserve.engine` and `pagedserve.distributed` both use these, and neither
may import the other's process code for them."""
from __future__ import annotations


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, even mid-step."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # noqa: BLE001 - other platforms: the EOF on the input pipe still stops us
        pass
