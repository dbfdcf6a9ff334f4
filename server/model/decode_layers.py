"""How a forward runs its decoder layers, chosen once at load with the other kernels.

- `torch_layers`: each DecoderLayer module in turn (server/model/llama.py): the definition, and
  the path of every prefill and of every engine but kernels="cpu".
- `CPUDecodeLayers` (kernels="cpu"): a decode step (one new token per row) runs all layers in one
  call of server/kernels/cpu_kernels.c's decode_layers, the same layer in C. On a CPU the torch
  layer costs ~75 op dispatches per layer, which at one token per row cost more than the weights
  themselves. Prefills and prefill chunks go through torch_layers.
"""

from __future__ import annotations

import torch

from ..kernels.cpu_kernels import GROUPS, CPUKernels, DecodeLayerTable
from .kv_cache import KVCache


def torch_layers(model, x: torch.Tensor, batch, lora, cos: torch.Tensor, sin: torch.Tensor, decode_context,
                 cache: KVCache) -> torch.Tensor:
    for i, layer in enumerate(model.layers):
        x = layer(x, batch, lora, cos, sin, decode_context, cache, i)
    return x


class CPUDecodeLayers:
    def __init__(self, library: CPUKernels):
        self.library = library
        self._table: tuple[KVCache, DecodeLayerTable] | None = None

    def __call__(self, model, x: torch.Tensor, batch, lora, cos: torch.Tensor, sin: torch.Tensor, decode_context,
                 cache: KVCache) -> torch.Tensor:
        if batch.prefill or x.shape[1] != 1:
            return torch_layers(model, x, batch, lora, cos, sin, decode_context, cache)
        rows = x.shape[0]
        out = self.library.decode_layers(self._table_for(model, cache), x.reshape(rows, -1).contiguous(),
                                         cos.reshape(rows, -1), sin.reshape(rows, -1), batch.slots, cache.keys,
                                         cache.values, batch.block_tables, decode_context, batch.token_slots)
        return out.view(rows, 1, -1)

    def _table_for(self, model, cache: KVCache) -> DecodeLayerTable:
        if self._table is None or self._table[0] is not cache:
            self._table = (cache, layer_table(model, cache))
        return self._table[1]


def layer_table(model, cache: KVCache) -> DecodeLayerTable:
    """The model's layers by address for decode_layers; refuses a model whose projections are not
    on the cpu-fused NF4 path (the kernel reads their repacked codes)."""
    spec = model.spec
    layers = []
    for layer in model.layers:
        entry = {"input_norm": layer.input_norm.weight, "post_norm": layer.post_norm.weight}
        for group in GROUPS:
            projection = layer.proj[group]
            packed = getattr(projection.base, "prepared", None)
            if not hasattr(packed, "codes"):
                raise ValueError("kernels='cpu' runs decode steps on NF4 weights read in place (nf4 path cpu-fused); "
                                 f"this model's projections are on {model.kernels.nf4_path}")
            entry[group] = (packed, projection.base.bias, projection.pool.lora_a, projection.pool.scaled_b_t)
        layers.append(entry)
    sizes = {"hidden": spec.hidden_size, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
             "head_dim": spec.head_dim, "intermediate": spec.intermediate_size, "block_size": cache.block_size,
             "max_rank": model.layers[0].proj[GROUPS[0]].pool.max_rank, "kv_layer_stride": cache.keys[0].numel(),
             "slots": model.num_lora_slots}
    return DecodeLayerTable.build(sizes, spec.rms_norm_eps, layers)
