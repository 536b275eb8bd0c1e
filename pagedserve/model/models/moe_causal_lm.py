"""The decoder shared by the mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral).

The Llama-family decoder with the MLP of the layers in `MoeShape.sparse_layers` replaced by the MoE layer
(layers/moe.FusedMoE); the other layers keep a dense MLP (Qwen's `mlp_only_layers`,
`decoder_sparse_step`). What differs between the families (expert count and size, top-k
renormalization, the shared expert, q/k norms, q/k/v bias) comes from config.json through
hf_config.moe_shape and DecoderShape, so each family file only names its class.

Weights: HF checkpoints store one tensor per expert and projection (`experts.{e}.gate_proj`, Mixtral's
`experts.{e}.w1`); they are copied into the stacks. Mixtral's `block_sparse_moe.` prefix reads as `mlp.`.
"""
from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from pagedserve.errors import UnsupportedModelError
from pagedserve.model.layers.decoder import DecoderLayer
from pagedserve.model.layers.linear import load_part
from pagedserve.model.layers.mlp import MLP
from pagedserve.model.layers.moe import FusedMoE
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.model_args import ModelArgs
from pagedserve.model.models.llama import LlamaForCausalLM

_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")
_STACKED = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")  # transformers >= 5 in memory


class MoeCausalLM(LlamaForCausalLM):
    def __init__(self, args: ModelArgs, backend, max_len: int, tp=None):
        nn.Module.__init__(self)
        moe = args.moe
        if moe is None:
            raise UnsupportedModelError("the config describes no experts (num_experts / num_local_experts)")
        if args.make_linear is not None:
            raise UnsupportedModelError("pre-quantized (AWQ / fp8) mixture-of-experts checkpoints are not supported; "
                                        "load the bf16 checkpoint with --quantization fp8")
        self.tp, self.full_args = tp, args
        if tp is not None:  # this rank's heads, MLP and expert slices (distributed/partition.py)
            args = tp.shard.local_args(args)
            moe = args.moe
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        shared = replace(args, intermediate_size=moe.shared_intermediate_size, mlp_bias=False)
        self.layers = nn.ModuleList(
            DecoderLayer(args, backend, tp, FusedMoE.from_shape(
                moe, args.hidden_size, MLP(shared) if moe.shared_intermediate_size else None)
                if i in moe.sparse_layers else None, sliding_window=args.window(i))
            for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rope = RotaryEmbedding(args, max_len)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def expert_layout(self) -> str:
        """One line for the start-up log and /metrics: the experts and how they are stored."""
        first = next(layer.mlp for layer in self.layers if isinstance(layer.mlp, FusedMoE))
        kind = "fp8 e4m3 per channel" if first.w13_scale is not None else str(first.w13.dtype).replace("torch.", "")
        return f"{self.args.moe.describe()}; stacked w13 [E, 2I, H] / w2 [E, H, I], {kind}"

    def warm_up_experts(self, max_tokens: int) -> int:
        """FusedMoE.warm_up once per distinct expert layout (every MoE layer shares one here)."""
        first = next(layer.mlp for layer in self.layers if isinstance(layer.mlp, FusedMoE))
        return first.warm_up(self.embed_tokens.weight.dtype, max_tokens)

    # -- weights ---------------------------------------------------------
    def load_hf_weights(self, tensors) -> None:
        """HF-named tensors into the model: q/k/v and gate/up fused, per-expert tensors into the stacks."""
        params = dict(self.named_parameters())
        fused = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
        a = self.args
        qkv_sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
        loaded: set[tuple[str, int]] = set()
        for name, w in tensors:
            name = name[len("model."):] if name.startswith("model.") else name
            name = name.replace(".block_sparse_moe.", ".mlp.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            if name.endswith("e_score_correction_bias"):
                raise UnsupportedModelError(f"checkpoint tensor {name!r}: grouped sigmoid routing is not supported")
            if self.tp is not None:  # this rank's slice (None: another rank holds it)
                w = self.tp.shard.shard_hf_tensor(name, w)
                if w is None:
                    continue
            if m := _EXPERT.match(name):
                layer, expert, proj = int(m[1]), int(m[2]), m[3]
                self._moe(layer, name).load_expert(expert, proj, w)
                loaded.add((f"layers.{layer}.mlp.{'w2' if proj in ('down_proj', 'w2') else 'w13'}",
                            expert * 2 + (proj in ("up_proj", "w3"))))
                continue
            if m := _STACKED.match(name):
                mod = self._moe(int(m[1]), name)
                target = "w13" if m[2] == "gate_up_proj" else "w2"
                for expert in range(mod.num_experts):
                    if target == "w13":
                        mod.load_expert(expert, "gate_proj", w[expert, :mod.intermediate_size])
                        mod.load_expert(expert, "up_proj", w[expert, mod.intermediate_size:])
                        loaded |= {(f"layers.{m[1]}.mlp.w13", 2 * expert + j) for j in (0, 1)}
                    else:
                        mod.load_expert(expert, "down_proj", w[expert])
                        loaded.add((f"layers.{m[1]}.mlp.w2", 2 * expert))
                continue
            parts = name.split(".")
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused:
                proj, idx = parts[-2], fused[parts[-2]]
                if proj in ("q_proj", "k_proj", "v_proj"):
                    target = ".".join(parts[:-2] + ["qkv_proj", parts[-1]])
                    offset, size = sum(qkv_sizes[:idx]), qkv_sizes[idx]
                else:
                    target = ".".join(parts[:-2] + ["gate_up_proj", parts[-1]])
                    p = params.get(target)  # a dense MLP's or the shared expert's: each its own size
                    size = None if p is None else p.shape[0] // 2
                    offset = idx * (size or 0)
            p = params.get(target)
            if p is None:
                raise UnsupportedModelError(f"checkpoint tensor {name!r} has no place in the model")
            load_part(p, name, w, offset, size)
            loaded.add((target, offset))
        self._check_complete(params, loaded, qkv_sizes)

    def _moe(self, layer: int, name: str) -> FusedMoE:
        mlp = self.layers[layer].mlp if layer < len(self.layers) else None
        if not isinstance(mlp, FusedMoE):
            raise UnsupportedModelError(f"checkpoint tensor {name!r}: layer {layer} has no experts in this config")
        return mlp

    def _check_complete(self, params: dict, loaded: set, qkv_sizes: list[int]) -> None:
        expected = set()
        for pname, p in params.items():
            if ".qkv_proj." in pname:
                expected |= {(pname, sum(qkv_sizes[:i])) for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {(pname, 0), (pname, p.shape[0] // 2)}
            elif pname.endswith((".w13", ".w2")):
                per = 2 if pname.endswith(".w13") else 1
                expected |= {(pname, 2 * e + j) for e in range(p.shape[0]) for j in range(per)}
            else:
                expected.add((pname, 0))
        missing = sorted({n for n, _ in expected - loaded})
        if missing:
            raise UnsupportedModelError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
