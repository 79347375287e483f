"""bench/decode_profile.py: the kernel classifier, the step folding and layer split, and the
profiling path end to end on the CPU (a tiny model).

Oracles: the kernel names of a real H100 profile of rsq's compiled decode step
(bench/figures/generate_profile_h100_b16.txt) and the names of rsq's own Triton kernels read from
their source files, each with the category a reader of the name gives it; synthetic kernel
sequences whose structure is known by construction; and, on the CPU, identities that hold whatever
the timings: per-step counts that are whole numbers, per layer x layers + outside = per step.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package)."""
    key = f"_rsq_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # before running it: its dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(scope="module")
def dp():
    return _bench("decode_profile")


# every device kernel row of the H100 profile (names cut at 70 characters by the profiler's table)
H100_KERNELS = {
    "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_...": "attention",
    "triton_poi_fused__scaled_dot_product_cudnn_attention__to_copy__unsa...": "attention",  # K/V repeated
    "nvjet_sm90_tst_64x16_64x16_2x1_v_bz_TNT": "bf16_gemm",
    "nvjet_sm90_tst_64x16_64x16_2x1_v_bz_splitK_TNT": "bf16_gemm",
    "nvjet_sm90_tst_128x16_64x11_4x1_v_bz_splitK_TNT": "bf16_gemm",
    "nvjet_sm90_tst_512x16_64x3_2x1_v_bz_TNT": "bf16_gemm",
    "nvjet_sm90_tst_64x16_64x16_4x1_v_bz_splitK_TNT": "bf16_gemm",
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "bf16_gemm",
    "nvjet_sm90_tst_384x8_64x4_2x1_v_bz_TNT": "bf16_gemm",
    "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT": "bf16_gemm",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat1...": "bf16_gemm",
    "void humming<MmaOpClass, Shape<0u, 14336u, 4096u>, Shape<16u, 128u,...": "quantized_gemm",
    "void humming<MmaOpClass, Shape<0u, 4096u, 4096u>, Shape<16u, 128u, ...": "quantized_gemm",
    "void humming<MmaOpClass, Shape<0u, 4096u, 14336u>, Shape<16u, 128u,...": "quantized_gemm",
    "void humming<MmaOpClass, Shape<0u, 1024u, 4096u>, Shape<16u, 128u, ...": "quantized_gemm",
    "void humming<MmaOpClass, Shape<0u, 14336u, 4096u>, Shape<176u, 256u...": "quantized_gemm",
    "triton_poi_fused__unsafe_view_mul_silu_8": "elementwise",
    "triton_poi_fused_mul_silu_view_wq_linear_8": "elementwise",  # "linear": a view of the GEMM's output
    "triton_poi_fused_add_copy__16": "elementwise",
    "triton_poi_fused__to_copy__unsafe_view_add_arange_cat_cos_index_cop...": "rope_kv",
    "triton_poi_fused__to_copy_add_arange_cat_cos_index_copy_mul_neg_sin...": "rope_kv",
    "triton_poi_fused__unsafe_view_add_arange_index_copy_transpose_view_...": "rope_kv",  # V cache write
    "triton_poi_fused_add_arange_index_copy_transpose_view_3": "rope_kv",
    "triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_11": "norm",
    "triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_14": "norm",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_12": "norm",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_view_wq_linear_11": "norm",
    # a reduction whose operator the table cut off: not guessed
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ...": "other",
    # CPU operators of the same table
    "aten::argmax": "sampling",
    "aten::mm": "bf16_gemm",
    "aten::bmm": "bf16_gemm",
    "aten::linear": "bf16_gemm",
    "aten::copy_": "elementwise",
    "aten::where": "elementwise",
    "humming::launch_kernel": "quantized_gemm",
}


def _profile_names(path: Path) -> set[str]:
    """The name column (70 characters) of every row of the profiler tables in ``path``."""
    names = set()
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("=", "-", "Self ")) or line.strip().startswith("Name"):
            continue
        names.add(line[:70].strip())
    return names


def test_classifier_on_a_real_h100_profile(dp):
    names = _profile_names(ROOT / "bench" / "figures" / "generate_profile_h100_b16.txt")
    missing = set(H100_KERNELS) - names
    assert not missing, f"not in the profile file: {missing}"  # the names are the file's, not typed anew
    wrong = {n: (dp.classify(n), c) for n, c in H100_KERNELS.items() if dp.classify(n) != c}
    assert not wrong, wrong
    # the file's kernel rows are all classified (its other rows: CPU frames and profiler activities)
    frames = ("## Call CompiledFxGraph", "Torch-Compiled Region", "cudaGraphLaunch", "Activity Buffer", "Buffer Flush")
    rest = {n for n in names if dp.classify(n) == "other" and not n.startswith(frames)}
    assert rest == {"void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, ..."}


