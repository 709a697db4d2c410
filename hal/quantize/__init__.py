"""FP8 weight quantization: block scales in float32 or UE8M0, in standard ONNX, with the error measured.

    import hal.quantize
    q = hal.quantize.fp8("model.onnx", format="e4m3fn", scale="ue8m0", block=(128, 128))
    report = hal.quantize.accuracy("model.onnx", q)      # SQNR per tensor, end-to-end error
    exe = hal.compile(q).to("ort:cpu")
    hal.quantize.save(q, "model.fp8.onnx")

- :func:`fp8` quantizes MatMul, Gemm and Conv weights (``DequantizeLinear`` with ``block_size``);
- :func:`requantize` moves an FP8 model's float32 block scales (the DeepSeek-V3 layout) to UE8M0,
  requantizing its FP8 values;
- :func:`accuracy` measures a quantized model against its original;
- :func:`save` writes one, with external data past 1 GiB of weights;
- :func:`summary` reads what was done from a quantized model.

The exact conversions underneath (FP8 casts with ONNX saturation, UE8M0 rounding as ONNX
``Cast-24``, both E8M0 zero readings, FN to FNUZ) are :mod:`hal.fp8`, usable on their own.
``import hal`` does not import this package; ``hal.quantize`` does, on first use.
"""

from __future__ import annotations

from hal.quantize._fp8 import METADATA_KEY, Skipped, fp8, requantize, save, summary
from hal.quantize._report import AccuracyReport, TensorError, accuracy, dequantized

__all__ = [
    "METADATA_KEY",
    "AccuracyReport",
    "Skipped",
    "TensorError",
    "accuracy",
    "dequantized",
    "fp8",
    "requantize",
    "save",
    "summary",
]
