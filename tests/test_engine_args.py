"""Engine flags are built from EngineConfig's fields: defaults and choices come from one definition."""
from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from pagedserve.cli import build_parser
from pagedserve.config import EngineConfig
from pagedserve.entrypoints.engine_args import add_engine_args, engine_flags, engine_kwargs


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(argv)


def test_no_flags_give_the_config_defaults():
    kw = engine_kwargs(_parse([]), None)
    assert EngineConfig.from_kwargs(**kw) == EngineConfig()
    assert len(kw) == len(engine_flags()) >= 17


def test_every_flag_reaches_the_config():
    args = _parse(["--dtype", "bfloat16", "--device", "cpu", "--max-model-len", "300", "--max-num-seqs", "7",
                   "--max-num-batched-tokens", "99", "--block-size", "32", "--gpu-memory-utilization", "0.5",
                   "--kv-cache-memory", "0.25", "--no-enable-prefix-caching", "--seed", "3",
                   "--load-format", "dummy", "-q", "int8", "--kv-cache-dtype", "fp8", "-tp", "2",
                   "--enforce-eager", "--no-async-scheduling", "--trust-remote-code",
                   "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}', "--model", "m"])
    cfg = EngineConfig.from_kwargs(**engine_kwargs(args, args.model_opt))
    changed = {f.name for f in fields(EngineConfig) if getattr(cfg, f.name) != f.default}
    assert changed == {f.name for f in engine_flags()}


@pytest.mark.parametrize("argv", [["--block-size", "12"], ["--dtype", "fp4"], ["--quantization", "gptq"]])
def test_bad_choice_is_one_argparse_line(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert "invalid choice" in capsys.readouterr().err


def test_every_command_still_parses():
    p = build_parser()
    for argv in (["generate", "hi"], ["chat", "hi", "-tp", "1"], ["serve", "m", "--port", "8001"],
                 ["router", "--backend", "http://x:1"], ["plan"], ["bench", "serve"]):
        assert p.parse_args(argv).func
