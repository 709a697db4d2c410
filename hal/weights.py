"""External data: a model's weights kept in their files, checked once, mapped and never copied.

An ONNX model stores large tensors as *external data*: a relative file name, an offset and a
length in the tensor's record, the bytes in files beside the model. :func:`hal.load` checks every
reference (:meth:`Weights.add`) and keeps the tensors external: the graph travels through the HAL
as a small protobuf, and the bytes through one :class:`Weights` per model, which holds each file
open (opened once, without following links, checked to be the file that was examined) and mapped
read-only. Nothing downstream opens a path named in a model: a backend takes the bytes from here
(:meth:`Weights.array` is a zero-copy read-only view), or one protobuf with the bytes inside
(:meth:`Weights.inline`, up to 2 GiB).

The model's digest covers the bytes (:meth:`Weights.normalized`): each external tensor's sha256 is
computed once and remembered under ``HAL_CACHE_DIR/digests`` by its file's identity (device,
inode, size, modification and change times), offset and length, so loading the same weights
again does not read gigabytes to hash them; the digest does not depend on how the bytes are laid
out in files, so a model saved with its weights elsewhere keeps it.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from hal._paths import cache_root, cache_skipped
from hal.cache import atomic_write
from hal.capabilities import NumberFormat
from hal.errors import ModelError

__all__ = ["MAX_INLINE_BYTES", "Weights", "external_tensors", "is_external", "weightless"]

#: Largest total of external bytes :meth:`Weights.inline` puts into one protobuf (protobuf cannot
#: serialize a message of 2 GiB or more; the graph needs room too).
MAX_INLINE_BYTES = 2**31 - 2**26

_DRIVE = re.compile(r"^[A-Za-z]:")
_HASH_CHUNK = 8 << 20
#: Leaves of a tensor's tree hash (see Weights.tensor_sha256).
_TREE_CHUNK = 64 << 20


def _walk_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _walk_tensors(attr.g)
            for g in attr.graphs:
                yield from _walk_tensors(g)


def _all_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    yield from _walk_tensors(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                if attr.HasField("g"):
                    yield from _walk_tensors(attr.g)


def external_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor of ``proto`` stored as external data (initializers, attributes, subgraphs,
    functions, sparse tensors)."""
    for tensor in _all_tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            yield tensor


