"""llama.cpp's sequence state: the bytes `llama_state_seq_get_data` gives and `llama_state_seq_set_data`
takes, written and read with numpy. Everything celslm knows about llama.cpp's KV layout is here.

Read from llama-cpp-python 0.3.36's vendored llama.cpp (`src/llama-context.cpp`, `state_seq_get_data`;
`src/llama-kv-cache.cpp`, `state_write` and `state_read`; `LLAMA_STATE_SEQ_VERSION` 3), one stream, one
sequence, no M-RoPE cell extras:

    u32 magic 0xaf143cd8        i32 seq_id
    u32 n_stream (1)            u32 cell_count (T)
    T x (i32 pos, u32 n_seq_id = 1, i32 seq_id)
    u32 v_trans                 u32 n_layer
    per layer:  i32 k_type, u64 k_row_bytes, T rows of K (H*D values each, heads one after another)
    v_trans 0:  per layer: i32 v_type, u64 v_row_bytes, T rows of V
    v_trans 1:  per layer: i32 v_type, u32 v_element_bytes, u32 H*D, then per dimension T values

llama.cpp itself checks only the layer count, types, row sizes and the transpose flag, not which model
wrote the state: callers check the model space before anything reaches here. A new llama-cpp-python
is refused by `check_version` until this layout has been read again from its sources (a test runs the
real library against this module and fails on any difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from celslm.errors import CelslmError, IntegrityError

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release this layout was read from
STATE_SEQ_VERSION = 3  # its LLAMA_STATE_SEQ_VERSION
MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic
GGML_TYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}  # GGML_TYPE_F32, GGML_TYPE_F16: the cache types handled
_CELL = np.dtype([("pos", "<i4"), ("n_seq_id", "<u4"), ("seq_id", "<i4")])


def check_version(version: str, seq_version: int | None) -> None:
    """Refuse a llama-cpp-python other than the one this layout was read from."""
    if version != LLAMA_CPP_PYTHON or seq_version != STATE_SEQ_VERSION:
        raise CelslmError(f"llama-cpp-python {version} (state version {seq_version}) is installed; celslm reads "
                          f"llama.cpp's KV layout of {LLAMA_CPP_PYTHON} (state version {STATE_SEQ_VERSION}): "
                          f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON}")


@dataclass(frozen=True)
class CacheLayout:
    """What a llama.cpp context's KV cache looks like for one model."""

    layers: int
    kv_heads: int
    head_dim: int
    type_k: int  # GGML type of the cache
    type_v: int
    v_trans: bool  # V stored per dimension (flash attention off)

    @property
    def row(self) -> int:
        return self.kv_heads * self.head_dim

    def __post_init__(self):
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in GGML_TYPES:
                raise CelslmError(f"llama.cpp cache {name} {getattr(self, name)} is not f16 or f32; celslm injects only those")


class StateWriter:
    """A sequence's state written into one buffer layer by layer, as layers become ready (every offset
    is known from the layout and the cell count), so that nothing is left to assemble at the end."""

    def __init__(self, layout: CacheLayout, count: int, start: int = 0, seq_id: int = 0):
        self.layout, self.count = layout, count
        kt, vt = GGML_TYPES[layout.type_k], GGML_TYPES[layout.type_v]
        cells = np.empty(count, dtype=_CELL)
        cells["pos"] = np.arange(start, start + count, dtype=np.int32)
        cells["n_seq_id"] = 1
        cells["seq_id"] = seq_id
        head = b"".join([np.array([MAGIC], dtype="<u4").tobytes(), np.array([seq_id], dtype="<i4").tobytes(),
                         np.array([1, count], dtype="<u4").tobytes(), cells.tobytes(),
                         np.array([int(layout.v_trans), layout.layers], dtype="<u4").tobytes()])
        self._k_head = np.array([layout.type_k], dtype="<i4").tobytes() + np.array([layout.row * kt.itemsize], dtype="<u8").tobytes()
        if layout.v_trans:
            self._v_head = np.array([layout.type_v], dtype="<i4").tobytes() + np.array([vt.itemsize, layout.row], dtype="<u4").tobytes()
        else:
            self._v_head = np.array([layout.type_v], dtype="<i4").tobytes() + np.array([layout.row * vt.itemsize], dtype="<u8").tobytes()
        self._k_size, self._v_size = len(self._k_head) + count * layout.row * kt.itemsize, len(self._v_head) + count * layout.row * vt.itemsize
        self._k_at = len(head)
        self._v_at = self._k_at + layout.layers * self._k_size
        self.buffer = np.empty(self._v_at + layout.layers * self._v_size, dtype=np.uint8)
        self.buffer[: len(head)] = np.frombuffer(head, dtype=np.uint8)

    def put(self, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Layer `layer`'s key rows `[T, H*D]` (already in llama.cpp's rotation and order) and its value in
        the cache's layout: rows `[T, H*D]`, or `[H*D, T]` when V is transposed."""
        layout, count = self.layout, self.count
        _check_shape(key, (count, layout.row))
        _check_shape(value, (layout.row, count) if layout.v_trans else (count, layout.row))
        for x, at, head, size, kind in ((key, self._k_at + layer * self._k_size, self._k_head, self._k_size, layout.type_k),
                                        (value, self._v_at + layer * self._v_size, self._v_head, self._v_size, layout.type_v)):
            self.buffer[at : at + len(head)] = np.frombuffer(head, dtype=np.uint8)
            self.buffer[at + len(head) : at + size].view(GGML_TYPES[kind]).reshape(x.shape)[...] = x


