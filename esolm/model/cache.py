"""The one KV cache: static, pre-allocated, shared by every sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of committed tokens, per layer: k, v [n_layers, B, H, max_len, D].

    ``length`` tokens are committed. A forward over N new tokens writes their K/V at
    [length, length + N) and attends to [0, length + N); it then keeps only the first
    ``commit`` of them (the rest are scratch, overwritten by the next call).
    """

    k: Tensor
    v: Tensor
    length: int = 0
    pos: Tensor | None = None  # static mode: device copy of ``length`` (LongTensor [])
    slots: Tensor | None = None  # static mode: arange(max_len) on the device

    def make_static(self) -> KVCache:
        """Static mode (graph-safe, CUDA graphs): every step writes its K/V at device-side
        slots pos + [0, N) and attends over the whole buffer under a mask computed on the
        device, so shapes never change and nothing reads the position back to the host."""
        self.pos = torch.tensor(self.length, device=self.k.device)
        self.slots = torch.arange(self.capacity, device=self.k.device)
        return self

    @classmethod
    def allocate(cls, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def check_room(self, n_new: int) -> None:
        if self.length + n_new > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} cached + {n_new} new tokens exceed "
                             f"its capacity {self.capacity}; allocate a larger cache")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
