"""The llama.cpp engine: a GGUF file run as it is (quantized weights, f16 KV), through llama-cpp-python.

It implements `engine.Engine` with numpy only (no torch), so an edge decoding an artifact loads
llama.cpp, numpy and a tokenizer, nothing more. Artifacts hold pre-RoPE keys in Hugging Face's
channel order; `place` rotates them as llama.cpp would have (its own float32 angle recurrence, its
convention for the architecture) and casts them to the cache type, and `inject` hands the whole
context to llama.cpp through its public sequence-state API (`llamastate` knows the bytes).

Conventions (`llama_model_rope_type`):
  NEOX (Qwen2 and others): pairs (j, j + n/2), Hugging Face's channel order.
  NORM (Llama): pairs (2j, 2j + 1); converters permute Q and K rows so that llama.cpp's channel 2j + h
  is Hugging Face's channel h * n/2 + j, and the rotation is the same. Keys are permuted on the way in
  and back on the way out.

llama.cpp cannot run a layer before the next one is in, so the prompt waits for the whole context
(`pipelines = False`); fetching, verifying and decoding blocks still overlap with each other and
with loading the model, which starts in a thread as soon as the engine is made.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from celslm import llamaload, llamastate
from celslm.engine import Engine, Sequence, TokenProgress
from celslm.errors import CelslmError, UsageError
from celslm.manifest import Geometry
from celslm.tokenizer import ChatTemplate

ROPE_NORM, ROPE_NEOX = 0, 2
DEFAULT_CONTEXT = 4096  # cells allocated at first; a longer sequence moves to a bigger context
BATCH = 512
CACHE_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # llama.cpp KV cache types (GGML_TYPE_*)


def _describe(lib, path: str, model) -> "_Model":
    """What the engine needs to know about a loaded model, from llama.cpp's API and the GGUF's metadata."""

    def meta(key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        return buf.value.decode() if lib.llama_model_meta_val_str(model, key.encode(), buf, 256) >= 0 else None

    arch = meta("general.architecture") or "?"
    heads, kv_heads = lib.llama_model_n_head(model), lib.llama_model_n_head_kv(model)
    head_dim = int(meta(f"{arch}.attention.key_length") or lib.llama_model_n_embd(model) // heads)
    kind = lib.llama_model_rope_type(model)
    dims = int(meta(f"{arch}.rope.dimension_count") or head_dim)
    scaling = meta(f"{arch}.rope.scaling.type")
    if kind not in (ROPE_NORM, ROPE_NEOX) or scaling not in (None, "none", "linear"):
        raise UsageError(f"{path}: {arch} uses RoPE type {kind} (scaling {scaling}); the llama.cpp engine "
                         "places keys for plain NORM and NEOX RoPE only: use --engine transformers")
    if kind == ROPE_NORM and dims != head_dim:
        raise UsageError(f"{path}: partial NORM RoPE ({dims} of {head_dim} dimensions) is not supported")
    rope = Rope(kind, dims, float(meta(f"{arch}.rope.freq_base") or 10000.0),
                float(lib.llama_model_rope_freq_scale_train(model)))
    vocab = lib.llama_model_get_vocab(model)
    return _Model(model, arch, Geometry(lib.llama_model_n_layer(model), kv_heads, head_dim), rope,
                  lib.llama_vocab_n_tokens(vocab), lib.llama_model_n_ctx_train(model), vocab)


@dataclass(frozen=True)
class Rope:
    """How llama.cpp rotates keys for one model."""

    kind: int  # ROPE_NORM or ROPE_NEOX
    dims: int  # rotated dimensions per head (from the start)
    base: float
    freq_scale: float

    def tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin `[T, dims/2]` for positions 0..T-1, computed as ggml's CPU rope does
        (ggml_rope_cache_init): theta = p, then theta *= base^(-2/dims) per pair, in float32."""
        theta = np.arange(length, dtype=np.float32)
        scale = np.float32(self.base) ** (np.float32(-2.0) / np.float32(self.dims))
        cos = np.empty((length, self.dims // 2), dtype=np.float32)
        sin = np.empty_like(cos)
        for j in range(self.dims // 2):
            angle = np.float32(self.freq_scale) * theta
            cos[:, j], sin[:, j] = np.cos(angle), np.sin(angle)
            theta = theta * scale
        return cos, sin


def _closed():
    from concurrent.futures import Future

    future = Future()
    future.set_exception(CelslmError("this llama.cpp engine was closed"))
    return future


_CONVENTIONS = {"qwen2": ROPE_NEOX, "llama": ROPE_NORM}  # model_type -> llama.cpp's RoPE for that architecture


def rope_from_config(config: dict) -> Rope | None:
    """The RoPE a Hugging Face config.json describes, as llama.cpp would apply it; None where unsure."""
    parameters = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta"), "rope_type": "default"}
    kind = _CONVENTIONS.get(config.get("model_type"))
    if kind is None or parameters.get("rope_type", "default") != "default" or not parameters.get("rope_theta") \
            or config.get("rope_scaling") or config.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return Rope(kind, int(head_dim), float(parameters["rope_theta"]), 1.0)


@functools.lru_cache(maxsize=4)
def _tables(rope: Rope, length: int) -> tuple[np.ndarray, np.ndarray]:
    """`rope.tables(length)`, computed once per context (every layer shares them)."""
    return rope.tables(length)


def rotate(key: np.ndarray, rope: Rope, tables, inverse: bool = False, dtype=np.float64) -> np.ndarray:
    """Keys `[H, T, D]` in Hugging Face's channel order, rotated (or un-rotated) at positions 0..T-1,
    computed in `dtype` (float32 is as exact as the f16 cache needs, and twice as fast)."""
    cos, sin = tables
    half = rope.dims // 2
    x = key.astype(dtype, copy=False)
    x0, x1 = x[..., :half], x[..., half : rope.dims]
    c, s = cos.astype(dtype, copy=False)[None], sin.astype(dtype, copy=False)[None]
    if inverse:
        s = -s
    out = np.empty_like(x)
    out[..., :half] = x0 * c - x1 * s
    out[..., half : rope.dims] = x0 * s + x1 * c
    out[..., rope.dims :] = x[..., rope.dims :]
    return out.astype(np.float32, copy=False)


def to_llama_order(key: np.ndarray, rope: Rope) -> np.ndarray:
    """`[H, T, D]` in Hugging Face's order -> llama.cpp's for this convention (same shape)."""
    if rope.kind == ROPE_NEOX:
        return key
    heads, tokens, dim = key.shape
    return key.reshape(heads, tokens, 2, dim // 2).swapaxes(2, 3).reshape(heads, tokens, dim)


def from_llama_order(key: np.ndarray, rope: Rope) -> np.ndarray:
    if rope.kind == ROPE_NEOX:
        return key
    heads, tokens, dim = key.shape
    return key.reshape(heads, tokens, dim // 2, 2).swapaxes(2, 3).reshape(heads, tokens, dim)


def to_half(x: np.ndarray, native: bool = True) -> np.ndarray:
    """`x` float32 as float16, rounded to nearest even: through llama.cpp's converter where it has one
    (`llamaload.half_converter`), else numpy's cast, which gives the same bits (tested)."""
    convert = llamaload.half_converter() if native else None
    if convert is None or x.dtype != np.float32 or not x.flags.c_contiguous:
        with np.errstate(over="ignore"):  # past 65504 is inf, as llama.cpp's converter gives it, silently
            return x.astype(np.float16)
    out = np.empty(x.shape, dtype=np.float16)
    convert(x.ctypes.data, out.ctypes.data, x.size)
    return out


def key_rows(key: np.ndarray, rope: Rope, native: bool = True) -> np.ndarray:
    """Pre-RoPE keys `[H, T, D]` float32 (any strides) -> llama.cpp's rows `[T, H*D]` f16: rotated at
    positions 0..T-1 in float32 and in llama.cpp's channel order, each value computed as `rotate` does
    (the same operations in the same order), then rounded to f16 once (`to_half`)."""
    heads, tokens, dim = key.shape
    cos, sin = _tables(rope, tokens)
    c, s = cos[:, None, :], sin[:, None, :]
    half = rope.dims // 2
    x = key.transpose(1, 0, 2)  # [T, H, D]: a view when the key came token-major
    x0, x1 = x[..., :half], x[..., half : rope.dims]
    rows = np.empty((tokens, heads, dim), dtype=np.float32)
    if rope.kind == ROPE_NEOX:
        low, high = rows[..., :half], rows[..., half : rope.dims]
        rows[..., rope.dims :] = x[..., rope.dims :]
    else:  # NORM rotates all dimensions (checked in _describe), pairs interleaved: llama.cpp's channel 2j + h
        pairs = rows.reshape(tokens, heads, half, 2)
        low, high = pairs[..., 0], pairs[..., 1]
    a, b = np.empty(x0.shape, dtype=np.float32), np.empty(x0.shape, dtype=np.float32)
    np.subtract(np.multiply(x0, c, out=a), np.multiply(x1, s, out=b), out=low)
    np.add(np.multiply(x0, s, out=a), np.multiply(x1, c, out=b), out=high)
    return to_half(rows.reshape(tokens, heads * dim), native)


class LlamaSequence(Sequence):
    def __init__(self, engine: "LlamaEngine"):
        self.engine = engine
        self._length = 0
        self.pending: llamastate.StateWriter | None = None  # the state being written, layer by layer (inject)
        self.injected = 0  # layers injected so far

    @property
    def length(self) -> int:
        return self._length


class LlamaEngine(Engine):
    """One GGUF model and one llama.cpp context holding one sequence at a time.

    An artifact's layers decode on all the engine's threads (`decode_threads`): llama.cpp computes
    nothing until the last layer is in (`pipelines = False`), so they take turns with its own threads
    on the same cores, never both at once."""

    name = "llama.cpp"
    pipelines = False

    def __init__(self, path: str, threads: int | None = None, context: int = DEFAULT_CONTEXT,
                 rope_hint: Rope | None = None, cache_type: str = "f16", positions_hint: int | None = None):
        """`rope_hint`: the RoPE the model folder's config describes, so that keys are rotated while the
        model is still loading; checked against llama.cpp's own once it is in (a mismatch is redone).
        `cache_type`: llama.cpp's KV cache type (f16; q8_0 or q4_0 as `--cache-type-k/v` give them, with
        flash attention, for bench compress: such a cache cannot take an injected state)."""
        if cache_type not in CACHE_TYPES:
            raise UsageError(f"unknown llama.cpp cache type {cache_type!r}; choose one of {', '.join(CACHE_TYPES)}")
        self.cache_type = cache_type
        self.path = path
        self.rope_hint = rope_hint
        self.positions_hint = positions_hint  # max_positions while the model loads (checks that must not wait)
        self.threads = threads or int(os.environ.get("CELSLM_THREADS", 0)) or os.cpu_count() or 1
        self.decode_threads = self.threads
        self._want = context
        self._lib = llamaload.library()
        self._loaded = llamaload.load(path)  # a future of the raw handle; `model` describes it once
        self._loaded.add_done_callback(lambda _: setattr(self, "loaded_at", time.perf_counter()))
        self._described: _Model | None = None
        self._describing = threading.Lock()
        self._lock = threading.Lock()  # one forward pass at a time on the context
        self._ctx = None
        self._active: LlamaSequence | None = None
        threading.Thread(target=self._first_context, name="celslm-llama-context", daemon=True).start()

    def after_load(self, callback) -> bool:
        if self._loaded.done():
            return False
        self._loaded.add_done_callback(lambda _: callback())
        return True

    def reserve(self, tokens: int) -> None:
        """The first context is made big enough for `tokens` (and a prompt): made once, not twice."""
        self._want = max(self._want, tokens)

    def _first_context(self) -> None:
        """Make the context as soon as the model is in, while the artifact is still being decoded."""
        try:
            self.model
            with self._lock:
                self._context(self._want)
        except BaseException:
            pass  # the same error comes back, with its message, where the engine is used

    # -- loading (in a thread: ctypes releases the GIL, so artifact work goes on meanwhile)

    @property
    def model(self) -> "_Model":
        if self._described is None:
            handle = self._loaded.result()
            with self._describing:
                if self._described is None:
                    self._described = _describe(self._lib, self.path, handle)
        return self._described

    @property
    def geometry(self) -> Geometry:
        return self.model.geometry

    @property
    def vocab_size(self) -> int:
        return self.model.vocab

    @property
    def max_positions(self) -> int:
        if self.positions_hint and not self._loaded.done():  # the folder's config, converted from this GGUF
            return self.positions_hint
        return self.model.n_ctx_train

    @property
    def layout(self) -> llamastate.CacheLayout:
        g = self.geometry
        return llamastate.CacheLayout(g.layers, g.kv_heads, g.head_dim, type_k=1, type_v=1, v_trans=True)  # f16 without flash attention (`_context`)

    # -- the context: made on first use, moved to a bigger one when a sequence outgrows it

    def _context(self, needed: int):
        lib, m = self._lib, self.model
        if needed > m.n_ctx_train:
            raise UsageError(f"{needed} positions are more than {os.path.basename(self.path)} was trained for ({m.n_ctx_train})")
        if self._ctx is not None and lib.llama_n_ctx(self._ctx) >= needed:
            return self._ctx
        cells = min(m.n_ctx_train, max(self._want, -(-needed * 5 // 4 // 256) * 256))
        saved = self._state() if self._ctx is not None and self._active and self._active.length else None
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = cells, BATCH, BATCH, 1
        params.n_threads = params.n_threads_batch = self.threads
        if self.cache_type == "f16":
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # V transposed: the layout `llamastate` writes
        else:  # llama.cpp quantizes V only under flash attention
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.type_k = params.type_v = CACHE_TYPES[self.cache_type]
        params.no_perf = True
        ctx = lib.llama_init_from_model(m.handle, params)
        if not ctx:
            raise CelslmError(f"llama.cpp cannot make a {cells}-cell context{llamaload.last_error()}")
        if self._ctx is not None:
            lib.llama_free(self._ctx)
        self._ctx = ctx
        if saved is not None:
            self._restore(saved)
        return ctx

    def state_bytes(self) -> int:
        """The current sequence's state as llama.cpp saves it (its KV cache at the cache type, and cell metadata)."""
        with self._lock:
            return int(self._lib.llama_state_seq_get_size(self._ctx, 0)) if self._ctx is not None else 0

    def _state(self) -> bytes:
        lib = self._lib
        size = lib.llama_state_seq_get_size(self._ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = lib.llama_state_seq_get_data(self._ctx, buf, size, 0)
        return bytes(memoryview(buf)[:written])

    def _restore(self, data) -> None:
        """Put a sequence state (bytes, or a numpy uint8 buffer) into llama.cpp; read, never copied."""
        if self._lib.llama_state_seq_set_data(self._ctx, llamaload.byte_pointer(data), len(data), 0) == 0:
            raise CelslmError(f"llama.cpp refused the context's KV state{llamaload.last_error()}")

    def _own(self, seq: LlamaSequence) -> None:
        if seq is not self._active:
            raise CelslmError("this llama.cpp sequence was replaced by a newer one on the same engine")

    # -- Engine

    def sequence(self) -> LlamaSequence:
        with self._lock:
            seq = LlamaSequence(self)
            if self._ctx is not None:
                self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)
            self._active = seq
            return seq

    def prefill(self, seq: LlamaSequence, token_ids: list[int], step: int = 256,
                progress: TokenProgress | None = None) -> None:
        self._run(seq, token_ids, 0, progress)

    def evaluate(self, seq: LlamaSequence, token_ids: list[int], logits_to_keep: int = 1) -> np.ndarray:
        return self._run(seq, token_ids, logits_to_keep, None)

    def _run(self, seq: LlamaSequence, token_ids: list[int], keep: int, progress: TokenProgress | None) -> np.ndarray:
        lib = self._lib
        vocab = self.vocab_size
        with self._lock:
            self._own(seq)
            ctx = self._context(seq.length + len(token_ids))
            out = np.empty((min(keep, len(token_ids)), vocab), dtype=np.float32)
            first_kept = len(token_ids) - len(out)
            batch = lib.llama_batch_init(BATCH, 0, 1)
            try:
                for begin in range(0, len(token_ids), BATCH):
                    chunk = token_ids[begin : begin + BATCH]
                    batch.n_tokens = len(chunk)
                    for i, token in enumerate(chunk):
                        batch.token[i], batch.pos[i] = token, seq.length + i
                        batch.n_seq_id[i], batch.seq_id[i][0] = 1, 0
                        batch.logits[i] = begin + i >= first_kept
                    batch.logits[len(chunk) - 1] = True  # llama.cpp wants at least one output per batch
                    if lib.llama_decode(ctx, batch) != 0:
                        raise CelslmError(f"llama.cpp could not evaluate {len(chunk)} tokens at position {seq.length}{llamaload.last_error()}")
                    for i in range(max(0, first_kept - begin), len(chunk)):
                        row = lib.llama_get_logits_ith(ctx, i)
                        out[begin + i - first_kept] = np.ctypeslib.as_array(row, shape=(vocab,))
                    seq._length += len(chunk)
                    if progress:
                        progress(begin + len(chunk), len(token_ids))
            finally:
                lib.llama_batch_free(batch)
            return out

    def place(self, key, value) -> tuple:
        """Pre-RoPE key and value `[H, T, D]` -> f16 in llama.cpp's state layout (`llamastate.StateWriter.put`),
        keys rotated, and the RoPE they were rotated with.

        Rotating needs the model's RoPE: while the model is still loading, the folder's (`rope_hint`)
        is used, or, without one, the key is kept as it is and rotated in `inject`; decoding blocks
        never waits for the load. Each output is written once, straight from the input's layout (a
        decoded layer comes token-major for keys and channel-major for values: no transposing copy)."""
        key, value = np.asarray(key, dtype=np.float32), np.asarray(value, dtype=np.float32)
        rope = self.model.rope if self._loaded.done() else self.rope_hint
        return (key_rows(key, rope) if rope else key), self._columns(value), rope

    @staticmethod
    def _columns(x: np.ndarray) -> np.ndarray:
        """`[H, T, D]` -> `[H*D, T]` f16: llama.cpp's transposed V (no copy before the cast when the value
        came channel-major)."""
        heads, tokens, dim = x.shape
        return to_half(np.ascontiguousarray(x.transpose(0, 2, 1).reshape(heads * dim, tokens)))

    def inject(self, seq: LlamaSequence, layer: int, placed) -> None:
        """Each layer is written into the sequence's state as it comes; after the last one, the whole
        context goes into llama.cpp at once."""
        if self.cache_type != "f16":
            raise CelslmError(f"a {self.cache_type} llama.cpp cache cannot take an injected KV state")
        self._own(seq)
        if layer == 0:
            seq.pending, seq.injected = None, 0
        if layer != getattr(seq, "injected", -1) or seq.length:
            raise CelslmError(f"layer {layer} injected out of order, or into a sequence that is not empty")
        seq.injected += 1
        seq.pending = self._write(seq.pending, layer, placed)
        writer = seq.pending
        if seq.injected < self.geometry.layers or writer is None:
            return
        seq.pending = None
        with self._lock:
            self._own(seq)  # again: a newer sequence may have taken the context meanwhile
            self._context(writer.count)
            self._restore(writer.buffer)
            seq._length = writer.count

    def state_of(self, layers) -> np.ndarray:
        """A context's sequence state from its placed layers (`layers(l)`, in order): the bytes `snapshot`
        would give once they were injected (a uint8 buffer, not copied into `bytes`: 25 MB at 2K tokens),
        made without llama.cpp's context (what the warm service keeps)."""
        writer = None
        for layer in range(self.geometry.layers):
            writer = self._write(writer, layer, layers(layer))
        if writer is None:
            raise CelslmError("an empty context has no state")
        return writer.buffer

    def _write(self, writer: llamastate.StateWriter | None, layer: int, placed) -> llamastate.StateWriter | None:
        """Layer `layer` written into `writer` (made at layer 0: None for an empty context), its keys rotated
        again if they were placed before the model loaded, by no RoPE hint or a wrong one."""
        key, value, rope = placed
        if layer == 0:
            count = value.shape[1]  # the transposed V: [H*D, T]
            writer = llamastate.StateWriter(self.layout, count) if count else None
        if rope != self.model.rope:
            heads, dim = self.geometry.kv_heads, self.geometry.head_dim
            if rope is not None:
                rows = key.astype(np.float32).reshape(-1, heads, dim).transpose(1, 0, 2)
                key = rotate(from_llama_order(rows, rope), rope, rope.tables(rows.shape[1]), inverse=True)
            key = key_rows(key, self.model.rope)
        if writer is not None:
            writer.put(layer, key, value)
        return writer

    def crop(self, seq: LlamaSequence, length: int) -> None:
        with self._lock:
            self._own(seq)
            if length < seq.length:
                self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self._ctx), 0, length, -1)
                seq._length = length

    def context_layers(self, seq: LlamaSequence, start: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """The sequence's KV read back from llama.cpp: keys un-rotated into Hugging Face's order."""
        with self._lock:
            self._own(seq)
            data = self._state()
        return self.layers_of_state(data, start)

    def layers_of_state(self, data, start: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
        """A sequence state's KV (`snapshot`'s bytes, or `state_of`'s buffer) as pre-RoPE layers `[H, T, D]`,
        its positions from `start` on."""
        positions, keys, values = llamastate.decode(self.layout, data)
        if not np.array_equal(positions, np.arange(len(positions))):
            raise CelslmError("llama.cpp's cache holds positions other than 0..T-1")
        rope, g, count = self.model.rope, self.geometry, len(positions) - start
        tables = tuple(t[start:] for t in rope.tables(len(positions)))
        heads = lambda rows: np.ascontiguousarray(rows[start:].reshape(count, g.kv_heads, g.head_dim).transpose(1, 0, 2))
        return [(rotate(from_llama_order(heads(k), rope), rope, tables, inverse=True), heads(v)) for k, v in zip(keys, values)]

    def snapshot(self, seq: LlamaSequence) -> bytes:
        """The sequence's KV as llama.cpp state bytes (kept by the warm service, restored in milliseconds)."""
        with self._lock:
            self._own(seq)
            return self._state()

    def restore(self, data: bytes, length: int) -> LlamaSequence:
        """A new sequence holding a snapshot of `length` positions."""
        seq = self.sequence()
        with self._lock:
            self._context(length)
            self._restore(data)
            seq._length = length
        return seq

    def close(self) -> None:
        """Free the context and the model (what a long-lived process that loads many models calls)."""
        with self._lock:
            self._active = None
            if self._ctx is not None:
                self._lib.llama_free(self._ctx)
                self._ctx = None
            if self._described is not None:
                self._lib.llama_model_free(self._described.handle)
                self._described = None
                self._loaded = _closed()


@dataclass(frozen=True)
class _Model:
    handle: object
    arch: str
    geometry: Geometry
    rope: Rope
    vocab: int
    n_ctx_train: int
    vocab_handle: object


class LlamaTokenizer:
    """Text <-> ids with the GGUF's own vocabulary, which llama.cpp loads with the weights (in the load
    thread, so tokenizing costs no load time of its own), plus the model folder's chat template.

    It offers the part of the transformers tokenizer interface celslm uses; tests check it gives
    transformers' ids, chat frame and text (for qwen2.5-coder-0.5b: 240 standard-library files, no
    difference). Special-token text in the input is read as those tokens, as transformers does."""

    def __init__(self, engine: LlamaEngine, template: ChatTemplate):
        self.engine = engine
        self._template = template
        self.chat_template = template.source

    @functools.cached_property
    def eos_token_id(self) -> int | None:
        """The end-of-sequence token the folder's tokenizer config names (read when first needed: the
        vocabulary comes with the model, which is still loading when this tokenizer is made)."""
        text = self._template.special.get("eos_token")
        ids = self(text, add_special_tokens=False)["input_ids"] if text else []
        return ids[0] if len(ids) == 1 else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        lib, vocab = self.engine._lib, self.engine.model.vocab_handle
        data = text.encode()
        size = len(data) + 16
        while True:
            buf = (lib.llama_token * size)()
            count = lib.llama_tokenize(vocab, data, len(data), buf, size, add_special_tokens, True)
            if count >= 0:
                return {"input_ids": list(buf[:count])}
            size = -count

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self(text, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        lib, vocab = self.engine._lib, self.engine.model.vocab_handle
        buf = ctypes.create_string_buffer(256)
        pieces = []
        for token in ids:
            count = lib.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            if count < 0:
                buf = ctypes.create_string_buffer(-count)
                count = lib.llama_token_to_piece(vocab, int(token), buf, len(buf), 0, not skip_special_tokens)
            pieces.append(buf.raw[:count])
        return b"".join(pieces).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = False) -> str:
        if tokenize:
            raise ValueError("only text is rendered here")
        return self._template.render(messages, add_generation_prompt)
