"""safetensors bytes -> numpy arrays, with every offset and shape checked against the buffer (no torch).

Blocks and codebooks may come from an untrusted peer (their digest matched, their contents may still
be hostile), so nothing is allocated from a header before it is checked. bfloat16 is widened to
float32 (safetensors.numpy has no bf16).
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "U8": np.uint8, "I8": np.int8}


def read_safetensors(data: bytes, with_metadata: bool = False):
    """Parse safetensors bytes into arrays (views of `data`); with `with_metadata`, (arrays, metadata)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (size,) = struct.unpack_from("<Q", data)
    if size > len(data) - 8:
        raise ValueError(f"header of {size} bytes in a buffer of {len(data)}")
    header = json.loads(bytes(data[8 : 8 + size]))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    body = memoryview(data)[8 + size :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: unsupported dtype {entry['dtype']}")
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        count = math.prod(shape)
        if not 0 <= begin <= end <= len(body) or end - begin != count * np.dtype(dtype).itemsize or min(shape, default=0) < 0:
            raise ValueError(f"{name}: offsets {begin}..{end} do not hold {entry['dtype']} {list(shape)}")
        array = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        if entry["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        out[name] = array
    if with_metadata:
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("safetensors metadata is not an object")
        return out, metadata
    return out
