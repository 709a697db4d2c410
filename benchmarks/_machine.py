"""What every benchmark records about where it ran: CPU, cores, load, Python, package versions.

Shared by the scripts in this directory (``python benchmarks/X.py`` puts it on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from importlib import metadata
from typing import Any

#: Distributions whose versions a result depends on (those not installed are left out).
DISTRIBUTIONS = (
    "onnx-hal",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-cann",
    "openvino",
    "iree-base-compiler",
    "iree-base-runtime",
)


def versions() -> dict[str, str]:
    """Installed versions of :data:`DISTRIBUTIONS` and of every loaded external HAL plugin."""
    found = {}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    import hal

    for plugin in hal.plugins():
        if plugin.status == "loaded" and not plugin.builtin:
            found[plugin.distribution] = plugin.version
    return found


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hal_load_plugins": os.environ.get("HAL_LOAD_PLUGINS"),
        "versions": versions(),
    }


def write_section(heading: str, lines: list[str], *, after: str | None = None) -> Path:
    """Put ``lines`` (starting with ``heading``) into BENCHMARKS.md: in place of the section
    ``heading`` (up to the next ``## ``) if there is one, else after the section ``after`` if that
    exists, else at the end. Returns the file's path."""
    path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    text = path.read_text()
    body = "\n".join(lines)

    def split(anchor: str) -> tuple[str, str, str]:
        before, _, rest = text.partition(anchor)
        cut = rest.find("\n## ") + 1 if "\n## " in rest else len(rest)
        return before, anchor + rest[:cut], rest[cut:]

    if heading in text:
        before, _, rest = split(heading)
        text = before + body + ("\n" + rest if rest else "")
    elif after is not None and after in text:
        before, section, rest = split(after)
        text = before + section + body + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
    return path


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a measured child process: this one's with ``overrides``, and Python
    bytecode written and reused as an installed package has it (pip compiles at install). With
    ``PYTHONDONTWRITEBYTECODE`` set every child compiles what it imports from source; the ONNX
    reference evaluator's ~200 operator modules alone cost 65 ms, charged to whatever imports
    them first. Pass ``PYTHONPYCACHEPREFIX`` to keep that bytecode out of the source tree."""
    env = dict(os.environ, **overrides)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env
