"""CPU runtime setup (pagedserve/runtime.py): thread count, engine-process environment, preloads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedserve import runtime
from pagedserve.errors import ConfigError


def test_num_threads_follows_affinity_and_the_override(monkeypatch):
    monkeypatch.delenv("PAGEDSERVE_NUM_THREADS", raising=False)
    assert runtime.num_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("PAGEDSERVE_NUM_THREADS", "3")
    assert runtime.num_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("PAGEDSERVE_NUM_THREADS", bad)
        with pytest.raises(ConfigError, match="PAGEDSERVE_NUM_THREADS"):
            runtime.num_threads()


def test_engine_env_defaults_and_user_settings_win():
    env = runtime.engine_env({})
    assert env["GOMP_SPINCOUNT"] == runtime.DEFAULT_SPINCOUNT and env["KMP_BLOCKTIME"] == "1"
    lib = runtime.openmp_library()
    assert env.get("LD_PRELOAD") == lib  # None where intel-openmp is not installed
    mine = runtime.engine_env({"GOMP_SPINCOUNT": "5", "LD_PRELOAD": "/x.so"})
    assert mine["GOMP_SPINCOUNT"] == "5"
    assert mine["LD_PRELOAD"].split(":")[0] == "/x.so"
    assert "GOMP_SPINCOUNT" not in runtime.engine_env({"OMP_WAIT_POLICY": "passive"})
    assert "LD_PRELOAD" not in runtime.engine_env({"PAGEDSERVE_PRELOAD": "0"})
    assert "LD_PRELOAD" not in runtime.engine_env({}, cpu=False)


def test_apply_and_restore_leave_os_environ_as_it_was(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    before = dict(os.environ)
    old = runtime.apply_engine_env()
    assert os.environ["GOMP_SPINCOUNT"] == runtime.DEFAULT_SPINCOUNT
    runtime.restore_env(old)
    assert dict(os.environ) == before


@pytest.mark.skipif(runtime.openmp_library() is None, reason="intel-openmp is not installed")
def test_engine_process_runs_torch_on_the_preloaded_openmp():
    """A process started with engine_env() computes with torch on Intel's OpenMP, and gets the same answer."""
    code = ("import torch; torch.set_num_threads(2); g = torch.Generator().manual_seed(0);"
            "a = torch.randn(300, 300, generator=g); print(float((a @ a).sum()));"
            "print(any('libiomp5' in l for l in open('/proc/self/maps')))")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=runtime.engine_env(cpu=False))
    pre = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=runtime.engine_env())
    assert pre.returncode == 0, pre.stderr
    assert plain.stdout.split()[1] == "False" and pre.stdout.split()[1] == "True"
    assert abs(float(plain.stdout.split()[0]) - float(pre.stdout.split()[0])) < 1e-2