def test_classifier_on_full_kernel_names(dp):
    assert (
        dp.classify(
            "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, "
            "unsigned int, long, 4, 4> >(at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, "
            "long, 4, 4>)"
        )
        == "sampling"
    )
    assert dp.classify("triton_red_fused_argmax_5") == "sampling"
    assert dp.classify("triton_tem_fused_mm_0") == "bf16_gemm"  # inductor's mm template
    assert dp.classify("gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128>") == "bf16_gemm"
    assert (
        dp.classify("void pytorch_flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64>>(Flash_fwd_params)")
        == "attention"
    )
    assert dp.classify("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert dp.classify("Memcpy DtoD (Device -> Device)") == "elementwise"
    assert dp.classify("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == (
        "elementwise"
    )
    # rsq's custom ops and CPU operators
    assert dp.classify("rsq::quant_linear") == "quantized_gemm"
    assert dp.classify("rsq::hadamard") == "hadamard"
    assert dp.classify("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert dp.classify("aten::index_copy_") == "rope_kv"
    assert dp.classify("aten::rsqrt") == "norm"
    assert dp.classify("aten::empty") == "other"


def test_classifier_on_rsq_triton_kernels(dp):
    """Every launched Triton kernel of rsq's inference kernels (read from the sources: a renamed
    kernel fails here until the classifier knows it)."""
    expect = {
        "triton_wq.py": "quantized_gemm",
        "triton_e8p.py": "quantized_gemm",
        "triton_hadamard.py": "hadamard",
        "triton_attention.py": "attention",
    }
    seen = 0
    for file, category in expect.items():
        src = (ROOT / "rsq" / "kernels" / file).read_text()
        kernels = re.findall(r"@triton\.jit[^\n]*\ndef (\w+_kernel)\(", src)
        assert kernels, file
        for k in kernels:
            assert dp.classify(k) == category, (file, k)
            seen += 1
    assert seen >= 8


def _k(dp, names, t0=0.0, us=1.0, gap=0.5):
    out, t = [], t0
    for n in names:
        out.append(dp.Kernel(n, dp.classify(n), t, us))
        t += us + gap
    return out


LAYER = ["rsq::quant_linear", "aten::index_copy_", "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::add"]


def test_fold_and_layer_split_recover_the_structure(dp):
    layers, steps = 3, 5
    head = ["aten::rsqrt", "aten::mm", "aten::argmax", "aten::copy_"]
    step = ["aten::embedding", "aten::cos"] + LAYER * layers + head
    prefill = ["aten::embedding"] + LAYER * 2 + ["aten::mm"]
    seq = _k(dp, prefill + step * steps + ["aten::slice"])
    folded = dp.fold(seq, len(step), steps)
    assert folded is not None and len(folded) == steps
    assert all([k.name for k in s] == step for s in folded)
    assert folded[-1][-1] is seq[-2]  # the latest window: it ends with the last step
    assert dp.fold(seq, len(step) + 1, steps) is None
    assert dp.layer_split([k.name for k in folded[0]], layers) == (2, len(LAYER))
    bd = dp.step_breakdown(folded, layers)
    lay = bd["layers"]
    assert lay["split_on"] == "names" and lay["kernels_per_layer"] == 4
    assert lay["per_layer"]["quantized_gemm"]["count"] == 1 and lay["per_layer"]["attention"]["count"] == 1
    assert [n for n, _ in lay["after_kernels"]] == head
    assert bd["timeline"]["idle_in_step_us"] == pytest.approx(0.5 * (len(step) - 1))
    assert bd["timeline"]["idle_between_steps_us"] == pytest.approx(0.5)


def test_layer_split_falls_back_to_categories(dp):
    """The first layer's norm fused with the embedding and the last layer's residual add with the
    final norm (other kernel names, same category): no split on names puts every layer inside the
    repeats; on categories one does."""
    layers = 4
    body = LAYER[:3]  # quantized GEMM, KV write, attention
    names = ["embed", "triton_red_fused_embedding_rsqrt_0"] + body
    names += ["triton_red_fused_add_rsqrt_1"] + body
    names += ["triton_red_fused_add_rsqrt_1"] + body
    names += ["triton_red_fused_add_rsqrt_1"] + body
    names += ["triton_red_fused_add_rsqrt_final_2", "nvjet_lm_head", "aten::argmax"]
    assert dp.layer_split(names, layers) is None
    steps = [_k(dp, names, t0=100.0 * i) for i in range(2)]
    lay = dp.step_breakdown(steps, layers)["layers"]
    assert lay["split_on"] == "categories" and lay["kernels_per_layer"] == 4
    assert [n for n, _ in lay["before_kernels"]] == ["embed"]
    assert [n for n, _ in lay["after_kernels"]] == [
        "triton_red_fused_add_rsqrt_final_2",
        "nvjet_lm_head",
        "aten::argmax",
    ]
    assert {c: v["count"] for c, v in lay["per_layer"].items()} == {
        "quantized_gemm": 1,
        "rope_kv": 1,
        "attention": 1,
        "norm": 1,
    }


def test_per_step_is_the_difference_over_steps(dp):
    short = _k(dp, ["aten::mm", "aten::add"] * 3)
    long = _k(dp, ["aten::mm", "aten::add"] * 7, us=1.0)
    ps = dp.per_step(short, long, 2)
    assert ps["bf16_gemm"] == {"us": 2.0, "count": 2.0}
    assert ps["elementwise"] == {"us": 2.0, "count": 2.0}
    assert ps["attention"] == {"us": 0.0, "count": 0.0}


def test_lengths_are_checked(dp):
    assert dp.check_lengths(32, 8, 32) is None  # 40 and 72 tokens: one 256-position cache
    assert "--short >= 2" in dp.check_lengths(32, 1, 32)  # a short call with no compiled step
    assert "different static cache lengths" in dp.check_lengths(200, 8, 64)  # 208 -> 256, 272 -> 512


def test_bad_arguments_exit_2_before_building(tmp_path):
    import subprocess

    for bad in (["--short", "1"], ["--formats", "5"]):
        cmd = [sys.executable, str(ROOT / "bench" / "decode_profile.py"), "--device", "cpu", "--work", str(tmp_path)]
        p = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (bad, p.stderr[-500:])
        assert "error: --" in p.stderr.strip().splitlines()[-1]  # one line naming the argument
        assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several jobs: OpenMP waits would swamp a tiny model
    yield
    torch.set_num_threads(n)


def _check_cell(dp, r, layers):
    assert r["kernel_count_integral"] and r["kernels"] >= layers
    # times per step are differences of two profiled calls (long minus short): on a loaded CPU the
    # kernel-time difference can come out negative (CI saw -773 us with another job running), so only
    # its arithmetic is asserted; the counts below are the deterministic part of the path
    assert math.isfinite(r["wall_us"]) and math.isfinite(r["kernel_us"])
    assert r["gap_us"] == pytest.approx(r["wall_us"] - r["kernel_us"])
    lay = r["breakdown"]["layers"]
    assert lay is not None
    cats = r["categories"]
    for c in dp.CATEGORIES:  # per layer x layers + before + after = the step's count (by difference)
        n = lay["per_layer"].get(c, {"count": 0})["count"] * layers
        n += lay["before"].get(c, {"count": 0})["count"] + lay["after"].get(c, {"count": 0})["count"]
        assert n == pytest.approx(cats[c]["count"]), c
    assert lay["per_layer"]["attention"]["count"] >= 1
    assert cats["sampling"]["count"] >= 1 and "sampling" in lay["after"]  # the greedy argmax, after the layers
    return lay


def test_profile_step_on_cpu_tiny_llama(dp, one_thread):
    model = tiny_model("llama")
    r = dp.profile_step(model, 2, prompt=8, short=4, steps=6, reps=2, device="cpu")
    assert r["steps"] == 6 and not r["cuda_graphs"] and r["layers"] == 2
    lay = _check_cell(dp, r, 2)
    assert lay["per_layer"]["bf16_gemm"]["count"] >= 7  # q, k, v, o, gate, up, down (and their children)
    assert "bf16_gemm" in lay["after"]  # the lm_head
    assert "quantized_gemm" not in r["categories"] or r["categories"]["quantized_gemm"]["count"] == 0
    assert "| **gap = wall - kernels** |" in dp.table("tiny", r)


def test_profile_step_on_cpu_rsq_checkpoint(dp, one_thread, tmp_path):
    """A tiny model written by the bench's own checkpoint writer (RTN, 4 bits), loaded with
    rsq.load, its packed path (rsq::quant_linear) instead of the CPU's dense cache: the seven
    projections of a layer are quantized GEMM; the lm_head stays a bf16 GEMM."""
    import rsq

    _bench("generate_speed").write_checkpoint(tiny_model("llama"), "4", -1, tmp_path / "ckpt")
    model, _ = rsq.load(tmp_path / "ckpt", device="cpu", dtype=torch.float32)
    for m in model.modules():
        if hasattr(m, "dense_cache"):
            m.dense_cache, m.dense_weight_cache = False, None
    r = dp.profile_step(model, 1, prompt=8, short=4, steps=4, reps=2, device="cpu")
    lay = _check_cell(dp, r, 2)
    assert [n for n, _ in lay["layer_kernels"]].count("rsq::quant_linear") == 7
    assert "quantized_gemm" not in lay["after"] and "bf16_gemm" in lay["after"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_profile_step_on_cuda_sees_the_kernels_inside_the_graphs(dp):
    """The default GPU path (CUDA graphs on): the profiler records the replays' kernels (no
    fallback note), the step folds and splits into layers, the argmax comes after them."""
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    r = dp.profile_step(model, 2, prompt=8, short=4, steps=8, reps=3, device="cuda", graphs="on")
    assert r["cuda_graphs"] and "note" not in r
    assert r["kernels"] >= 5 * 2  # a decoder layer is more than five kernels
    _check_cell(dp, r, 2)
