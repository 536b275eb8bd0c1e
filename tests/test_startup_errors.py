"""Start-up errors provoked for real: one clear line with a hint, exit code 1, no traceback."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.tiny_models import build_hf, save

CLI = [sys.executable, "-m", "pagedserve.cli"]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("error:"))
    for n in needles:
        assert n in line, line
    assert "hint:" in line
    return line


def test_port_in_use_names_port_and_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _run("serve", "--port", str(port), timeout=60)
    _assert_one_line_error(p, f"127.0.0.1:{port} is not free", f"pid {os.getpid()}")
    assert "Loading" not in p.stderr  # refused before any model loading


def test_truncated_model_dir_names_missing_shard(tmp_path):
    path = save(build_hf("llama"), tmp_path / "m", max_shard_size="60KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    p = _run("generate", "hi", "--model", str(path), "--max-model-len", "64")
    _assert_one_line_error(p, "incomplete", shard.name)


def test_missing_tokenizer_is_named(tmp_path):
    path = save(build_hf("llama"), tmp_path / "m")
    for f in path.glob("tokenizer*"):
        f.unlink()
    p = _run("generate", "hi", "--model", str(path), "--max-model-len", "64")
    _assert_one_line_error(p, "tokenizer")


def test_absurd_kv_memory_is_refused_before_allocating(tmp_path):
    path = save(build_hf("llama"), tmp_path / "m")
    p = _run("generate", "hi", "--model", str(path), "--max-model-len", "64", "--kv-cache-memory", "100000")
    _assert_one_line_error(p, "KV cache (100000.0 GiB)", "of memory is available", "--kv-cache-memory")


def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = save(build_hf("llama"), tmp_path / "m")
    p = _run("generate", "hi", "--model", str(path), "--device", "cuda")
    _assert_one_line_error(p, "CUDA is not available", "--device cpu")
