"""safetensors files read and written with NumPy alone (no torch): the format is an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range,
then the raw little-endian bytes.

Reading memory-maps each tensor, so a model is never read whole. Writing lays out every file
first (headers, sizes) from the tensors' names and shapes, then fills each tensor in at its
offset in any order, so a converter can produce tensors in the order its source is cheapest to
read while the files keep the order a loader expects (layer by layer).
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_dtypes
import numpy as np

from rexmoe_jax.config import ConfigError
from rexmoe_jax.runtime.workdir import failure_reason

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024  # what the reference implementation accepts


def _header(path: pathlib.Path) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data), every entry checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            raw = file.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if length < 2 or length > min(size - 8, _MAX_HEADER):
                raise ConfigError(f"{str(path)!r} is not a safetensors file (bad header length; truncated?)")
            try:
                header = json.loads(file.read(length))
            except ValueError:
                raise ConfigError(f"{str(path)!r} has an unreadable safetensors header") from None
    except OSError as err:  # an input that cannot be read is bad input (2), not a failed write (4)
        raise ConfigError(f"{str(path)!r} cannot be read ({failure_reason(err)})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{str(path)!r} has an unreadable safetensors header")
    header.pop("__metadata__", None)
    start = 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{str(path)!r}: tensor {name!r} has a malformed header entry") from None
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ConfigError(
                f"{str(path)!r}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}"
            )
        if start + end > size:
            raise ConfigError(
                f"{str(path)!r} is truncated: tensor {name!r} ends at byte {start + end} "
                f"of a {size}-byte file"
            )
    return header, start


class TensorFiles:
    """The tensors of a model folder: model.safetensors, or the shards its index names."""

    def __init__(self, folder: pathlib.Path):
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"{str(index)!r} is not a safetensors index (no weight_map)") from None
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ConfigError(f"{str(folder)!r} has no {SINGLE_FILE} or {INDEX_FILE}")
        self._entries: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ConfigError(f"{str(index)!r} names {name!r}, which is missing")
            header, start = _header(path)
            self._entries.update({key: (path, entry, start) for key, entry in header.items()})

    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ("F32", "BF16", "I32", ...)."""
        return self._entries[name][1]["dtype"]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (nothing is read until it is used)."""
        path, entry, start = self._entries[name]
        shape = tuple(entry["shape"])
        if not np.prod(shape):
            return np.zeros(shape, DTYPES[entry["dtype"]])
        return np.memmap(
            path, dtype=DTYPES[entry["dtype"]], mode="r", offset=start + entry["data_offsets"][0], shape=shape
        )


class TensorWriter:
    """Writes the tensors `specs` names ((name, shape, dtype) in file order) into `folder`:
    one model.safetensors, or shards of at most about `max_shard_bytes` with an index.
    `put` may come in any order; `close` checks that every tensor was written exactly once."""

    def __init__(
        self, folder: pathlib.Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int
    ):
        shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        count = len(shards)
        self.files = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._where: dict[str, tuple[int, int, tuple[int, ...], np.dtype]] = {}
        self._fds, self._folder, self.total_bytes = [], folder, 0
        for file_index, (file, shard) in enumerate(zip(self.files, shards)):
            header, offset, relative = {"__metadata__": {"format": "pt"}}, 0, {}
            for name, shape, dtype in shard:
                nbytes = int(np.prod(shape)) * dtype.itemsize
                header[name] = {
                    "dtype": _NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                relative[name] = (offset, shape, dtype)
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            start = 8 + len(text)
            self._where.update({name: (file_index, start + o, s, d) for name, (o, s, d) in relative.items()})
            fd = os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds.append(fd)
            os.write(fd, len(text).to_bytes(8, "little") + text)
            os.ftruncate(fd, start + offset)
            self.total_bytes += offset
        self._missing = {name for name, _, _ in specs}

    def put(self, name: str, array: np.ndarray) -> None:
        file_index, offset, shape, dtype = self._where[name]
        if tuple(array.shape) != shape:
            raise ValueError(f"tensor {name}: shape {array.shape}, planned {shape}")
        data = np.ascontiguousarray(array, dtype=dtype)
        if name not in self._missing:
            raise ValueError(f"tensor {name} written twice")
        self._missing.discard(name)
        view = memoryview(data.reshape(-1).view(np.uint8))
        while view:
            written = os.pwrite(self._fds[file_index], view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._missing:
            raise ValueError(f"{len(self._missing)} tensors never written, e.g. {min(self._missing)}")
        if len(self.files) > 1:
            weight_map = {name: self.files[index] for name, (index, *_) in self._where.items()}
            (self._folder / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
                + "\n"
            )
