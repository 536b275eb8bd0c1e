"""`pagedserve download` against a local stand-in for the Hugging Face Hub (no network).

The fixture serves the three endpoints `huggingface_hub.snapshot_download`
uses (repo info, file tree, resolve) for one tiny repo, and counts file
downloads, so the test checks which files travel and that a re-run fetches
nothing it already has.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pagedserve.cli import main
from pagedserve.download import download
from pagedserve.errors import ConfigError

REPO = "tiny-org/tiny-llama"
SHA = "a" * 40


def _make_repo(root: Path, model_dir: Path) -> dict[str, bytes]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(root, max_shard_size="2MB")  # several shards + index
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(root)
    (root / "pytorch_model.bin").write_bytes(b"x" * 1000)  # duplicates the engine never reads
    (root / "model-q4.gguf").write_bytes(b"y" * 1000)
    (root / "onnx").mkdir()
    (root / "onnx" / "model.onnx").write_bytes(b"z" * 1000)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


class FakeHub:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.downloads: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, obj, status=200, headers=()):
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _resolve(self, send_body: bool):
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not m or m.group(1) != REPO or m.group(3) not in hub.files:
                    return self._json({"error": "Entry not found"}, 404, [("X-Error-Code", "EntryNotFound")])
                name = m.group(3)
                data = hub.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng and (r := re.fullmatch(r"bytes=(\d+)-", rng)):
                    start = int(r.group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", SHA)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if send_body:
                    hub.downloads.append(name)
                    self.wfile.write(data[start:])

            def do_HEAD(self):
                self._resolve(send_body=False)

            def do_GET(self):
                path = self.path.split("?")[0]
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+)|/tree/([^/]+).*)", path)
                if m:
                    if m.group(1) != REPO:
                        return self._json({"error": "Repository not found"}, 404, [("X-Error-Code", "RepoNotFound")])
                    if m.group(2) is not None:
                        return self._json({"id": REPO, "sha": SHA,
                                           "siblings": [{"rfilename": f} for f in sorted(hub.files)]})
                    return self._json([{"type": "file", "path": f, "size": len(d),
                                        "oid": hashlib.sha1(d).hexdigest()} for f, d in sorted(hub.files.items())])
                self._resolve(send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def hub(tmp_path_factory, model_dir):
    files = _make_repo(tmp_path_factory.mktemp("repo"), model_dir)
    h = FakeHub(files)
    yield h
    h.close()


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")


def test_downloads_only_engine_files_and_serves(hub, tmp_path, capsys):
    out = tmp_path / "model"
    hub.downloads.clear()
    assert main(["download", REPO, "--dir", str(out), "--endpoint", hub.url]) == 0
    assert str(out) in capsys.readouterr().out
    got = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    shards = {f for f in hub.files if f.endswith(".safetensors")}
    assert len(shards) >= 2
    assert shards | {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= got
    assert not {"pytorch_model.bin", "model-q4.gguf", "onnx/model.onnx"} & got
    assert sorted(hub.downloads) == sorted(got)  # each file fetched once, through the stand-in hub
    for f in got:
        assert (out / f).read_bytes() == hub.files[f]

    # A second run finds everything complete and downloads nothing.
    hub.downloads.clear()
    download(REPO, local_dir=str(out), endpoint=hub.url)
    assert hub.downloads == []

    # The result is a model the engine loads and runs.
    from pagedserve import LLM, SamplingParams

    llm = LLM(model=str(out), max_model_len=128, kv_cache_memory=0.01)
    res = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(res[0].outputs[0].token_ids) == 4


def test_missing_shard_is_named(hub, tmp_path):
    shard = sorted(f for f in hub.files if f.endswith(".safetensors"))[-1]
    data = hub.files.pop(shard)
    try:
        with pytest.raises(ConfigError, match=re.escape(shard)):
            download(REPO, local_dir=str(tmp_path / "m"), endpoint=hub.url)
    finally:
        hub.files[shard] = data


def test_unknown_repo_and_unreachable_hub(hub, tmp_path, capsys):
    with pytest.raises(ConfigError, match="was not found"):
        download("nobody/nothing", local_dir=str(tmp_path / "a"), endpoint=hub.url)
    assert main(["download", REPO, "--dir", str(tmp_path / "b"), "--endpoint", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach") and "Traceback" not in err


def test_modelscope_without_the_extra():
    import importlib.util

    if importlib.util.find_spec("modelscope") is not None:
        pytest.skip("modelscope is installed; this checks the message shown without it")
    with pytest.raises(ConfigError, match="modelscope"):
        download("qwen/Qwen2.5-0.5B-Instruct", source="modelscope")
