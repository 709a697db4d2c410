"""hal-iree speed: Executable.run vs the IREE runtime called directly, and cold vs warm prepare.

    HAL_LOAD_PLUGINS=iree python plugins/hal-iree/benchmarks/bench_iree.py [--runs 300]
    HAL_LOAD_PLUGINS=iree python plugins/hal-iree/benchmarks/bench_iree.py --channels-last

"direct (FunctionInvoker)" is IREE's ordinary Python API (``ctx.modules.module.main(x)`` and
``.to_host()``); "direct (raw invoke)" is the lowest-level path (VmContext.invoke on buffer
views), the floor for any wrapper. Cold prepare compiles into an empty cache; warm prepare
loads the cached vmfb. Medians of ``--runs`` calls after warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _interleaved(fns, runs: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Median ms of each function, called in turn so that load from other processes on a shared
    machine hits them all alike."""
    for fn in fns:
        for _ in range(max(10, runs // 10)):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times):
            t = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t)
    return [statistics.median(bucket) * 1e3 for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--channels-last", action="store_true", help="only compare channels_last on a CNN")
    args = parser.parse_args()
    os.environ["HAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="hal-iree-bench-")
    os.environ.setdefault("HAL_LOAD_PLUGINS", "iree")
    import iree.runtime as rt
    from conftest import conv_model, mlp_model

    import hal
    from hal import _plugins

    backend = _plugins.registry().backend("iree")
    cases = {
        "mlp-small (8x64, 1 layer)": mlp_model(),
        "mlp (32x1024, 4 layers)": mlp_model(batch=32, width=1024, hidden=1024, out=1024, layers=4),
    }
    for label, model in cases.items():
        compiled = hal.compile(model)
        t = time.perf_counter()
        exe = compiled.to("iree:local-task")
        cold = time.perf_counter() - t
        warm = statistics.median(
            [(lambda s: (compiled.to("iree:local-task"), time.perf_counter() - s)[1])(time.perf_counter()) for _ in range(5)]
        )
        x = np.random.default_rng(0).standard_normal(compiled.inputs[0].shape).astype(np.float32)
        feeds = {"x": x}
        runner = exe.runner
        # Direct IREE on the same vmfb, in its own context.
        config = rt.Config(device=rt.get_device("local-task"))
        vm = rt.VmModule.copy_buffer(config.vm_instance, runner.vm_module.stashed_flatbuffer_blob or b"") \
            if runner.vm_module.stashed_flatbuffer_blob else None
        if vm is None:
            (vmfb,) = sorted(Path(os.environ["HAL_CACHE_DIR"]).rglob("*.vmfb"), key=lambda p: p.stat().st_mtime)[-1:]
            vm = rt.VmModule.copy_buffer(config.vm_instance, vmfb.read_bytes())
        ctx = rt.SystemContext(config=config)
        ctx.add_vm_module(vm)
        invoker = ctx.modules.module["main"]

        def direct() -> None:
            for out in invoker(x):
                out.to_host()

        device = config.device
        function = vm.lookup_function("main")
        vmctx = ctx.vm_context

        def raw() -> None:
            a = rt.VmVariantList(1)
            a.push_ref(device.allocator.allocate_buffer_copy(
                memory_type=rt.MemoryType.DEVICE_LOCAL, allowed_usage=rt.BufferUsage.DEFAULT, device=device,
                buffer=x, element_type=rt.HalElementType.FLOAT_32))
            r = rt.VmVariantList(2)
            vmctx.invoke(function, a, r)
            for i in range(2):
                bv = r.get_as_object(i, rt.HalBufferView)
                np.array(bv.map().asarray(bv.shape, np.dtype(np.float32)))

        hal_ms, direct_ms, raw_ms = _interleaved([lambda: exe.run(feeds), direct, raw], args.runs)
        print(f"{label}: cold prepare {cold * 1e3:.0f} ms, warm prepare (cache hit) {warm * 1e3:.1f} ms; "
              f"run p50: hal {hal_ms:.3f} ms, direct FunctionInvoker {direct_ms:.3f} ms, "
              f"direct raw invoke {raw_ms:.3f} ms  (compiles={backend.compile_count}, hits={backend.cache_hits})")


if __name__ == "__main__" and "--channels-last" not in sys.argv:
    main()


def resnet_like(size: int = 112, width: int = 32):  # type: ignore[no-untyped-def]
    """Stem conv + 3 stages of two 3x3 convs (stride 2 between stages) + GAP + FC, NCHW."""
    from conftest import make
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes, inits, cur, cin = [], {}, "x", 3
    for i, (cout, stride) in enumerate([(width, 2), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1)]):
        inits[f"w{i}"] = (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(cin * 9)).astype(np.float32)
        inits[f"b{i}"] = np.zeros(cout, np.float32)
        nodes += [helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        cur, cin = f"r{i}", cout
    inits["fc"] = (rng.standard_normal((cin, 10)) * 0.1).astype(np.float32)
    nodes += [helper.make_node("GlobalAveragePool", [cur], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("MatMul", ["f", "fc"], ["y"])]
    return make(nodes, [("x", TensorProto.FLOAT, [1, 3, size, size])], [("y", TensorProto.FLOAT, [1, 10])], inits)


def channels_last(runs: int = 50) -> None:
    """Latency of a ResNet-like CNN with and without ``channels_last=True``."""
    os.environ["HAL_CACHE_DIR"] = tempfile.mkdtemp(prefix="hal-iree-bench-")
    os.environ.setdefault("HAL_LOAD_PLUGINS", "iree")
    import hal

    compiled = hal.compile(resnet_like())
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 112, 112)).astype(np.float32)}
    plain = compiled.to("iree:local-task")
    nhwc = compiled.to("iree:local-task", channels_last=True)
    a, b = _interleaved([lambda: plain.run(x), lambda: nhwc.run(x)], runs)
    print(f"resnet-like 1x3x112x112: run p50 default {a:.2f} ms, channels_last {b:.2f} ms ({a / b:.2f}x)")


if __name__ == "__main__" and "--channels-last" in sys.argv:
    channels_last()
