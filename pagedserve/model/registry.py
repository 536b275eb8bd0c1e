"""HF architecture name -> model class, one file per family in `models/`; a new family adds a line."""
from __future__ import annotations

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.hf_config import check_moe_supported, check_rope_supported, hf_shape_fields
from pagedserve.model.models.gemma2 import Gemma2ForCausalLM
from pagedserve.model.models.gemma3 import Gemma3ForCausalLM
from pagedserve.model.models.glm4 import Glm4ForCausalLM
from pagedserve.model.models.llama import LlamaForCausalLM
from pagedserve.model.models.mixtral import MixtralForCausalLM
from pagedserve.model.models.phi3 import Phi3ForCausalLM
from pagedserve.model.models.qwen2_moe import Qwen2MoeForCausalLM
from pagedserve.model.models.qwen3_moe import Qwen3MoeForCausalLM
from pagedserve.model.models.qwen import QWenLMHeadModel

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "QWenLMHeadModel": QWenLMHeadModel,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
}


def resolve_architecture(architectures: list[str] | None, hf_config: dict | None = None):
    """The model class for config.json's `architectures`; an unsupported MoE variant (DeepSeek's MLA and
    grouped routing) or RoPE scaling type is refused naming its keys."""
    if hf_config is not None:
        check_moe_supported(hf_config)
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            if hf_config is not None:
                check_rope_supported(hf_shape_fields(hf_config)["rope_scaling"])
            return MODEL_REGISTRY[arch]
    raise UnsupportedModelError(
        f"model architecture {architectures} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )
