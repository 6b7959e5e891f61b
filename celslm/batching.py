"""Continuous batching on llama.cpp, for `celslm serve`: many requests decode in one llama.cpp context,
one `llama_decode` per step, over public contexts held once.

Memory. The context has a unified KV cache (`kv_unified`): a cell may belong to several sequences. A
public context is loaded once, as llama.cpp state bytes, into a sequence id of its own; a request's
sequence starts as `llama_memory_seq_cp` of it, which only adds the request's id to the context's
cells. N requests over one context cost one context's cells plus their own prompts and answers, and a
request's own cells are removed when it ends, however it ends.

Tenants. Only context cells are shared: a request never starts from another request's cells, so its
time to first token says nothing of what another tenant asked (the prompt-cache timing channel).
`KVPool.cell_owners` reads llama.cpp's own cell metadata, so a test can check exactly that.

Steps. Each step is one batch: one token for every request that is generating, then up to
`prompt_chunk` tokens of prompts still being read, shared out request by request. A long prompt is
read over several steps, so it delays the others' next tokens by at most one chunk's compute.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from celslm import llamaload
from celslm.errors import CelslmError, UsageError
from celslm.llamacpp import LlamaEngine

LLAMA_MAX_SEQ = 256  # llama.cpp's limit on sequence ids in one context
DEFAULT_CELLS = 8192  # a 2K context in use and 4 requests of up to 1.5K tokens each, with room for a second context


@dataclass(frozen=True)
class Row:
    """One token of a batch: which sequence, at which position, and whether its logits are read."""

    token: int
    position: int
    seq: int
    logits: bool


class KVPool:
    """One llama.cpp context of `cells` KV cells shared by `requests` request sequences (ids
    0..requests-1) and `contexts` resident contexts (ids requests..requests+contexts-1)."""

    def __init__(self, engine: LlamaEngine, requests: int, contexts: int, cells: int, batch: int):
        if requests + contexts > LLAMA_MAX_SEQ:
            raise UsageError(f"{requests} requests and {contexts} contexts need more than llama.cpp's {LLAMA_MAX_SEQ} sequences")
        model = engine.model
        cells = min(cells, model.n_ctx_train * (requests + 1))  # more than every sequence could ever hold is waste
        self.engine, self.requests, self.contexts, self.cells, self.batch = engine, requests, contexts, cells, batch
        lib = self._lib = engine._lib
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = cells, batch, batch
        params.n_seq_max = requests + contexts
        params.kv_unified = True  # one pool of cells; seq_cp shares them instead of copying
        params.n_threads = params.n_threads_batch = engine.threads
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # V transposed: the layout `llamastate` writes
        params.type_k = params.type_v = 1  # f16, as contexts' state bytes hold it
        params.no_perf = True
        self._ctx = lib.llama_init_from_model(model.handle, params)
        if not self._ctx:
            raise CelslmError(f"llama.cpp cannot make a {cells}-cell context for {requests + contexts} sequences"
                              f"{llamaload.last_error()}")
        self._memory = lib.llama_get_memory(self._ctx)
        self._batch = lib.llama_batch_init(batch, 0, 1)
        self.vocab = model.vocab

    def context_seq(self, slot: int) -> int:
        return self.requests + slot

    def load(self, seq: int, state) -> bool:
        """Put a context's state bytes (bytes or a numpy uint8 buffer) into sequence `seq`; False when no run
        of free cells is long enough."""
        self.drop(seq)
        if self._lib.llama_state_seq_set_data(self._ctx, llamaload.byte_pointer(state), len(state), seq) == 0:
            self.drop(seq)
            return False
        return True

    def share(self, source: int, target: int) -> None:
        """`target` starts as `source`'s cells (metadata only: the cells are not copied)."""
        self.drop(target)
        self._lib.llama_memory_seq_cp(self._memory, source, target, -1, -1)

    def drop(self, seq: int) -> None:
        """Remove `seq` from every cell; cells no other sequence holds become free."""
        self._lib.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def length(self, seq: int) -> int:
        """Positions 0..length-1 held by `seq` (0 for an empty one)."""
        return int(self._lib.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def decode(self, rows: list[Row]) -> np.ndarray:
        """Run one batch; the logits `[R, V]` of the rows that asked for them, in order."""
        if not 0 < len(rows) <= self.batch:
            raise CelslmError(f"a batch of {len(rows)} tokens (at most {self.batch})")
        lib, batch = self._lib, self._batch
        batch.n_tokens = len(rows)
        for i, row in enumerate(rows):
            batch.token[i], batch.pos[i], batch.logits[i] = row.token, row.position, row.logits
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, row.seq
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise CelslmError(f"llama.cpp could not run a batch of {len(rows)} tokens (status {status})"
                              f"{llamaload.last_error()}")
        wanted = [i for i, row in enumerate(rows) if row.logits]
        out = np.empty((len(wanted), self.vocab), dtype=np.float32)
        for k, i in enumerate(wanted):
            out[k] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, i), shape=(self.vocab,))
        return out

    def cell_owners(self) -> list[tuple[int, tuple[int, ...]]]:
        """Every used cell as (position, the sequence ids holding it), read from llama.cpp's own state
        of all sequences (`llama_state_seq_get_data` for seq -1: magic, seq, streams, cell count, then
        per cell i32 pos, u32 n_seq_id, n_seq_id x i32)."""
        lib = self._lib
        size = lib.llama_state_seq_get_size(self._ctx, -1)
        buf = (ctypes.c_uint8 * size)()
        data = memoryview(buf)[: lib.llama_state_seq_get_data(self._ctx, buf, size, -1)]
        count = int(np.frombuffer(data[12:16], "<u4")[0])
        at, owners = 16, []
        for _ in range(count):
            pos, n_seq = np.frombuffer(data[at : at + 8], "<i4")
            seqs = tuple(int(s) for s in np.frombuffer(data[at + 8 : at + 8 + 4 * n_seq], "<i4"))
            owners.append((int(pos), seqs))
            at += 8 + 4 * n_seq
        return owners

    def kv_bytes(self) -> int:
        """The KV cache's size as llama.cpp allocated it (every cell, f16 keys and values)."""
        g = self.engine.geometry
        return self.cells * g.layers * g.kv_heads * g.head_dim * 2 * 2

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None
