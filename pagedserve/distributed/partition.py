"""Which slice of every weight a tensor-parallel rank holds: pure arithmetic, no torch.distributed.

Attention is split by KV-head groups: a rank holds some KV heads and exactly the query heads that
read them, so attention needs no communication. Splits may be uneven (SmolLM2's 3 KV heads over 2
ranks: rank 0 gets 2 KV + 6 query heads, rank 1 gets 1 KV + 3). With fewer KV heads than ranks,
each KV head is replicated on tp / num_kv_heads ranks that split its query heads evenly. The MLP's
intermediate dimension is split in contiguous chunks; the vocabulary in equal, padded chunks (so
the LM head's logits gather as equal-sized pieces). Mixture-of-experts layers split every expert's
intermediate dimension the same way (each rank holds a slice of every expert, the routing is replicated),
and the shared expert's like a dense MLP: the layer's partial outputs are summed by the one all-reduce
that closes the MLP.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pagedserve.errors import ConfigError


def chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """(start, size) of `parts` contiguous pieces of range(n), the first n % parts one larger."""
    out, start = [], 0
    for r in range(parts):
        size = n // parts + (1 if r < n % parts else 0)
        out.append((start, size))
        start += size
    return out


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    head_dim: int
    q_start: int  # query heads [q_start, q_start + q_count)
    q_count: int
    kv_start: int  # KV heads [kv_start, kv_start + kv_count)
    kv_count: int
    inter_start: int  # MLP intermediate rows
    inter_count: int
    vocab_start: int  # vocabulary rows held (the rest of vocab_padded is zero padding)
    vocab_count: int
    vocab_padded: int  # rows of the embedding / LM head shard, equal on every rank
    vocab_size: int  # the full vocabulary
    expert_start: int = 0  # MoE: every expert's intermediate rows held
    expert_count: int = 0
    shared_start: int = 0  # MoE: the shared expert's intermediate rows held (Qwen2-MoE)
    shared_count: int = 0

    # -- model shapes -----------------------------------------------------------------------
    def local_args(self, args):
        """ModelArgs with this rank's head counts, intermediate size and (padded) vocabulary."""
        out = replace(args, num_heads=self.q_count, num_kv_heads=self.kv_count, intermediate_size=self.inter_count,
                      vocab_size=self.vocab_padded)
        if getattr(args, "moe", None) is not None:
            out = replace(out, moe=replace(args.moe, intermediate_size=self.expert_count,
                                           shared_intermediate_size=self.shared_count))
        return out

    # -- weight slicing ---------------------------------------------------------------------
    def shard_hf_tensor(self, name: str, w: torch.Tensor) -> torch.Tensor | None:
        """This rank's piece of an HF-named checkpoint tensor (`model.` prefix stripped); None: not held here.

        Column-parallel (output rows split): q/k/v, gate/up, embedding, LM head. Row-parallel (input
        columns split): o_proj, down_proj, whose bias only rank 0 holds (added once, the all-reduce sums
        the rest). Everything else (norms) is replicated."""
        parts = name.split(".")
        module, leaf = (parts[-2], parts[-1]) if len(parts) >= 2 else ("", name)
        hd = self.head_dim
        if ".experts." in name or ".shared_expert." in name:
            return self._shard_expert(name, module, leaf, w)
        if module == "q_proj":
            return w.narrow(0, self.q_start * hd, self.q_count * hd)
        if module in ("k_proj", "v_proj"):
            return w.narrow(0, self.kv_start * hd, self.kv_count * hd)
        if module in ("gate_proj", "up_proj"):
            return w.narrow(0, self.inter_start, self.inter_count)
        if module in ("o_proj", "down_proj"):
            if leaf == "bias":
                return w if self.rank == 0 else None
            start, count = (self.q_start * hd, self.q_count * hd) if module == "o_proj" else (
                self.inter_start, self.inter_count)
            return w.narrow(1, start, count)
        if module in ("embed_tokens", "lm_head") and leaf == "weight":
            piece = w.narrow(0, self.vocab_start, self.vocab_count)
            if self.vocab_count == self.vocab_padded:
                return piece
            out = torch.zeros((self.vocab_padded, *w.shape[1:]), dtype=w.dtype, device=w.device)
            out[:self.vocab_count] = piece
            return out
        return w

    def _shard_expert(self, name: str, module: str, leaf: str, w: torch.Tensor) -> torch.Tensor:
        """A per-expert tensor (`experts.{e}.gate_proj`, Mixtral's `w1/w3/w2`), a stacked one
        (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) or a shared expert's."""
        start, count = ((self.shared_start, self.shared_count) if ".shared_expert." in name
                        else (self.expert_start, self.expert_count))
        if module in ("gate_proj", "up_proj", "w1", "w3"):
            return w.narrow(0, start, count)
        if module in ("down_proj", "w2"):
            return w.narrow(1, start, count)
        if leaf == "gate_up_proj":
            g, u = w.chunk(2, dim=1)
            return torch.cat([g.narrow(1, start, count), u.narrow(1, start, count)], dim=1)
        if leaf == "down_proj":
            return w.narrow(2, start, count)
        return w

    def shard_fused_tensor(self, name: str, full: torch.Tensor, q_size: int, kv_size: int,
                           inter: int) -> torch.Tensor | None:
        """Like shard_hf_tensor for the model's own fused parameters (qkv_proj, gate_up_proj) at full size."""
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        prefix = ".".join(parts[:-2])
        if module == "qkv_proj":
            q, k, v = full.split([q_size, kv_size, kv_size], dim=0)
            return torch.cat([self.shard_hf_tensor(f"{prefix}.{m}.{parts[-1]}", t)
                              for m, t in (("q_proj", q), ("k_proj", k), ("v_proj", v))])
        if module == "gate_up_proj":  # a dense MLP's (inter) or a shared expert's
            g, u = full.chunk(2, dim=0)
            return torch.cat([self.shard_hf_tensor(f"{prefix}.{m}.{parts[-1]}", t)
                              for m, t in (("gate_proj", g), ("up_proj", u))])
        if parts[-1] in ("w13", "w2"):  # the MoE stacks, as HF's stacked experts.gate_up_proj / down_proj
            leaf = "gate_up_proj" if parts[-1] == "w13" else "down_proj"
            return self._shard_expert(f"{prefix}.experts.{leaf}", "experts", leaf, full)
        return self.shard_hf_tensor(name, full)


