"""CPU matmuls that read NF4 weights where they are (cpu_kernels.c), for the "cpu-fused" NF4 path.

A CPU decode step is bound by the bytes of the weights it reads. torch's linear on a float32
copy reads 4 bytes per weight (and MKL's skinny GEMM reaches ~8 GB/s on the AMD CPUs measured
here); the C kernel reads half a byte and forms each weight in registers exactly as bitsandbytes
dequantizes it, code[q] · absmax in float32. Only the order of the float32 sum differs from
torch's linear on the dequantized weight, whose order itself changes with the batch size.

The library is compiled on first use with the system's C compiler into `build_dir` (named by the
hash of source and flags, written atomically), like Triton builds its kernels, and loaded with
ctypes; calls release the GIL. Without a compiler the path is refused with what to install.
It has AVX-512 versions of its inner loops only where torch runs its own AVX-512 kernels: capping
torch with ATEN_CPU_CAPABILITY=avx2 (or default) builds it without them, so one setting runs the
whole engine on another CPU's code paths (`make test-cpu-paths`).

- `pack_nf4`: bitsandbytes Params4bit weights (stacked by rows) → PackedNF4, once at load.
- `nf4_linear_reference`: the definition in plain torch, what the tests hold the kernel to.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
VECTOR_VERSIONS = ("portable", "avx2", "avx512")  # cpu_kernels.c's vector_version()
DENSE_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)  # what dense_linear reads (the LM head's storage)
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-lm")
CHUNK = 32  # weights per 16 packed bytes: the kernel's unit along a row


class KernelBuildError(RuntimeError):
    """The C kernels could not be built here (no compiler, or it failed)."""


@dataclass(frozen=True)
class PackedNF4:
    """NF4 weights [out, in] in the kernel's layout: codes [out, in/2] (per chunk of 32 weights,
    byte j = weight j low nibble | weight j+16 high nibble), absmax [out, in/blocksize] float32
    (double quantization already undone, as bitsandbytes undoes it), code: the 16 NF4 values."""

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2

    def pointers(self) -> tuple[int, int, int]:
        return self.codes.data_ptr(), self.absmax.data_ptr(), self.code.data_ptr()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.code))


def pack_nf4(weights: list) -> PackedNF4:
    """Repack bitsandbytes Params4bit weights that share an input, stacked by rows. Refuses what
    the kernel cannot read: other 4-bit types, rows that are not whole blocks of a multiple of 32."""
    import bitsandbytes.functional as bnbf

    codes, scales = [], []
    first = weights[0].quant_state
    for weight in weights:
        state = weight.quant_state
        out_features, in_features = state.shape
        if state.quant_type != "nf4":
            raise ValueError(f"nf4 path cpu-fused reads NF4 codes, not {state.quant_type}")
        if state.dtype != torch.float32:
            raise ValueError(f"nf4 path cpu-fused computes in float32, not {state.dtype} (the CPU's compute dtype)")
        if state.blocksize % CHUNK or in_features % state.blocksize:
            raise ValueError(f"nf4 path cpu-fused needs whole blocks of a multiple of {CHUNK} weights per row; this "
                             f"model has a {out_features}x{in_features} projection in blocks of {state.blocksize} "
                             "(use the dequantize-once path)")
        if state.blocksize != first.blocksize or in_features != first.shape[1] or not torch.equal(state.code, first.code):
            raise ValueError("projections stacked for cpu-fused must share input size, blocksize and code")
        flat = weight.data.view(-1)  # bitsandbytes: element 2i in the high nibble, 2i+1 in the low
        q = torch.stack([flat >> 4, flat & 15], dim=1).view(out_features, in_features // CHUNK, CHUNK)
        codes.append((q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(out_features, in_features // 2))
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
        scales.append(absmax.float().view(out_features, in_features // state.blocksize))
    return PackedNF4(torch.cat(codes).contiguous(), torch.cat(scales).contiguous(), first.code.float().contiguous(),
                     first.blocksize)


def nf4_linear_reference(x: torch.Tensor, weight: PackedNF4) -> torch.Tensor:
    """x·Wᵀ with W unpacked from the kernel's layout in plain torch (float64 when x is)."""
    out_features, in_features = weight.shape
    packed = weight.codes.view(out_features, in_features // CHUNK, 16).long()
    q = torch.cat([packed & 15, packed >> 4], dim=2).view(out_features, in_features)
    w = weight.code[q].view(out_features, -1, weight.blocksize) * weight.absmax[:, :, None]
    return x @ w.view(out_features, in_features).to(x.dtype).T


class CPUKernels:
    """The loaded library. `portable=True` calls the plain-C versions even on AVX-512 CPUs (tests).
    Inputs are float32 CPU tensors (the path refuses other compute dtypes at load)."""

    def __init__(self, library: ctypes.CDLL, portable: bool = False):
        i64, i32, ptr, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
        self.version = VECTOR_VERSIONS[library.vector_version()]  # the widest this build and CPU run
        self.has_avx512 = self.version == "avx512"
        suffix = "portable" if portable else "auto"
        self._nf4 = _function(library, f"nf4_linear_{suffix}", [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ptr, i32])
        self._dequantize = _function(library, f"nf4_dequantize_{suffix}", [ptr, ptr, ptr, i64, i64, i64, ptr, i32])
        self._dense = _function(library, f"dense_linear_{suffix}", [ptr, i64, ptr, i32, i64, i64, ptr, i32])
        self._attention = _function(library, f"decode_attention_{suffix}",
                                    [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, ptr, i32])
        self._lora = _function(library, "lora_add", [ptr, i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i32])
        self._layers = _function(library, "decode_layers", [ptr, f32, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr,
                                                            ptr, i64, ptr, ptr, ptr, i32])
        self._dirty = getattr(library, "upper_registers_dirty", None) if self.has_avx512 else None
        if self._dirty is not None:
            self._dirty.argtypes, self._dirty.restype = [], ctypes.c_int

    def upper_registers_dirty(self) -> bool | None:
        """Whether the upper halves of the calling thread's ymm/zmm0-15 hold data (None without the
        AVX-512 version): every kernel leaves them clean, or the SSE code that runs after it slows
        down (cpu_kernels.c)."""
        return None if self._dirty is None else bool(self._dirty())

    def nf4_linear(self, x: torch.Tensor, weight: PackedNF4) -> torch.Tensor:
        """x [..., in] · Wᵀ → [..., out]."""
        out_features, in_features = weight.shape
        flat = _rows(x, in_features)
        y = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
        self._nf4(flat.data_ptr(), flat.shape[0], *weight.pointers(), out_features, in_features, weight.blocksize,
                  y.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)

    def nf4_dequantize(self, weight: PackedNF4, out: torch.Tensor | None = None) -> torch.Tensor:
        """W [out, in] float32, each weight code[q] · absmax as bitsandbytes dequantizes it (into
        `out` when given: a reused buffer)."""
        out_features, in_features = weight.shape
        w = torch.empty(out_features, in_features, dtype=torch.float32) if out is None else out
        if w.shape != (out_features, in_features) or w.dtype is not torch.float32 or not w.is_contiguous():
            raise ValueError(f"nf4_dequantize writes a contiguous float32 [{out_features}, {in_features}]")
        self._dequantize(*weight.pointers(), out_features, in_features, weight.blocksize, w.data_ptr(),
                         torch.get_num_threads())
        return w

    def dense_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [..., in] float32 · weightᵀ, weight [out, in] float32 or bfloat16 (widened exactly as it
        is read, summed in float32), contiguous."""
        out_features, in_features = weight.shape
        if weight.dtype not in DENSE_WEIGHT_DTYPES or not weight.is_contiguous():
            raise ValueError(f"dense_linear reads a contiguous float32 or bfloat16 weight, not {weight.dtype}")
        flat = _rows(x, in_features)
        y = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
        self._dense(flat.data_ptr(), flat.shape[0], weight.data_ptr(), weight.dtype is torch.bfloat16, out_features,
                    in_features, y.data_ptr(), torch.get_num_threads())
        return y.view(*x.shape[:-1], out_features)

    def decode_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                         lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """server/kernels/attention.py's decode_attention_reference: q [B, heads, head_dim], one
        layer's keys/values [blocks, block_size, kv_heads, head_dim], block_tables [B, W] and
        lengths [B] int32 → [B, heads, head_dim]."""
        if q.dtype is not torch.float32 or keys.dtype is not torch.float32:
            raise ValueError(f"the C kernels compute in float32, not {q.dtype}")
        batch, heads, head_dim = q.shape
        _, block_size, kv_heads, _ = keys.shape
        q, tables = q.contiguous(), block_tables.contiguous()
        out = torch.empty_like(q)
        self._attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), tables.shape[1],
                        lengths.data_ptr(), batch, heads, kv_heads, head_dim, block_size, scale, out.data_ptr(),
                        torch.get_num_threads())
        return out


    def lora_add(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, scaled_b_t: torch.Tensor,
                 starts: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        """server/lora/layers.py's lora_delta_reference added into y [N, out] in place (returned):
        x [N, in], pool buffers lora_a [S, n·r, in] and scaled_b_t [S, r, out], starts int64 [n+1]
        (the slices' first columns, then out), token_slots int64 [N]."""
        if y.dtype is not torch.float32 or not y.is_contiguous():
            raise ValueError("lora_add updates a contiguous float32 y in place")
        x = _rows(x, lora_a.shape[2])
        self._lora(x.data_ptr(), x.shape[1], y.data_ptr(), y.shape[1], y.shape[0], token_slots.data_ptr(),
                   lora_a.data_ptr(), scaled_b_t.data_ptr(), scaled_b_t.shape[1], starts.data_ptr(), starts.numel() - 1,
                   lora_a.shape[0], torch.get_num_threads())
        return y

    def decode_layers(self, layers: "DecodeLayerTable", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache_slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                      lengths: torch.Tensor, token_slots: torch.Tensor | None) -> torch.Tensor:
        """Every decoder layer of a decode step (one new token per row) in one call: x [B, hidden]
        is updated in place and returned. cos/sin [B, head_dim] (the rows' RoPE), cache_slots [B]
        int64 where each new key goes, keys/values the whole cache [layers, blocks, block_size,
        kv_heads, head_dim], block_tables [B, W] and lengths [B] int32, token_slots [B] int64
        adapter slots or None."""
        if x.dtype is not torch.float32 or not x.is_contiguous():
            raise ValueError("decode_layers updates a contiguous float32 x in place")
        batch = x.shape[0]
        work = torch.empty(batch * layers.work_per_row, dtype=torch.float32)
        tables = block_tables.contiguous()
        self._layers(layers.shape.data_ptr(), layers.eps, layers.code.data_ptr(), layers.table.data_ptr(),
                     layers.table.shape[0], x.data_ptr(), batch, cos.contiguous().data_ptr(), sin.contiguous().data_ptr(),
                     _int64(cache_slots).data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(),
                     tables.shape[1], lengths.data_ptr(), 0 if token_slots is None else _int64(token_slots).data_ptr(),
                     work.data_ptr(), torch.get_num_threads())
        return x


# cpu_kernels.c's decode_layers: per layer, codes/absmax/bias/LoRA A/LoRA sBᵀ of the four projection
# groups (q/k/v, o, gate/up, down), then the two norms' weights
GROUPS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LAYER_FIELDS = 22


@dataclass(frozen=True)
class DecodeLayerTable:
    """What decode_layers reads for a model: its sizes, and each layer's tensors by address.
    The tensors must outlive the table (they are the model's own, which never reallocates them)."""

    shape: torch.Tensor  # int64: hidden, heads, kv_heads, head_dim, intermediate, block_size, max_rank, blocksize,
    #                      kv stride, LoRA slots
    eps: float
    code: torch.Tensor
    table: torch.Tensor  # int64 [layers, LAYER_FIELDS]
    work_per_row: int

    @staticmethod
    def build(sizes: dict[str, int], eps: float, layers: list[dict]) -> "DecodeLayerTable":
        """sizes: hidden, heads, kv_heads, head_dim, intermediate, block_size, max_rank, kv_layer_stride, slots;
        layers: per layer {group: (PackedNF4, bias or None, lora_a, scaled_b_t)} for GROUPS, plus
        "input_norm" and "post_norm" weights."""
        first = layers[0][GROUPS[0]][0]
        rows = []
        for layer in layers:
            parts = [layer[g] for g in GROUPS]
            for packed, bias, lora_a, scaled_b_t in parts:
                if packed.blocksize != first.blocksize or not torch.equal(packed.code, first.code):
                    raise ValueError("decode_layers needs one NF4 code and blocksize for every projection")
                for t in (packed.codes, packed.absmax, bias, lora_a, scaled_b_t):
                    if t is not None and (t.dtype not in (torch.float32, torch.uint8) or not t.is_contiguous()):
                        raise ValueError("decode_layers reads contiguous float32 tensors")
            rows.append([p[0].codes.data_ptr() for p in parts] + [p[0].absmax.data_ptr() for p in parts]
                        + [0 if p[1] is None else p[1].data_ptr() for p in parts] + [p[2].data_ptr() for p in parts]
                        + [p[3].data_ptr() for p in parts]
                        + [layer["input_norm"].data_ptr(), layer["post_norm"].data_ptr()])
        h, q = sizes["hidden"], sizes["heads"] * sizes["head_dim"]
        qkv = q + 2 * sizes["kv_heads"] * sizes["head_dim"]
        shape = torch.tensor([h, sizes["heads"], sizes["kv_heads"], sizes["head_dim"], sizes["intermediate"],
                              sizes["block_size"], sizes["max_rank"], first.blocksize, sizes["kv_layer_stride"],
                              sizes["slots"]],
                             dtype=torch.int64)
        work = h + qkv + 2 * q + h + 3 * sizes["intermediate"]  # h, qkv, q, attn, proj, gate_up, mlp
        return DecodeLayerTable(shape, eps, first.code, torch.tensor(rows, dtype=torch.int64), work)


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()


def _function(library: ctypes.CDLL, name: str, argtypes: list):
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, None
    return function


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    if x.dtype is not torch.float32:
        raise ValueError(f"the C kernels compute in float32, not {x.dtype}")
    flat = x.reshape(-1, in_features)
    return flat if flat.is_contiguous() else flat.contiguous()


_lock = threading.Lock()
_loaded: dict[tuple[Path, bool], CPUKernels] = {}


def load(build_dir: Path | None, portable: bool = False) -> CPUKernels:
    """The library, built into build_dir on first use (None: a directory for this process); one
    CPUKernels per library and version, shared by everything that computes with it."""
    with _lock:
        build_dir = Path(build_dir) if build_dir is not None else _process_dir()
        flags = build_flags()
        path = build_dir / f"cpu_kernels-{_build_key(flags)}.so"
        if (path, portable) not in _loaded:
            if not path.exists():
                _build(path, flags)
            _loaded[path, portable] = CPUKernels(ctypes.CDLL(str(path)), portable)
        return _loaded[path, portable]


def build_flags() -> tuple[str, ...]:
    """FLAGS, and no AVX-512 code where torch's CPU capability is below it (its own ceiling, which
    ATEN_CPU_CAPABILITY lowers)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return FLAGS
    return (*FLAGS, "-DHOTLORA_NO_AVX512") if capability == "AVX2" else (*FLAGS, "-DHOTLORA_NO_AVX512", "-DHOTLORA_NO_AVX2")


def _build_key(flags: tuple[str, ...]) -> str:
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]


_process_build_dir: Path | None = None


def _process_dir() -> Path:
    global _process_build_dir
    if _process_build_dir is None:
        _process_build_dir = Path(tempfile.mkdtemp(prefix="hotlora-kernels-"))
    return _process_build_dir


def _build(path: Path, flags: tuple[str, ...]) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("nf4 path cpu-fused builds a small C library on first use and needs a C compiler "
                               "(apt-get install gcc); or use the dequantize-once path")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    command = [compiler, *flags, str(SOURCE), "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise KernelBuildError(f"building the cpu-fused kernels failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    os.replace(partial, path)  # whole or absent: a concurrent or interrupted build never leaves half a library
