#!/usr/bin/env python3
"""Writes python_written.safetensors with the reference writer (safetensors.numpy.save_file).

tests/test_safetensors.cpp checks every value exactly, so the values below are exact in their
dtype and mirrored there. Run once (needs numpy + safetensors); the output is committed.
"""
import os

import numpy as np
from safetensors.numpy import save_file

here = os.path.dirname(os.path.abspath(__file__))
tensors = {
    # (3, 4): -1, -0.5, 0, ..., 4.5
    "f32": (np.arange(12, dtype=np.float32) * 0.5 - 1.0).reshape(3, 4),
    "f16": np.array([1.5, -2.25, 65504.0, 2.0**-24, 0.0, -0.0], dtype=np.float16),
    "f64": np.array([[1.0 / 3.0], [-1e300]], dtype=np.float64),
    "i64": np.array([-(2**63), 2**63 - 1, 0, -1], dtype=np.int64),
    "i32": np.array([[-7, 8], [2**31 - 1, -(2**31)]], dtype=np.int32),
    "i8": np.array([-128, 127, 0, -1, 5], dtype=np.int8),
    "u8": np.arange(250, 256, dtype=np.uint8),
    "scalar": np.array(3.25, dtype=np.float32),  # shape []
    "empty": np.zeros((0,), dtype=np.float32),  # shape [0], zero bytes
}
save_file(tensors, os.path.join(here, "python_written.safetensors"),
          metadata={"format": "np", "note": "written by safetensors.numpy"})