def plan_shards(num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int, vocab_size: int,
                tp: int, moe=None) -> list[TPShard]:
    """Every rank's shard, or a ConfigError saying why this model cannot be split `tp` ways."""
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tp}", param="tensor_parallel_size")
    if num_heads % num_kv_heads:
        raise ConfigError(f"the model's {num_heads} attention heads are not a multiple of its {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp:
        kv = chunks(num_kv_heads, tp)
        q = [(s * group, n * group) for s, n in kv]
    else:
        if tp % num_kv_heads or num_heads % tp:
            raise ConfigError(
                f"tensor_parallel_size={tp} cannot split this model: with fewer KV heads ({num_kv_heads}) than "
                f"ranks, the ranks must be a multiple of the KV heads and divide the {num_heads} query heads",
                param="tensor_parallel_size",
                hint=f"use a tensor_parallel_size <= {num_kv_heads}, or one that is a multiple of {num_kv_heads} "
                     f"and divides {num_heads}")
        per = tp // num_kv_heads  # ranks sharing one (replicated) KV head
        kv = [(r // per, 1) for r in range(tp)]
        q = [(r * (num_heads // tp), num_heads // tp) for r in range(tp)]
    if intermediate_size < tp:
        raise ConfigError(f"tensor_parallel_size={tp} exceeds the MLP width {intermediate_size}",
                          param="tensor_parallel_size")
    inter = chunks(intermediate_size, tp)
    experts = shared = [(0, 0)] * tp
    if moe is not None:  # an hf_config.MoeShape
        if moe.intermediate_size < tp:
            raise ConfigError(f"tensor_parallel_size={tp} exceeds the experts' width {moe.intermediate_size}",
                              param="tensor_parallel_size")
        experts = chunks(moe.intermediate_size, tp)
        shared = chunks(moe.shared_intermediate_size, tp)
    padded = -(-vocab_size // tp)
    shards = []
    for r in range(tp):
        v_start = min(r * padded, vocab_size)
        shards.append(TPShard(r, tp, head_dim, q[r][0], q[r][1], kv[r][0], kv[r][1], inter[r][0], inter[r][1],
                              v_start, min(padded, vocab_size - v_start), padded, vocab_size,
                              experts[r][0], experts[r][1], shared[r][0], shared[r][1]))
    return shards


def plan_shards_for(args, tp: int) -> list[TPShard]:
    """plan_shards from a ModelArgs."""
    return plan_shards(args.num_heads, args.num_kv_heads, args.head_dim, args.intermediate_size, args.vocab_size, tp,
                       getattr(args, "moe", None))
