"""Reads scalars back from TensorBoard event files with nothing but the standard library:
length-prefixed records (8-byte length, 4-byte CRC, data, 4-byte CRC) holding Event protos."""

import pathlib
import struct


def _varint(data, pos):
    shift = result = 0
    while True:
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data):
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        yield number, value


def scalars(folder: pathlib.Path, tag: str) -> list[tuple[int, float]]:
    out = []
    for path in sorted(pathlib.Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = data[pos + 12:pos + 12 + length]
            pos += 16 + length
            fields = dict(_fields(event))
            step = fields.get(2, 0)  # Event.step
            summary = fields.get(5)  # Event.summary
            if summary is None:
                continue
            for number, value in _fields(summary):  # Summary.value (repeated)
                if number != 1:
                    continue
                entry = dict(_fields(value))
                if entry.get(1, b"").decode() == tag and 2 in entry:  # tag, simple_value
                    out.append((step, round(struct.unpack("<f", entry[2])[0], 6)))
    return [(s, round(v, 6)) for s, v in out]
