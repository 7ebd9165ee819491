"""`bench/distill_step.py` end to end at a tiny width: the script the performance figures come from runs,
its variants compile side by side, and a remat variant computes the same step (the same loss) as without.
Scanned layers (the cheap compile here; both layouts are checked against PyTorch in test_step_reference).
PyTorch's step runs beside it with its own accumulation. Bad `--variant` text and batch splits are refused
before anything is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "distill_step.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_distill_step_runs_its_variants_side_by_side(tmp_path):
    out = tmp_path / "step.json"
    result = run_bench("--width", "16", "--resolution", "64", "--iters", "1", "--torch-accumulation", "2",
                       "--variant", "scan_layers=true", "--variant", "scan_layers=true,remat=full", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    plain, remat = figures["variants"]
    assert (plain["name"], remat["name"]) == ("auto_scan_remat-none_b2_acc1", "auto_scan_remat-full_b2_acc1")
    for v in (plain, remat):
        assert v["step_s"] > 0 and v["compile_s"] > 0 and 0 < v["flop_utilisation"] < 1, v
    # the same weights, batch and rng: recomputing in the backward must not change the step's numbers
    assert abs(plain["loss"] - remat["loss"]) <= 1e-4 * abs(plain["loss"]), (plain["loss"], remat["loss"])
    assert figures["step_s"] == plain["step_s"] and figures["pairs"] == 26
    # PyTorch beside it, here over two micro-batches of one (its own accumulation, same global batch)
    assert figures["torch_accumulation"] == 2 and figures["torch_step_s"] > 0
    assert figures["ratio_vs_torch"] == figures["torch_step_s"] / plain["step_s"]
    # progress as it goes (a run killed by a GPU lease's limit still says how far it got): one line per
    # phase, in order, each variant timed once
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")]
    phases = ["weights drawn", "TFLOP per step", "PyTorch: models built", "PyTorch: ",
              f"{plain['name']}: compiled", f"{plain['name']}: ", f"{remat['name']}: compiled", f"{remat['name']}: "]
    assert [p for p, line in zip(phases, lines, strict=True) if p in line] == phases, lines
    assert sum("s per step" in line for line in lines) == 3, lines


def test_bad_variant_is_refused_by_name():
    result = run_bench("--no-torch", "--variant", "scan_layers=maybe")
    assert result.returncode != 0 and "bad value for scan_layers" in result.stderr
    result = run_bench("--no-torch", "--variant", "scan_accumulation=sometimes")
    assert result.returncode != 0 and "bad value for scan_accumulation" in result.stderr
    result = run_bench("--no-torch", "--variant", "depth=3")
    assert result.returncode != 0 and "expected key=value pairs" in result.stderr
    result = run_bench("--no-torch", "--variant", "batch=3,accumulation=2")
    assert result.returncode != 0 and "does not split into 2 micro-batches" in result.stderr
    result = run_bench("--torch-accumulation", "3")
    assert result.returncode != 0 and "--torch-accumulation 3 does not divide --batch 2" in result.stderr


def test_gpu_kernels_are_sorted_into_kinds_by_name():
    """The profile's GPU breakdown (kernels inside XLA's command buffers carry no op name, only their own):
    names as cuDNN, cuBLAS and XLA give them; attention before convolution (both say fprop), convolution
    before matmul (both say xmma/implicit_gemm), conversions are not convolutions."""
    sys.path.insert(0, str(ROOT / "bench"))
    from distill_step import kernel_kind

    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1":
            "convolution",
        "sm90_xmma_wgrad_implicit_gemm_indexed_bf16bf16_bf16f32_f32_nhwckrsc_nhwc": "convolution",
        "nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_NNT": "matmul",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "matmul",
        "gemm_fusion_dot_1234": "matmul",
        "input_reduce_fusion_12": "reduction",
        "loop_convert_fusion_7": "elementwise fusion",
        "loop_multiply_fusion": "elementwise fusion",
        "transpose_fusion_3": "copy/transpose",
        "cudaGraphLaunch": "other",
    }
    assert {name: kernel_kind(name) for name in kinds} == kinds
