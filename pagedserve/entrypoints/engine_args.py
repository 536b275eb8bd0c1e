"""The engine's command-line flags, built from `EngineConfig`'s fields: each field whose metadata carries a
`flag` becomes `--field-name` with the field's own default, so defaults and choices live in config.py only."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields

from pagedserve.config import EngineConfig


def engine_flags() -> list[Field]:
    return [f for f in fields(EngineConfig) if "flag" in f.metadata]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by generate/chat/serve; names mirror vLLM's."""
    g = p.add_argument_group("engine")
    for f in engine_flags():
        spec = dict(f.metadata["flag"])
        aliases = spec.pop("aliases", ())
        default = f.default if f.default is not MISSING else f.default_factory()
        g.add_argument("--" + f.name.replace("_", "-"), *aliases, default=default, **spec)


def engine_kwargs(args: argparse.Namespace, model: str | None) -> dict:
    """EngineConfig keyword arguments from parsed flags; `model` is passed apart (serve also takes it as a
    positional argument)."""
    from pagedserve.engine.spec_decode.config import SpeculativeConfig

    SpeculativeConfig.parse(args.speculative_config)  # a bad value fails here, before any loading
    return {f.name: getattr(args, f.metadata["flag"].get("dest", f.name)) for f in engine_flags()} | {"model": model}
