"""Instructions per weight code in the main loop of rsq's M = 1 GEMV kernels, from the compiled SASS.
No GPU needed: Triton compiles for the target offline and its bundled cuobjdump disassembles.

    python3 bench/sass_count.py [--bits 3,4] [--arch 90] [--kernels words,runs] [--configs BN:BK:W,...]

For each kernel (``words``: rsq.kernels.triton_wq._gemv_kernel, the default; ``runs``: the
run-unrolled _gemv_runs_kernel), bit width and launch configuration (BLOCK_N:BLOCK_K:num_warps):

1. compiles the kernel the way the runtime specializes a per-channel bf16 call at Llama-3-8B shapes
   (16-byte-aligned pointers and N, K, strides multiples of 16 get ``tt.divisibility``; M = 1 and,
   per channel, NG = 1 are constants; KW is not specialized, as in the kernels' decorators);
2. disassembles the cubin (``cuobjdump -sass``) and takes the main loop: the instructions between
   the target of the longest backward branch and that branch;
3. prints the loop's instruction count over the codes each thread handles per iteration
   (BLOCK_N * BLOCK_K / (32 * num_warps)), the opcode mix, and the registers and spill stores
   (``cuobjdump -res-usage``).

Why count: at M = 1 the GEMV is instruction-issue bound (bench/NOTES-kernels.md, sessions 18-19): an
SM issues 4 warp-instructions per clock, so at ~4 instructions per 3-bit code an H100 cannot pass
~3 TB/s of 3-bit weights even with perfect issue. A static count is an upper bound on issue
efficiency, never a time: the timing is ``bench/kernel_speed.py --sweep --sweep-gemv`` on a GPU.
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

DEFAULT_CONFIGS = {"words": ["8:2048:4", "16:1024:2"], "runs": ["16:1024:2", "8:1024:2", "32:1024:2"]}
ALIGNED = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "stride_ym")


def compile_gemv(kernel_name: str, bits: int, block_n: int, block_k: int, warps: int, arch: int, group: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rsq.kernels import triton_wq as T

    per_channel = group == -1
    const = dict(BITS=bits, GS=0 if per_channel else group, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k)
    const.update(PER_CHANNEL=per_channel, HAS_BIAS=False, M=1)
    if per_channel:
        const["NG"] = 1
    if kernel_name == "words":
        kernel = T._gemv_kernel
        const["CPV"] = T._gemv_cpv(bits)
    else:
        kernel = T._gemv_runs_kernel
        const["EVEN_K"] = True
    names = kernel.arg_names
    signature = {
        "x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16",
        "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "NG": "i32",
        "stride_xm": "i32", "stride_ym": "i32",
    }  # fmt: skip
    signature.update({k: "constexpr" for k in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED}
    src = ASTSource(fn=kernel, signature=signature, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 1})


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
    ap.add_argument("--kernels", default="words,runs")
    ap.add_argument("--configs", default="", help="BLOCK_N:BLOCK_K:num_warps,... (default: per kernel)")
    ap.add_argument("--group", type=int, default=-1, help="group size (-1: per channel)")
    args = ap.parse_args()
    print(f"sm_{args.arch}, M = 1, {'per channel' if args.group == -1 else f'groups of {args.group}'}")
    for name in args.kernels.split(","):
        configs = args.configs.split(",") if args.configs else DEFAULT_CONFIGS[name]
        for bits in map(int, args.bits.split(",")):
            for cfg in configs:
                bn, bk, warps = map(int, cfg.split(":"))
                kernel = compile_gemv(name, bits, bn, bk, warps, args.arch, args.group)
                r = analyse(kernel.asm["cubin"], bn * bk // (32 * warps))
                mix = ", ".join(f"{k} {v}" for k, v in r["mix"].most_common(10))
                print(
                    f"{name:5} {bits}b BLOCK_N {bn:2} BLOCK_K {bk:4} warps {warps}: loop {r['loop']:4} instructions, "
                    f"{r['per_code']:.2f} per code, {r['per_code'] * 8 / bits:5.2f} per weight byte; "
                    f"{r['regs']} registers, {r['spills']} spill stores\n      {mix}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
