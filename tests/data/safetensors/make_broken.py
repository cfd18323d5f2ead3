#!/usr/bin/env python3
"""Writes broken/*.safetensors: one format violation per file, each of which a reader must reject.

tests/test_safetensors.cpp holds the table of the message fragment expected for each file; keep the
two in step (the test fails on a file without an entry and on an entry without a file).
Run once (plain Python, no packages); the output is committed and also seeds the fuzzer.
"""
import json
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "broken")


def st(header, data=b"", length=None):
    """A safetensors file: 8-byte LE header length (real one unless given), header, data."""
    if not isinstance(header, bytes):
        header = json.dumps(header, separators=(",", ":")).encode()
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def f32(shape, begin, end):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


files = {
    "empty_file": b"",
    "truncated_header_length": b"\x10\x00\x00",
    "header_length_past_file": st(b"{}", length=1000),
    "header_length_over_100mb": st(b"{}", length=200_000_000),
    "header_length_u64_max": st(b"{}", length=2**64 - 1),
    "header_empty": st(b""),
    "not_json": st(b'{"w": {"dtype": '),
    "json_trailing_garbage": st(b"{}xyz"),
    "json_array": st(b"[1, 2]"),
    "invalid_utf8": st(b'{"w\xff":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
    "overlong_utf8": st(b'{"w\xc0\xaf":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
    "control_char_in_string": st(b'{"w\x01":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'),
    "entry_not_object": st({"w": 5}),
    "missing_dtype": st({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "extra_key": st({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "foo": 1}}, b"\0" * 8),
    "dtype_not_string": st({"w": {"dtype": 1, "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "unknown_dtype": st({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2),
    "shape_not_array": st({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8),
    "negative_shape": st({"w": f32([2, -2], 0, 16)}, b"\0" * 16),
    "float_shape": st({"w": f32([2.0], 0, 8)}, b"\0" * 8),
    "shape_past_int64": st({"w": f32([2**63], 0, 0)}),
    "shape_overflow": st({"w": f32([2**62, 2**62], 0, 0)}),
    "byte_size_overflow": st({"w": f32([2**62], 0, 0)}),
    "offsets_three_values": st({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}}, b"\0" * 16),
    "offsets_negative": st({"w": f32([2], -8, 0)}),
    "offsets_begin_after_end": st({"w": f32([2], 8, 0)}, b"\0" * 8),
    "offsets_out_of_bounds": st({"w": f32([4], 0, 16)}, b"\0" * 8),
    "offsets_overlap": st({"a": f32([4], 0, 16), "b": f32([4], 8, 24)}, b"\0" * 24),
    "gap_between_tensors": st({"a": f32([4], 0, 16), "b": f32([4], 20, 36)}, b"\0" * 36),
    "first_not_at_zero": st({"a": f32([4], 8, 24)}, b"\0" * 24),
    "trailing_bytes": st({"a": f32([4], 0, 16)}, b"\0" * 20),
    "data_without_tensors": st({}, b"\0" * 4),
    "size_mismatch": st({"w": f32([2, 2], 0, 12)}, b"\0" * 12),
    "duplicate_name": st(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                         b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8),
    "duplicate_key_in_entry": st(b'{"w":{"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]}}',
                                 b"\0" * 4),
    "metadata_not_object": st({"__metadata__": ["a"]}),
    "metadata_value_not_string": st({"__metadata__": {"k": 1}}),
}

os.makedirs(out, exist_ok=True)
for old in os.listdir(out):
    if old.endswith(".safetensors"):
        os.remove(os.path.join(out, old))
for name, data in files.items():
    with open(os.path.join(out, name + ".safetensors"), "wb") as f:
        f.write(data)
print(f"wrote {len(files)} files to {out}")