def weightless(
    proto: onnx.ModelProto, keep: Callable[[TensorProto], bool], *, value_info: bool = True
) -> onnx.ModelProto:
    """A copy of ``proto``'s graph without the main-graph initializers ``keep`` rejects: each
    enters as a graph input of its type and shape instead, so shape inference, onnx's checker or a
    runtime's reader still know it, and its bytes (inline or external) are never copied.
    ``value_info=False`` leaves out the declared shapes of intermediate values too. The copy keeps
    the IR version, opsets, functions and the graph's nodes, inputs, outputs and sparse
    initializers; model metadata is not carried."""
    model = onnx.ModelProto(ir_version=proto.ir_version)
    model.opset_import.extend(proto.opset_import)
    model.functions.extend(proto.functions)
    source, graph = proto.graph, model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.sparse_initializer.extend(source.sparse_initializer)
    if value_info:
        graph.value_info.extend(source.value_info)
    declared = {v.name for v in source.input}
    for tensor in source.initializer:
        if keep(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return model


def is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


class _File:
    """One external data file: open, checked, mapped read-only."""

    def __init__(self, location: str, path: Path, fd: int, st: os.stat_result) -> None:
        self.location = location
        self.path = path  # for messages only: never opened again by name
        self.fd = fd
        self.size = st.st_size
        self.identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        self.map: mmap.mmap | None = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if st.st_size else None
        self.private: mmap.mmap | None = None  # copy-on-write, made on demand (Weights.array)
        self.memo: dict[str, str] | None = None  # "offset:length" -> sha256, see Weights.tensor_sha256
        self.dirty = False

    def close(self) -> None:
        for mapping in (self.map, self.private):
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # a view is still alive somewhere: the mapping goes with it
                    pass
        self.map = self.private = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Weights:
    """The external data files one model references, each checked, open and mapped."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<hal.Weights {len(self._files)} files, {self.nbytes} bytes under {self.base_dir}>"

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - at interpreter exit os may be gone; the OS closes the files
            pass

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    @property
    def nbytes(self) -> int:
        """The external files' total size."""
        return sum(f.size for f in self._files.values())

    @property
    def locations(self) -> tuple[str, ...]:
        return tuple(sorted(self._files))

    # -- checking ------------------------------------------------------------------------------

    def add(self, tensor: TensorProto) -> None:
        """Check ``tensor``'s external reference and open its file (once per file).

        Raises :class:`~hal.errors.ModelError` for a location that is absolute, contains ``..``,
        goes through a symbolic link, is a hard link or not a regular file, and for an offset and
        length that leave the file."""
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor {tensor.name!r}: external data location {location!r}"
        if not location:
            msg = f"tensor {tensor.name!r} is marked external but names no location; re-export the model"
            raise ModelError(msg)
        key = _normal(location, where)
        with self._lock:
            file = self._files.get(key)
            if file is None:
                file = self._open(key, location, where)
                self._files[key] = file
        _, length = _span(info, where, file.size)
        expected = _expected_bytes(tensor)
        if expected is not None and expected != length:
            msg = (
                f"{where}: {length} bytes where its type and shape need {expected}; "
                "the model and its data file do not belong together: re-export the model"
            )
            raise ModelError(msg)

    def _open(self, key: str, location: str, where: str) -> _File:
        current = self.base_dir
        st: os.stat_result | None = None
        for part in key.split("/"):
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                msg = f"{where}: {current} does not exist; keep the data file beside the model"
                raise ModelError(msg) from None
            except OSError as exc:
                msg = f"{where}: cannot read {current}: {exc.strerror}"
                raise ModelError(msg) from None
            if stat.S_ISLNK(st.st_mode):
                msg = f"{where} goes through the symbolic link {current}; copy the real file beside the model"
                raise ModelError(msg)
        assert st is not None
        if not stat.S_ISREG(st.st_mode):
            msg = f"{where} is not a regular file"
            raise ModelError(msg)
        if st.st_nlink > 1:
            msg = f"{where} is a hard link ({st.st_nlink} links); copy the file instead of linking it"
            raise ModelError(msg)
        try:
            fd = os.open(current, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            msg = f"{where}: cannot open {current}: {exc.strerror}"
            raise ModelError(msg) from None
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(opened.st_mode):
                msg = f"{where} changed while it was being opened"
                raise ModelError(msg)
            return _File(location, current, fd, opened)
        except BaseException:
            os.close(fd)
            raise

    def normal_location(self, location: str) -> str:
        """``location`` as this object keys it: ``/``-separated, without ``.`` parts."""
        return _normal(location, f"external data location {location!r}")

    def file_size(self, location: str) -> int:
        """The size of the checked file ``location`` names."""
        return self._files[self.normal_location(location)].size

    # -- reading -------------------------------------------------------------------------------

    def view(self, tensor: TensorProto) -> memoryview:
        """The bytes of external ``tensor``, read-only, without a copy."""
        info = {e.key: e.value for e in tensor.external_data}
        where = f"tensor {tensor.name!r}"
        key = _normal(info.get("location", ""), where)
        file = self._files.get(key)
        if file is None:
            msg = f"{where} names external data {info.get('location')!r} this model's weights were not loaded with"
            raise ModelError(msg)
        offset, length = _span(info, where, file.size)
        if length == 0:
            return memoryview(b"")
        assert file.map is not None
        return memoryview(file.map)[offset : offset + length]

    def array(self, tensor: TensorProto, *, private: bool = False) -> np.ndarray:
        """External ``tensor`` as a numpy array over the mapping, without a copy (packed 4- and
        2-bit types come as their raw bytes, uint8). Read-only; with ``private``, writable over
        a copy-on-write mapping of the same open file, for a runtime that insists on writable
        memory (OpenVINO's shared tensors): pages are shared until written, and a write stays in
        this process, never reaching the file."""
        fmt = NumberFormat.from_onnx(tensor.data_type)
        data = self.view(tensor) if not private else self._private_view(tensor)
        if fmt.bits < 8:
            return np.frombuffer(data, dtype=np.uint8)
        return np.frombuffer(data, dtype=fmt.dtype).reshape(tuple(tensor.dims))

    def _private_view(self, tensor: TensorProto) -> memoryview:
        info = {e.key: e.value for e in tensor.external_data}
        file = self._files[_normal(info.get("location", ""), f"tensor {tensor.name!r}")]
        offset, length = _span(info, f"tensor {tensor.name!r}", file.size)
        if length == 0:
            return memoryview(bytearray())
        with self._lock:
            if file.private is None:
                file.private = mmap.mmap(file.fd, 0, access=mmap.ACCESS_COPY)
        return memoryview(file.private)[offset : offset + length]

    def inline(
        self, proto: onnx.ModelProto, *, limit: int = MAX_INLINE_BYTES, keep_external: Collection[str] = ()
    ) -> onnx.ModelProto:
        """A copy of ``proto`` with every external tensor's bytes inside it (but those named in
        ``keep_external``), for a runtime that takes one self-contained protobuf. Raises
        :class:`~hal.errors.ModelError` when the bytes exceed ``limit`` (protobuf's 2 GiB)."""
        total = sum(self.view(t).nbytes for t in external_tensors(proto) if t.name not in keep_external)
        if total > limit:
            msg = (
                f"the model's {total} bytes of external data do not fit in one protobuf (at most {limit}); "
                "this device needs the weights inside the model: use a device whose backend takes external data"
            )
            raise ModelError(msg)
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        for tensor in external_tensors(out):
            if tensor.name in keep_external:
                continue
            tensor.raw_data = self.view(tensor).tobytes()
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
        return out

    # -- identity ------------------------------------------------------------------------------

    def normalized(self, proto: onnx.ModelProto) -> bytes:
        """``proto``'s deterministic serialization with each external reference (file, offset,
        length) replaced by the sha256 of the tensor's bytes: what a model's digest is taken
        over, the same wherever and however its weights are laid out in files."""
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        tensors = list(external_tensors(copy))
        # hashlib releases the GIL on large buffers: chunks are hashed on every core at once.
        with ThreadPoolExecutor(min(os.cpu_count() or 1, 8), thread_name_prefix="hal-hash") as pool:
            shas = [self.tensor_sha256(t, pool=pool) for t in tensors]
        for tensor, sha in zip(tensors, shas):
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "sha256", sha
        return copy.SerializeToString(deterministic=True)

    def tensor_sha256(self, tensor: TensorProto, *, pool: ThreadPoolExecutor | None = None) -> str:
        """A sha256 tree hash of external ``tensor``'s bytes (the sha256 of the sha256s of its
        64 MiB chunks, so that ``pool`` hashes a large tensor on every core): read once per file
        identity, offset and length, then remembered under ``HAL_CACHE_DIR/digests`` (a second
        load hashes nothing)."""
        info = {e.key: e.value for e in tensor.external_data}
        file = self._files[_normal(info.get("location", ""), f"tensor {tensor.name!r}")]
        offset, length = _span(info, f"tensor {tensor.name!r}", file.size)
        span = f"{offset}:{length}:tree{_TREE_CHUNK >> 20}"
        with self._lock:
            memo = self._memo(file)
            sha = memo.get(span)
        if sha is not None:
            return sha
        starts = range(offset, offset + length, _TREE_CHUNK) if length else range(offset, offset + 1)
        jobs = [(file.fd, start, min(_TREE_CHUNK, offset + length - start)) for start in starts]
        chunks = list(pool.map(_hash_job, jobs)) if pool is not None else [_hash_job(j) for j in jobs]
        sha = hashlib.sha256("".join(chunks).encode()).hexdigest()
        with self._lock:
            memo[span] = sha
            file.dirty = True
        return sha

    def remember(self) -> None:
        """Write the hashes computed since the last call to the cache directory."""
        for file in self._files.values():
            if not file.dirty or file.memo is None:
                continue
            path = _memo_path(file)
            try:
                atomic_write(path, json.dumps({"identity": list(file.identity), "ranges": file.memo}).encode())
            except OSError as exc:
                cache_skipped(path.parent, exc)
            file.dirty = False

    def _memo(self, file: _File) -> dict[str, str]:
        if file.memo is None:
            file.memo = {}
            try:
                record = json.loads(_memo_path(file).read_text())
                if record.get("identity") == list(file.identity) and isinstance(record.get("ranges"), dict):
                    file.memo = {str(k): str(v) for k, v in record["ranges"].items()}
            except (OSError, ValueError):
                pass
        return file.memo

    # -- writing -------------------------------------------------------------------------------

    def save_beside(self, proto: onnx.ModelProto, path: Path, data_name: str) -> onnx.ModelProto:
        """A copy of ``proto`` whose external tensors point into one new file ``data_name`` beside
        ``path``, written (streamed from the mappings, 64-byte aligned) atomically; ``proto``'s
        own references are left alone."""
        out = onnx.ModelProto()
        out.CopyFrom(proto)
        target = path.parent / data_name
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{data_name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                offset = 0
                for tensor in external_tensors(out):
                    info = {e.key: e.value for e in tensor.external_data}
                    source = self._files[_normal(info.get("location", ""), f"tensor {tensor.name!r}")]
                    start, length = _span(info, f"tensor {tensor.name!r}", source.size)
                    offset += (-offset) % 64
                    f.seek(offset)
                    f.flush()
                    _copy_range(source.fd, start, f.fileno(), offset, length)
                    entries = {"location": data_name, "offset": str(offset), "length": str(length)}
                    del tensor.external_data[:]
                    for key, value in entries.items():
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    offset += length
                f.truncate(offset)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def _chunks(fd: int, offset: int, length: int, doing: str, start: int = 0) -> Iterator[tuple[int, memoryview]]:
    """``(position, bytes)`` of ``fd``'s range ``[offset + start, offset + length)``, read through
    one reused buffer: the pages pass through the page cache, never into this process's memory
    (reading through the mapping would make each page resident and count it against the
    process)."""
    buffer = bytearray(min(_HASH_CHUNK, max(length - start, 1)))
    view = memoryview(buffer)
    done = start
    while done < length:
        got = os.preadv(fd, [view[: min(len(buffer), length - done)]], offset + done)
        if got <= 0:
            msg = f"external data file ended {length - done} bytes early while {doing}"
            raise ModelError(msg)
        yield done, view[:got]
        done += got


def _hash_job(job: tuple[int, int, int]) -> str:
    return _hash_range(*job)


def _hash_range(fd: int, offset: int, length: int) -> str:
    """sha256 of ``length`` bytes at ``offset`` of ``fd``."""
    digest = hashlib.sha256()
    for _, chunk in _chunks(fd, offset, length, "hashing"):
        digest.update(chunk)
    return digest.hexdigest()


def _copy_range(source: int, start: int, target: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes from ``source`` at ``start`` to ``target`` at ``offset``, in the
    kernel where it can (``copy_file_range``: no copy through this process), else in chunks."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while done < length and copy is not None:
        try:
            got = copy(source, target, length - done, start + done, offset + done)
        except OSError:
            break  # across file systems on old kernels, or unsupported: copy by hand
        if got <= 0:
            break
        done += got
    for position, chunk in _chunks(source, start, length, "copying", start=done):
        os.pwrite(target, chunk, offset + position)


def _memo_path(file: _File) -> Path:
    name = hashlib.sha256(json.dumps(file.identity).encode()).hexdigest()[:32]
    return cache_root() / "digests" / f"{name}.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _normal(location: str, where: str) -> str:
    if os.path.isabs(location) or location.startswith(("/", "\\")) or _DRIVE.match(location):
        msg = f"{where} is absolute; external data must sit beside the model (a relative path)"
        raise ModelError(msg)
    parts = [p for p in re.split(r"[\\/]+", location) if p not in ("", ".")]
    if ".." in parts or not parts:
        msg = f"{where} contains '..'; external data must stay inside the model's directory"
        raise ModelError(msg)
    if any("\0" in p for p in parts):
        msg = f"{where} contains a NUL byte, which no file name can hold; re-export the model"
        raise ModelError(msg)
    return "/".join(parts)


def _span(info: dict[str, str], where: str, size: int) -> tuple[int, int]:
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        msg = f"{where} has a non-integer offset or length"
        raise ModelError(msg) from None
    if offset < 0 or (length is not None and length < 0):
        msg = f"{where} has a negative offset or length"
        raise ModelError(msg)
    if length is None:
        length = size - offset
    if offset > size or offset + length > size:
        msg = f"{where}: offset {offset} + length {length} is past the end of the {size}-byte file"
        raise ModelError(msg)
    return offset, length


def _expected_bytes(tensor: TensorProto) -> int | None:
    try:
        bits = NumberFormat.from_onnx(tensor.data_type).bits
    except ValueError:
        return None
    if tensor.data_type == TensorProto.STRING:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return (count * bits + 7) // 8
