"""`pagedserve download REPO_ID`: fetch only what the engine loads, from Hugging Face or ModelScope.

Both hubs' `snapshot_download` resume interrupted files and skip files already
complete, so re-running after a failure is the recovery. Only weights
(safetensors), configs and tokenizer files are fetched: a repo's .bin/.pth/
.gguf/ONNX copies would multiply the download for nothing.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pagedserve.errors import ConfigError

log = logging.getLogger(__name__)

ALLOW_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
]


def download(repo_id: str, source: str = "huggingface", revision: str | None = None, local_dir: str | None = None,
             endpoint: str | None = None, token: str | None = None) -> Path:
    """Download `repo_id` and return the local model directory."""
    if source == "huggingface":
        path = _from_huggingface(repo_id, revision, local_dir, endpoint, token)
    elif source == "modelscope":
        path = _from_modelscope(repo_id, revision, local_dir)
    else:
        raise ConfigError(f"--source must be huggingface or modelscope, got {source!r}", param="source")
    _check_complete(path)
    return path


def _from_huggingface(repo_id, revision, local_dir, endpoint, token) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=ALLOW_PATTERNS,
                                      endpoint=endpoint, token=token))
    except RepositoryNotFoundError as e:
        raise ConfigError(f"{repo_id!r} was not found on the Hugging Face Hub (or it is private/gated)",
                          hint="check the id; for gated models run `hf auth login` or set HF_TOKEN") from e
    except LocalEntryNotFoundError as e:
        raise ConfigError(f"cannot reach the Hugging Face Hub to download {repo_id!r} and it is not cached",
                          hint="check the network or HF_ENDPOINT (a mirror), or use --source modelscope") from e
    except HfHubHTTPError as e:
        raise ConfigError(f"downloading {repo_id!r} failed: {str(e).splitlines()[0]}",
                          hint="re-run the same command: finished files are kept and partial ones resume") from e


def _from_modelscope(repo_id, revision, local_dir) -> Path:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise ConfigError("ModelScope downloads need the modelscope package",
                          hint="pip install 'pagedserve[modelscope]'") from e
    kwargs = {"allow_patterns": ALLOW_PATTERNS, "local_dir": local_dir}
    if revision:
        kwargs["revision"] = revision
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # modelscope raises plain exceptions of many kinds
        raise ConfigError(f"downloading {repo_id!r} from ModelScope failed: {str(e).splitlines()[0][:200]}",
                          hint="check the id and the network; re-running resumes") from e


def _check_complete(path: Path) -> None:
    """The engine's own checks: config.json present, every weight shard present, a tokenizer."""
    from pagedserve.model.loader import _safetensor_files, read_hf_config

    read_hf_config(path)
    _safetensor_files(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{path} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)",
                          hint="the repo may keep its tokenizer elsewhere; pass --tokenizer when serving")


def add_parser(sub) -> None:
    p = sub.add_parser("download", help="download a model (weights, config, tokenizer only)")
    p.add_argument("repo_id", help="e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--source", default="huggingface", choices=["huggingface", "modelscope"])
    p.add_argument("--revision", default=None, help="branch, tag or commit")
    p.add_argument("--dir", dest="local_dir", default=None, help="download into this directory (default: hub cache)")
    p.add_argument("--endpoint", default=None, help="Hub endpoint or mirror (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = download(args.repo_id, args.source, args.revision, args.local_dir, args.endpoint)
    print(path)
    print(f"serve it with: pagedserve serve {path}", flush=True)
    return 0
