"""Cold-start wall time of `hal devices` against `python -c "import onnxruntime"`.

    python benchmarks/cold_start.py [--runs 15]

Each run is a fresh process; runs alternate between the two commands so machine noise hits
both alike. Target (issue 2): `hal devices` at most 1.5x the bare onnxruntime import.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = dict(os.environ)
    hal_cmd = shutil.which("hal", path=os.path.dirname(sys.executable)) or "hal"
    commands = {
        "python -c 'import onnxruntime'": [sys.executable, "-c", "import onnxruntime"],
        "hal devices": [hal_cmd, "devices"],
    }
    for cmd in commands.values():
        wall(cmd, env)  # warm the page cache
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            times[name].append(wall(cmd, env))
    base = statistics.median(times["python -c 'import onnxruntime'"])
    plugins = env.get("HAL_LOAD_PLUGINS", "(all installed)")
    print(f"{args.runs} alternating runs each; HAL_LOAD_PLUGINS={plugins!r}")
    print("| command | median s | p90 s | ratio to import onnxruntime |")
    print("|---|---|---|---|")
    for name, values in times.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        print(f"| {name} | {statistics.median(values):.3f} | {p90:.3f} | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
