"""Reads an offline W&B run file (run-ID.wandb) for tests: its config and logged history.

The file is a LevelDB-style log (a 7-byte header ":W&B", magic, version; then 32 KiB blocks of
records, each with a 7-byte header: CRC32, length, kind 1 whole / 2 first / 3 middle / 4 last)
of W&B's protobuf records. wandb 0.31 ships no reader for it."""

import json
import pathlib
import struct

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024


def _payloads(data: bytes):
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if _BLOCK - position % _BLOCK < 7:  # A block's tail too short for a header is padding.
            position += _BLOCK - position % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            break
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            yield pieces
            pieces = b""


def read_run(path: pathlib.Path) -> tuple[dict, list[dict]]:
    """(config, history rows) of an offline run file; values as JSON-decoded Python objects."""
    config, history = {}, []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                           for item in record.run.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return config, history
