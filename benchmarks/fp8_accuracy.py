"""FP8 weight quantization's error: float32 against UE8M0 scales, 128x128 against 1x32 blocks, E4M3 against E5M2.

    python benchmarks/fp8_accuracy.py [--large-width 2048] [--write]

For the generated MLP and transformer (hal.testing.models, benchmark sizes) and one larger
generated model (an MLP of ``--large-layers`` layers ``--large-width`` wide), every combination
runs through hal.quantize.fp8 and hal.quantize.accuracy: SQNR over the quantized tensors (median,
minimum), the end-to-end relative error ||out - ref|| / ||ref|| on ort:cpu with seeded inputs
(both models through hal.compile(m).to("ort:cpu")), and the bytes of all initializers. Then the
synthetic orientation figure of issue 12 (Gaussian 4096x4096 weights, E4M3, blocks of 1x32).
``--write`` replaces the "FP8 quantization accuracy" section of BENCHMARKS.md (other sections
are left alone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import hal
import hal.quantize as hq
from hal import fp8
from hal.testing import models

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine_info, write_section  # noqa: E402

SECTION = "## FP8 quantization accuracy (issue 12)"
CONFIGS = [
    # (label, format, scale, rounding, block)
    ("e4m3 fp32 128x128", "e4m3fn", "float32", None, (128, 128)),
    ("e4m3 ue8m0-up 128x128", "e4m3fn", "ue8m0", "up", (128, 128)),
    ("e4m3 ue8m0-nearest 128x128", "e4m3fn", "ue8m0", "nearest", (128, 128)),
    ("e4m3 ue8m0-down 128x128", "e4m3fn", "ue8m0", "down", (128, 128)),
    ("e4m3 fp32 1x32", "e4m3fn", "float32", None, (1, 32)),
    ("e4m3 ue8m0-up 1x32", "e4m3fn", "ue8m0", "up", (1, 32)),
    ("e4m3 ue8m0-nearest 1x32", "e4m3fn", "ue8m0", "nearest", (1, 32)),
    ("e4m3 ue8m0-down 1x32", "e4m3fn", "ue8m0", "down", (1, 32)),
    ("e5m2 fp32 128x128", "e5m2", "float32", None, (128, 128)),
    ("e5m2 ue8m0-up 128x128", "e5m2", "ue8m0", "up", (128, 128)),
    ("e5m2 fp32 1x32", "e5m2", "float32", None, (1, 32)),
    ("e5m2 ue8m0-up 1x32", "e5m2", "ue8m0", "up", (1, 32)),
]


def large_mlp(width: int, layers: int, batch: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``layers`` Gemm layers (transB=1, weights [out, in] as exported LLM linears are) of
    ``width``, with an up/down pair 4x wider in the middle, ReLU between; opset 21. Weights
    N(0, 1/fan_in) with a few heavy-tailed outlier columns, as trained weights have."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "x"
    dims = [width] + [width] * (layers - 2) + [4 * width, width] if layers >= 2 else [width, width]
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((fan_out, fan_in)) / math.sqrt(fan_in)).astype(np.float32)
        cols = rng.choice(fan_in, size=max(1, fan_in // 256), replace=False)
        w[:, cols] *= 8.0  # outlier input channels
        inits.append(numpy_helper.from_array(w, f"layer{i}.weight"))
        inits.append(numpy_helper.from_array((rng.standard_normal(fan_out) * 0.02).astype(np.float32), f"layer{i}.bias"))
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [h, f"layer{i}.weight", f"layer{i}.bias"], [out if out == "y" else f"g{i}"], transB=1, name=f"layer{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
            h = out
    graph = helper.make_graph(nodes, "large_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def measure(name: str, model: onnx.ModelProto) -> list[dict]:
    rows = []
    reference = hal.load(model)
    for label, fmt, scale, rounding, block in CONFIGS:
        start = time.perf_counter()
        quantized = hq.fp8(reference, format=fmt, scale=scale, rounding=rounding or "up", block=block)
        report = hq.accuracy(reference, quantized, seed=0)
        median, minimum = report.sqnr_summary()
        rows.append({
            "model": name, "config": label, "tensors": len(report.tensors), "sqnr_median": median, "sqnr_min": minimum,
            "end_to_end": report.end_to_end, "bytes_before": report.bytes_before, "bytes_after": report.bytes_after,
            "seconds": time.perf_counter() - start,
        })
        print(f"{name:12s} {label:28s} SQNR median {median:6.2f} min {minimum:6.2f}  e2e {report.end_to_end:.4f}  "
              f"{report.bytes_after / 2**20:8.2f} MiB  ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows


def synthetic(size: int = 4096, block: int = 32, seed: int = 0) -> dict[str, float]:
    """Issue 12's orientation figure: Gaussian weights, E4M3, blocks of 1x32 along a row."""
    w = np.random.default_rng(seed).standard_normal((size, size)).astype(np.float32)
    amax = fp8.block_amax(w, 1, block)
    out = {}
    variants = {
        "float32": fp8.scale_for(amax, "e4m3fn", "float32"),
        "ue8m0 up": fp8.scale_for(amax, "e4m3fn", "ue8m0", "up"),
        "ue8m0 nearest": fp8.scale_for(amax, "e4m3fn", "ue8m0", "nearest"),
        "ue8m0 down": fp8.scale_for(amax, "e4m3fn", "ue8m0", "down"),
        # OCP MX v1.0's rule: X = 2^(floor(log2 amax) - emax), emax = 8 for E4M3 (448 = 1.75 * 2^8),
        # i.e. "down" applied to amax / 256 rather than amax / 448.
        "ue8m0 down, OCP (amax/256)": fp8.power_of_two_scale(np.where(amax > 0, amax / np.float32(256), 1).astype(np.float32), "down")[1],
    }
    for label, scale in variants.items():
        full = fp8.expand_scale(scale, w.shape, 1, block)
        q = fp8.saturate_cast(w / full, "e4m3fn")
        out[label] = fp8.sqnr_db(w, q.astype(np.float32) * full)
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | format, scale, block | tensors | SQNR median dB | SQNR min dB | end-to-end rel. error | weights MiB |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        first = next(r for r in rows if r["model"] == name)
        lines.append(f"| {name} | float32 (original) | – | – | – | – | {first['bytes_before'] / 2**20:.2f} |")
        for r in (r for r in rows if r["model"] == name):
            lines.append(f"| {name} | {r['config']} | {r['tensors']} | {r['sqnr_median']:.2f} | {r['sqnr_min']:.2f} | "
                         f"{r['end_to_end']:.4f} | {r['bytes_after'] / 2**20:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large-width", type=int, default=2048)
    parser.add_argument("--large-layers", type=int, default=6)
    parser.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    rows += measure("mlp", models.mlp())
    rows += measure("transformer", models.transformer_encoder())
    large = large_mlp(args.large_width, args.large_layers)
    large_name = f"large_mlp {args.large_width}"
    rows += measure(large_name, large)
    orientation = synthetic()
    for label, value in orientation.items():
        print(f"synthetic 4096x4096 E4M3 1x32 {label:28s} {value:6.2f} dB")
    elapsed = time.perf_counter() - start
    info = machine_info()
    print(json.dumps({"seconds": round(elapsed, 1), "machine": info}))
    if not args.write:
        return
    command = "python benchmarks/fp8_accuracy.py" + ("" if args.large_width == 2048 else f" --large-width {args.large_width}") + \
        ("" if args.large_layers == 6 else f" --large-layers {args.large_layers}") + " --write"
    issue = {"float32": 32.4, "ue8m0 up": 31.5, "ue8m0 down, OCP (amax/256)": 30.7}
    section = [
        SECTION,
        "",
        f"`{command}` ({elapsed:.0f} s; {info['cpu']}, {info['usable_cores']} cores, Python {info['python']}, "
        f"onnx {info['versions'].get('onnx')}, onnxruntime {info['versions'].get('onnxruntime')}, numpy {info['versions'].get('numpy')}). "
        "Weight-only quantization by `hal.quantize.fp8` of every MatMul/Gemm weight; SQNR over the quantized tensors; "
        "end-to-end: ‖out−ref‖/‖ref‖ of the output against the float32 model, both run on ort:cpu through the HAL "
        "with the same seeded inputs (uniform in [−1, 1), seed 0). Bytes are all initializers, scales as stored "
        "(float32; a 128×128 block's scale is stored once per row of the block, see `hal.quantize.fp8`). "
        "UE8M0 scales are float32 powers of two (opset 21), which onnxruntime runs; with `keep_e8m0` "
        "they would be ¼ of those scale bytes and numerically identical. "
        f"Models: `mlp` (4 × 1024², batch 32), `transformer` (4 layers, d_model 256, batch 8 × 128), "
        f"`{large_name}` ({args.large_layers - 1} Gemm layers {args.large_width} wide plus a 4× up/down pair, transB weights, "
        "N(0, 1/fan_in) with 1 in 256 input channels ×8 as outliers, batch 8; "
        f"{large.ByteSize() / 2**20:.0f} MiB float32).",
        "",
        *table(rows),
        "",
        "Synthetic orientation figure (issue 12: Gaussian 4096×4096 weights, E4M3, blocks of 1×32 along a row):",
        "",
        "| scale | SQNR dB here | issue's figure |",
        "|---|---|---|",
        *[f"| {label} | {value:.2f} | {issue.get(label, '–')} |" for label, value in orientation.items()],
        "",
        "Reading: UE8M0 rounded up costs about 0.9 dB of SQNR against float32 scales for 1×32 blocks "
        "and little end to end; rounding down by ONNX Cast-24's definition (the power of two at or "
        "below amax/448) clips every block's largest values by up to 2× and is far worse; OCP's own "
        "rule (floor of log2 amax, minus 8 for E4M3) clips less and lands near the issue's 30.7 dB. "
        "`hal.quantize.fp8(rounding=\"down\")` is Cast-24's down, not OCP's rule.",
        "",
    ]
    path = write_section(SECTION, section)
    print(f"wrote the section to {path}")


if __name__ == "__main__":
    main()
