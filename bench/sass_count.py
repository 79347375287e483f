"""Instructions per weight in the main loop of rsq's low-bit kernels, from the compiled SASS. No GPU
needed: Triton compiles for the target offline and its bundled cuobjdump disassembles.

    python3 bench/sass_count.py [--bits 3,4] [--arch 90] [--kernels words,small,e8p,e8p_small]
        [--configs BN:BK:W,...] [--group G]

Kernels: ``words`` (rsq.kernels.triton_wq._gemv_kernel, the M = 1 default), ``small`` (_small_kernel,
16 tokens on the tensor cores), ``e8p`` (rsq.kernels.triton_e8p._gemv_kernel, one token; BK columns =
BK / 8 codes) and ``e8p_small`` (triton_e8p._small_kernel, 16 tokens, tiles decoded by codebook
gathers). For
each kernel, bit width and launch configuration (BLOCK_N:BLOCK_K:num_warps):

1. compiles the kernel the way the runtime specializes a bf16 call at Llama-3-8B shapes (16-byte-aligned
   pointers and N, K, strides multiples of 16 get ``tt.divisibility``; M = 1 and, per channel, NG = 1
   are constants; the GEMVs' KW is not specialized, as in their decorators; the tile kernel's is);
2. disassembles the cubin (``cuobjdump -sass``) and takes the main loop: the instructions between
   the target of the longest backward branch and that branch;
3. prints the loop's instruction count over the weights each thread handles per iteration
   (BLOCK_N * BLOCK_K / (32 * num_warps)), per weight byte, the opcode mix, and the registers and
   spill stores (``cuobjdump -res-usage``).

Why count: at M = 1 the GEMV is bound by instruction issue and stalls, not by DRAM (bench/NOTES-kernels.md,
sessions 18-19): an SM issues 4 warp-instructions per clock, so at ~4 instructions per 3-bit code an
H100 cannot pass ~3 TB/s of 3-bit weights even with perfect issue. A static count bounds what each
issuing cycle does; it is never a time: the timing is ``bench/kernel_speed.py --sweep --sweep-gemv``
on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_CONFIGS = {
    "words": ["8:2048:4", "8:1024:4", "16:1024:2"],
    "small": ["64:256:4"],
    "e8p": ["16:1024:4", "32:1024:4"],
    "e8p_small": ["64:128:4", "16:256:1", "32:512:4"],
}
ALIGNED = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym")


def kernel_spec(name: str, bits: int, block_n: int, block_k: int, group: int):
    """(jit function, signature, constexprs, names given tt.divisibility 16, num_stages) of a
    kernel as the runtime would compile it for a Llama-3-8B-shaped bf16 call."""
    from rsq.kernels import triton_e8p as E
    from rsq.kernels import triton_wq as T

    if name == "e8p":  # one token; BLOCK_K columns = BLOCK_K / 8 codes
        sig = {"x_ptr": "*bf16", "c_ptr": "*i16", "tab_ptr": "*i32", "s_ptr": "*fp32", "b_ptr": "*bf16",
               "y_ptr": "*bf16", "N": "i32", "K": "i32", "C": "i32"}  # fmt: skip
        const = dict(BLOCK_N=block_n, BLOCK_C=block_k // 8, HAS_BIAS=False)
        aligned = [k for k in sig if k.endswith("_ptr")] + ["N", "K", "C"]
        return E._gemv_kernel, sig, const, aligned, 1
    if name == "e8p_small":  # 16 tokens, split-K (small_config's defaults), the codebook in bf16
        sig = {"x_ptr": "*bf16", "c_ptr": "*i16", "tab_ptr": "*bf16", "s_ptr": "*fp32", "b_ptr": "*bf16",
               "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "C": "i32", "stride_xm": "i32",
               "stride_ym": "i32", "SPLIT_K": "i32"}  # fmt: skip
        const = dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_C=block_k // 8, ATOMIC=True, HAS_BIAS=False)
        aligned = [k for k in sig if k.endswith("_ptr")] + ["N", "K", "C", "stride_xm", "stride_ym"]
        return E._small_kernel, sig, const, aligned, 2
    per_channel = group == -1
    sig = {
        "x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16",
        "y_ptr": "*fp32" if name == "small" else "*bf16", "M": "i32", "N": "i32", "K": "i32", "KW": "i32",
        "NG": "i32", "GS": "i32", "stride_xm": "i32", "stride_ym": "i32", "SPLIT_K": "i32", "magic": "i32",
    }  # fmt: skip
    const = dict(BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, PER_CHANNEL=per_channel, HAS_BIAS=False)
    if per_channel:
        const["NG"] = 1
    if name == "small":  # 16 tokens on the tensor cores, split-K with float32 atomics (its defaults)
        const.update(CPV=T._cpv(bits), BLOCK_M=16, ATOMIC=True, USE16=True, OFFSET=128.0)
        kernel, stages = T._small_kernel, 3
        aligned = [*ALIGNED, "KW"]  # specialized here (only the GEMVs leave KW unspecialized)
    else:
        del sig["GS"], sig["SPLIT_K"], sig["magic"]
        const.update(GS=0 if per_channel else group, BLOCK_M=1, M=1)
        kernel = T._gemv_kernel
        const["CPV"] = T._gemv_cpv(bits)
        stages, aligned = 1, list(ALIGNED)
    return kernel, sig, const, aligned, stages


def compile_kernel(name: str, bits: int, block_n: int, block_k: int, warps: int, arch: int, group: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, signature, const, aligned, stages = kernel_spec(name, bits, block_n, block_k, group)
    names = kernel.arg_names
    signature = {k: v for k, v in signature.items() if k not in const}
    signature.update({k: "constexpr" for k in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n not in const}
    src = ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise SystemExit(f"no cuobjdump in this Triton ({path}): install the NVIDIA backend's Triton wheel")
    return str(path)


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction) for every instruction line of ``cuobjdump -sass`` output."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def main_loop(instructions: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of the longest loop: from a backward branch's target to the branch."""
    best: list[tuple[int, str]] = []
    for addr, text in instructions:
        m = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [(a, t) for a, t in instructions if int(m.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return best


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate guard
    return text.split()[0].split(".")[0]


def analyse(cubin: bytes, codes_per_thread: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    loop = main_loop(parse_sass(sass))
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    mix = collections.Counter(opcode(t) for _, t in loop)
    return {
        "loop": len(loop),
        "per_code": len(loop) / codes_per_thread,
        "mix": mix,
        "regs": int(regs.group(1)) if regs else None,
        "stack": int(stack.group(1)) if stack else None,
        "spills": mix.get("STL", 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--kernels", default="words", help="comma list of DEFAULT_CONFIGS keys")
    ap.add_argument("--configs", default="", help="BLOCK_N:BLOCK_K:num_warps,... (default: per kernel)")
    ap.add_argument("--group", type=int, default=-1, help="group size (-1: per channel)")
    args = ap.parse_args()
    print(f"sm_{args.arch}, {'per channel' if args.group == -1 else f'groups of {args.group}'}")
    for name in args.kernels.split(","):
        configs = args.configs.split(",") if args.configs else DEFAULT_CONFIGS[name]
        for bits in [2] if name.startswith("e8p") else map(int, args.bits.split(",")):
            for cfg in configs:
                bn, bk, warps = map(int, cfg.split(":"))
                kernel = compile_kernel(name, bits, bn, bk, warps, args.arch, args.group)
                r = analyse(kernel.asm["cubin"], bn * bk // (32 * warps))
                mix = ", ".join(f"{k} {v}" for k, v in r["mix"].most_common(10))
                print(
                    f"{name:5} {bits}b BLOCK_N {bn:2} BLOCK_K {bk:4} warps {warps}: loop {r['loop']:4} instructions, "
                    f"{r['per_code']:.2f} per weight, {r['per_code'] * 8 / bits:5.2f} per weight byte; "
                    f"{r['regs']} registers, {r['spills']} spill stores\n      {mix}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
