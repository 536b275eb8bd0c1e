"""The collectives a tensor-parallel model calls, over one torch.distributed process group.

NCCL on CUDA (one GPU per rank, cuda:<rank> of the replica's visible devices), gloo on CPU.
Every rank runs the same forward, so the collectives line up by construction.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from pagedserve.distributed.partition import TPShard


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait for a peer before failing (a dead or stuck rank must not hang us)."""
    return datetime.timedelta(seconds=float(os.environ.get("PAGEDSERVE_TP_TIMEOUT", "300")))


class TPGroup:
    def __init__(self, shard: TPShard, device: torch.device):
        self.shard = shard
        self.rank, self.size = shard.rank, shard.size
        self.device = device

    @classmethod
    def join(cls, shard: TPShard, device: torch.device, port: int) -> "TPGroup":
        """Rendezvous with the other ranks on 127.0.0.1:port (blocks until all have joined)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=shard.rank,
                                world_size=shard.size, timeout=collective_timeout(), **kw)
        return cls(shard, device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. the KV blocks each rank's memory allows)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def embed(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: rows this rank holds, zeros for the others, summed over ranks."""
        s = self.shard
        local = ids - s.vocab_start
        outside = (local < 0) | (local >= s.vocab_count)
        x = emb(local.masked_fill(outside, 0))
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(x)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """[S, vocab_padded] per rank -> [S, vocab] on rank 0 (only rank 0 samples); others get an empty tensor."""
        local = local.contiguous()
        if self.rank != 0:
            dist.gather(local, None, dst=0)
            return local[:, :0]
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.gather(local, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.shard.vocab_size]

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=0)
        return t

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