def encode(layout: CacheLayout, keys: list[np.ndarray], values: list[np.ndarray], start: int = 0,
           seq_id: int = 0) -> bytes:
    """A sequence's state from per-layer keys (already in llama.cpp's rotation and channel order) and
    values, each `[T, H*D]`, at positions start..start+T-1."""
    if len(keys) != layout.layers or len(values) != layout.layers:
        raise ValueError(f"{len(keys)} key and {len(values)} value layers for a {layout.layers}-layer cache")
    writer = StateWriter(layout, keys[0].shape[0], start, seq_id)
    for layer, (key, value) in enumerate(zip(keys, values)):
        writer.put(layer, key, value.T if layout.v_trans else value)
    return writer.buffer.tobytes()


def _check_shape(x: np.ndarray, shape: tuple[int, int]) -> None:
    if x.shape != shape:
        raise ValueError(f"layer of shape {x.shape}, expected {shape}")


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.at = memoryview(data), 0

    def take(self, dtype, count: int = 1) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = dtype.itemsize * count
        if self.at + size > len(self.data):
            raise IntegrityError(f"llama.cpp state ends at byte {len(self.data)}, {size} more bytes expected at {self.at}")
        out = np.frombuffer(self.data[self.at : self.at + size], dtype=dtype, count=count)
        self.at += size
        return out

    def one(self, dtype) -> int:
        return int(self.take(dtype)[0])


def decode(layout: CacheLayout, data: bytes) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(positions `[T]`, keys, values, each layer `[T, H*D]` float32) from a sequence's state, checked
    field by field against `layout`."""
    cur = _Cursor(data)
    if (magic := cur.one("<u4")) != MAGIC:
        raise IntegrityError(f"llama.cpp state starts with {magic:#x}, not its magic {MAGIC:#x}")
    cur.one("<i4")  # the sequence it was read from
    if (streams := cur.one("<u4")) != 1:
        raise IntegrityError(f"llama.cpp state has {streams} streams; celslm reads single-stream caches")
    count = cur.one("<u4")
    if count == 0:
        raise IntegrityError("llama.cpp state holds no cells")
    cells = cur.take(_CELL, count)
    if (cells["n_seq_id"] != 1).any():
        raise IntegrityError("llama.cpp state has cells shared between sequences")
    v_trans, layers = cur.one("<u4"), cur.one("<u4")
    if layers != layout.layers or bool(v_trans) != layout.v_trans:
        raise IntegrityError(f"llama.cpp state has {layers} layers (v_trans {v_trans}); expected {layout.layers} ({int(layout.v_trans)})")
    keys = [_rows(cur, count, layout, layout.type_k) for _ in range(layers)]
    values = []
    for _ in range(layers):
        if not layout.v_trans:
            values.append(_rows(cur, count, layout, layout.type_v))
            continue
        kind, size, width = cur.one("<i4"), cur.one("<u4"), cur.one("<u4")
        if kind != layout.type_v or size != GGML_TYPES[kind].itemsize or width != layout.row:
            raise IntegrityError(f"llama.cpp state V layer: type {kind}, {size}-byte elements, width {width}; expected "
                                 f"type {layout.type_v}, width {layout.row}")
        values.append(cur.take(GGML_TYPES[kind], width * count).reshape(width, count).T.astype(np.float32))
    if cur.at != len(cur.data):
        raise IntegrityError(f"llama.cpp state has {len(cur.data) - cur.at} bytes after its last layer")
    return cells["pos"].copy(), keys, values


def _rows(cur: _Cursor, count: int, layout: CacheLayout, expected_type: int) -> np.ndarray:
    kind, row_bytes = cur.one("<i4"), cur.one("<u8")
    if kind != expected_type or row_bytes != layout.row * GGML_TYPES[kind].itemsize:
        raise IntegrityError(f"llama.cpp state layer: type {kind}, rows of {row_bytes} bytes; expected type "
                             f"{expected_type}, rows of {layout.row} values")
    return cur.take(GGML_TYPES[kind], layout.row * count).reshape(count, layout.row).astype(np.float32)
