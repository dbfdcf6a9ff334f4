"""Compile every Triton kernel in server/kernels for an H100 (sm_90) without a GPU, and report
register use and spills from ptxas (Triton's wheel ships it). Run by tests/test_kernels.py in a
subprocess: TRITON_INTERPRET must be unset when the kernels are defined for them to compile.

    python tests/compile_kernels_for_gpu.py        # one line per kernel: name, registers, spill bytes
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from server.kernels import attention, lora, nf4  # noqa: E402

NF4_TENSORS = {"w_packed": "*u8", "w_code": "*fp32", "w_absmax": "*u8", "w_code2": "*fp32", "w_absmax2": "*fp32",
               "w_shift": "*i32", "w_offset": "*fp32"}
KERNELS = {  # name: (kernel, pointer types, constexprs, compile options); other arguments are i32
    "nf4_linear": (nf4._nf4_linear_kernel, {**NF4_TENSORS, "x_ptr": "*bf16", "bias_ptr": "*bf16", "y_ptr": "*bf16"},
                   dict(HAS_BIAS=True, BLOCKSIZE=64, DOT_FP32=False, BLOCK_M=16, BLOCK_N=64, BLOCK_KP=32),
                   dict(enable_fp_fusion=False)),
    "nf4_dequantize": (nf4._nf4_dequantize_kernel, {**NF4_TENSORS, "out_ptr": "*bf16"}, dict(BLOCKSIZE=64, BLOCK=1024),
                       dict(enable_fp_fusion=False)),
    "bgmv_shrink": (lora._bgmv_shrink_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "slots_ptr": "*i64",
                                               "ranks_ptr": "*i32", "h_ptr": "*fp32"},
                    dict(R_MAX=16, R_TOTAL=48, BLOCK_R=lora.BLOCK_R, BLOCK_K=lora.BLOCK_K), {}),
    "bgmv_expand": (lora._bgmv_expand_kernel, {"y_ptr": "*bf16", "h_ptr": "*fp32", "b_ptr": "*bf16", "slots_ptr": "*i64",
                                               "ranks_ptr": "*i32", "starts_ptr": "*i32"},
                    dict(R_MAX=16, N_SLICES=3, BLOCK_N=lora.BLOCK_N, BLOCK_R=lora.BLOCK_R), {}),
    "sgmv_shrink": (lora._sgmv_shrink_kernel, {"x_ptr": "*bf16", "a_ptr": "*bf16", "seg_starts_ptr": "*i32",
                                               "seg_slots_ptr": "*i32", "ranks_ptr": "*i32", "h_ptr": "*fp32"},
                    dict(R_MAX=16, R_TOTAL=48, BLOCK_T=lora.BLOCK_T, BLOCK_R=lora.BLOCK_R, BLOCK_K=lora.BLOCK_K,
                         DOT_FP32=False), {}),
    **{f"decode_attention_d{d}": (attention._decode_attention_kernel,
                                  {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "tables_ptr": "*i32",
                                   "lengths_ptr": "*i32", "out_ptr": "*bf16", "scale": "fp32"},
                                  dict(GROUP=8, HEAD_DIM=d, PAGE=16, BLOCK_G=16, BLOCK_D=d, BLOCK_S=attention.block_s(d),
                                       DOT_FP32=False), dict(enable_fp_fusion=True))
       for d in (64, 128)},
    "sgmv_expand": (lora._sgmv_expand_kernel, {"y_ptr": "*bf16", "h_ptr": "*fp32", "b_ptr": "*bf16",
                                               "seg_starts_ptr": "*i32", "seg_slots_ptr": "*i32", "ranks_ptr": "*i32",
                                               "starts_ptr": "*i32"},
                    dict(R_MAX=16, N_SLICES=3, BLOCK_T=lora.BLOCK_T, BLOCK_N=lora.BLOCK_N, BLOCK_R=lora.BLOCK_R), {}),
}


def compile_for(kernel, pointers: dict, constexprs: dict, options: dict, target: GPUTarget):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=target, options=options)


def ptxas_report(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel, from ptxas -v."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(source), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out)[1])
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return registers, spills


def main() -> int:
    assert not os.environ.get("TRITON_INTERPRET"), "unset TRITON_INTERPRET: interpreted kernels do not compile"
    target = GPUTarget("cuda", 90, 32)
    for name, (kernel, pointers, constexprs, options) in KERNELS.items():
        compiled = compile_for(kernel, pointers, constexprs, options, target)
        registers, spills = ptxas_report(compiled.asm["ptx"])
        print(f"{name} registers={registers} spill_bytes={spills}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
