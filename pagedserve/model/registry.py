"""HF architecture name -> model class. One family today; new families add a line."""
from __future__ import annotations

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.models.llama import LlamaForCausalLM

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def resolve_architecture(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise UnsupportedModelError(
        f"model architecture {architectures} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
