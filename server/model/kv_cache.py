"""Preallocated KV cache: one row per running sequence, each max_seq_len long.

Sized once from (rows × max_seq_len) — or from a byte budget — and never grown: a finished
sequence returns its row, a new one takes it. Rows hold stale keys past a sequence's length;
attention masks them, and prefill/decode overwrite them before they are ever read.

One more row than `rows` is allocated and never handed out: the scratch row, where the padding
rows of a fixed-shape decode step (server/engine/decode_step.py) write their keys, so padding never touches a
sequence's cache.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, rows: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_layers, rows + 1, num_kv_heads, max_seq_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len
        self.rows = rows
        self.scratch_row = rows
        self._free_rows = list(range(rows - 1, -1, -1))

    @staticmethod
    def bytes_per_row(num_layers: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * max_seq_len * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    def usage_ratio(self) -> float:
        return 1.0 - len(self._free_rows) / self.rows

    def allocate_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def release_row(self, row: int) -> None:
        if row in self._free_rows:
            raise ValueError(f"KV row {row} released twice")
        self._free_rows.append(row)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, kv_heads, T, head_dim] for tokens at positions [B, T] of cache rows [B]."""
        index = (rows[:, None], slice(None), positions)  # selects [B, T, kv_heads, head_dim]
        self.keys[layer][index] = k.transpose(1, 2)
        self.values[layer][index] = v.transpose(1, 2)

    def read(self, layer: int, rows: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of the given rows: two [B, kv_heads, length, head_dim]."""
        return self.keys[layer, rows, :, :length], self.values[layer, rows, :, :length]
