"""A stand-in for ``ctypes.CDLL("libascendcl.so")``.

We cannot have Ascend NPUs or the CANN toolkit on the test machines, so the tests that need ACL
answers use this object: it has the three ACL functions hal_ascend calls, takes the same
arguments (a ``ctypes.pointer`` to a uint32 for the count) and returns ACL's error codes.
"""

from __future__ import annotations

import ctypes
from typing import Any


class _Function:
    """A callable with a settable ``restype``, as ctypes' foreign functions have."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self.restype: Any = None
        self.argtypes: Any = None

    def __call__(self, *args: Any) -> Any:
        return self._body(*args)


class FakeAcl:
    """ACL answering ``count`` devices of SoC ``soc``; ``init_error``/``count_error`` are ACL codes."""

    def __init__(self, count: int, soc: str, *, init_error: int = 0, count_error: int = 0) -> None:
        self.calls: list[str] = []

        def acl_init(config: Any) -> int:
            assert config is None
            self.calls.append("aclInit")
            return init_error

        def get_count(pointer: Any) -> int:
            assert isinstance(pointer, ctypes._Pointer)
            self.calls.append("aclrtGetDeviceCount")
            if count_error:
                return count_error
            pointer.contents.value = count
            return 0

        def soc_name() -> bytes:
            self.calls.append("aclrtGetSocName")
            return soc.encode()

        self.aclInit = _Function(acl_init)
        self.aclrtGetDeviceCount = _Function(get_count)
        self.aclrtGetSocName = _Function(soc_name)
        self.aclFinalize = _Function(lambda: self.calls.append("aclFinalize") or 0)


#: ``npu-smi info`` for two 910B3, in the table layout npu-smi 23.x prints (written after published
#: output; not captured on this machine, which has no NPU).
NPU_SMI_910B = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc3                 Version: 23.0.rc3                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 96.8        39                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 65536         |
+===========================+===============+====================================================+
| 1     910B3               | Warning       | 93.6        38                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3162 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
"""
