"""The Open Inference Protocol (v2, as Triton and KServe speak it) over JSON, and its binary tensor
extension: a model's metadata, requests read into checked feeds, answers written back.

Nothing here imports Ray: ``hal serve`` (:mod:`hal.ray.serve`) routes HTTP to these functions, and
they can be tested alone. Every problem with a request is an :class:`~hal.errors.InputError`
whose message the server returns with a 400.

Datatypes: ``BOOL``, ``UINT8``-``UINT64``, ``INT8``-``INT64``, ``FP16``, ``FP32``, ``FP64`` and,
in binary only, ``BF16``. ``data`` is the tensor's elements in row-major order, flat or nested.
A request may carry tensors as binary (``parameters.binary_data_size``, after a JSON header of
``Inference-Header-Content-Length`` bytes), and asks for binary outputs with
``parameters.binary_data`` on an output or ``parameters.binary_data_output`` on the request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hal.errors import InputError

if TYPE_CHECKING:
    from hal.model import TensorInfo

__all__ = ["HEADER_LENGTH", "datatype", "decode_request", "encode_response", "model_metadata"]

#: The HTTP header giving the JSON part's length when binary tensors follow it.
HEADER_LENGTH = "Inference-Header-Content-Length"

_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64", "bfloat16": "BF16",
}
_DTYPES = {v: k for k, v in _DATATYPES.items()}


def datatype(info: TensorInfo) -> str:
    """The protocol's name for a tensor's element type (``FP32``), or an InputError for one the
    protocol has no name for (FP8, int4: serve a model whose inputs and outputs it can carry)."""
    name = info.format.value if hasattr(info.format, "value") else str(info.format)
    found = _DATATYPES.get(name)
    if found is None:
        msg = (
            f"{info.name!r} has element type {name}, which the Open Inference Protocol cannot carry "
            f"(it has {', '.join(sorted(_DTYPES))}); give the model float32 or float16 inputs and outputs and cast inside it"
        )
        raise InputError(msg)
    return found


def _shape(info: TensorInfo) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in (info.shape or ())]


def model_metadata(name: str, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo], platform: str) -> dict[str, Any]:
    """``GET /v2/models/{name}``'s answer."""
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": [{"name": i.name, "datatype": datatype(i), "shape": _shape(i)} for i in inputs],
        "outputs": [{"name": o.name, "datatype": datatype(o), "shape": _shape(o)} for o in outputs],
    }


def _dtype(name: str, given: Any) -> np.dtype:
    dtype = _DTYPES.get(given) if isinstance(given, str) else None
    if dtype is None:
        msg = f"input {name!r}: datatype {given!r} is not one of {', '.join(sorted(_DTYPES))}"
        raise InputError(msg)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _split(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            msg = f"{HEADER_LENGTH} is {header_length!r}: expected the JSON part's length in bytes, at most {len(body)}"
            raise InputError(msg)
        head, rest = body[:size], body[size:]
    try:
        request = json.loads(head)
    except ValueError as exc:
        msg = f"the request is not JSON ({exc}); send an inference request of the Open Inference Protocol v2"
        raise InputError(msg) from None
    if not isinstance(request, dict):
        msg = "the request must be a JSON object with an 'inputs' list"
        raise InputError(msg)
    return request, memoryview(rest)


def decode_request(
    body: bytes, inputs: Sequence[TensorInfo], header_length: str | None = None
) -> tuple[dict[str, np.ndarray], list[str] | None, set[str], str | None]:
    """``(feeds, output names or None for all, outputs to send as binary, request id)`` from an
    inference request. Shapes and datatypes are as the client declared them; the executable then
    checks them against the model. Raises InputError."""
    request, rest = _split(body, header_length)
    entries = request.get("inputs")
    if not isinstance(entries, list) or not entries:
        msg = "the request has no 'inputs' list; send {'inputs': [{'name', 'shape', 'datatype', 'data'}, ...]}"
        raise InputError(msg)
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            msg = f"each input must be an object with a 'name', got {entry!r:.80}"
            raise InputError(msg)
        name = entry["name"]
        dtype = _dtype(name, entry.get("datatype"))
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            msg = f"input {name!r}: 'shape' must be a list of sizes >= 0, got {shape!r}"
            raise InputError(msg)
        count = int(np.prod(shape, dtype=np.int64))
        size = (entry.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(rest):
                msg = (
                    f"input {name!r}: binary_data_size {size!r} does not match shape {shape} of {entry['datatype']} "
                    f"({count * dtype.itemsize} bytes) or the bytes sent"
                )
                raise InputError(msg)
            array = np.frombuffer(rest[offset:offset + size], dtype=dtype).reshape(shape)
            offset += size
        else:
            if "data" not in entry:
                msg = f"input {name!r} has no 'data' (nor binary_data_size)"
                raise InputError(msg)
            try:
                array = np.asarray(entry["data"], dtype=dtype)
            except (TypeError, ValueError, OverflowError) as exc:
                msg = f"input {name!r}: 'data' is not a list of {entry['datatype']} values ({exc})"
                raise InputError(msg) from None
            if array.size != count:
                msg = f"input {name!r}: 'data' has {array.size} elements, shape {shape} needs {count}"
                raise InputError(msg)
            array = array.reshape(shape)
        if name in feeds:
            msg = f"input {name!r} is given twice"
            raise InputError(msg)
        feeds[name] = array
    known = {i.name for i in inputs}
    unknown = sorted(set(feeds) - known)
    if unknown:
        msg = f"the model has no input {unknown[0]!r}; its inputs are {sorted(known)}"
        raise InputError(msg)
    binary_all = bool((request.get("parameters") or {}).get("binary_data_output"))
    names = None
    binary = set()
    outputs = request.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            msg = "'outputs' must be a list of objects with a 'name'"
            raise InputError(msg)
        names = [o["name"] for o in outputs]
        binary = {o["name"] for o in outputs if (o.get("parameters") or {}).get("binary_data", binary_all)}
    elif binary_all:
        binary = {"*"}
    request_id = request.get("id")
    return feeds, names, binary, request_id if isinstance(request_id, str) else None


def encode_response(
    model: str, outputs: Mapping[str, np.ndarray], infos: Sequence[TensorInfo], binary: set[str], request_id: str | None
) -> tuple[bytes, int | None]:
    """The answer's body, and the JSON part's length when binary tensors follow (the value of
    the ``Inference-Header-Content-Length`` header), else None."""
    by_name = {i.name: i for i in infos}
    entries = []
    chunks = []
    for name, array in outputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype(by_name[name]), "shape": list(array.shape)}
        if name in binary or "*" in binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": entries}
    if request_id is not None:
        answer["id"] = request_id
    head = json.dumps(answer).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
