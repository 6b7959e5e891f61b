"""A model's calibrated KV transform: the codebook that the `tc` codec stage codes blocks with.

Per layer and per kind (pre-RoPE keys, values), over the F = kv_heads x head_dim channels of a token
(across heads: a layer's heads share structure that a per-head basis cannot use):

    mean [F]           the calibration text's mean
    analysis [F, F]    column c reads component c off a token's channels (stored float16)
    basis [F, F]       column c puts component c back into channels (stored float16)
    std [F]            each component's spread on the calibration text, descending
    unit               the step at q=1, from the layer's measured sensitivity (`calibrate.py`)

The components are principal directions in the metric attention reads the cache with (query energy
for keys, the output projection for values: `calibrate.py`), so analysis and basis differ by it.

At quality q a component is coded with step q*unit; a component whose spread is under DROP steps gets
no bits at all and reconstructs as the mean. That is reverse water-filling within a layer; the
measured units spread the error across layers (KVTC, ICLR 2026, allocates bits the same way).

The codes are entropy-coded with ANS (`constriction`) under static models the codebook carries:
components are grouped by their spread in steps (r = std / step), 4 classes per octave, and each class
is a discretized Gaussian of its spread, with an escape for the rare code past its alphabet. The
tables are stored, not recomputed, so the cloud and every edge code with bit-identical models, and a
class is found by comparing r with stored edges (no transcendental function whose last bit could
differ between machines).

Or (`ent=pco`) with pcodec: components are grouped by octave of spread (exact, from the float's exponent),
and each group's codes in a block are one pcodec chunk, which fits its own bins. About 6% larger than ANS
under the static models; its own decoding is about 6x faster, a whole decode about 2.5x (`bench compress`).

A codebook is a content-addressed blob (the sha256 of its bytes), made once per model: every
manifest that uses it names its digest, and it travels and is verified like any other blob. This
module imports no torch: an edge decodes with numpy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
from pcodec import ChunkConfig, DeltaSpec, standalone
from safetensors.numpy import save as st_save

from celslm.errors import IntegrityError, UsageError
from celslm.tensors import read_safetensors

MEDIA_CODEBOOK = "application/vnd.celslm.kv.codebook.v1+safetensors"
FORMAT = "celslm.codebook/1"
DROP = 0.25  # components spread under this many steps are not coded
KINDS = ("key", "value")
_CODE_TYPES = (np.int8, np.int16, np.int32)
META = "celslm.codebook"  # the tensor holding the description (canonical JSON bytes)
CLASSES_PER_OCTAVE = 4
CLASS_LOG2 = (-2, 7)  # classes span r = 2^-2 (DROP) .. 2^7 steps
MAX_CODE = 127  # the widest alphabet: codes -127..127, and the escape
PCO_LEVEL = 8  # pcodec's compression level (its default)


@dataclass(frozen=True, eq=False)
class Transform:
    """One layer's transform for one kind of tensor."""

    mean: np.ndarray  # [F] float32
    basis: np.ndarray  # [F, F] float32 (float16 values): column c rebuilds component c in channels
    std: np.ndarray  # [F] float32, descending
    analysis: np.ndarray  # [F, F] float32 (float16 values): column c reads component c off the channels
    unit: float  # step at q=1
    _cache: dict = field(default_factory=dict, repr=False)  # the matrices at each q used

    def step(self, q: float) -> float:
        return float(q) * self.unit

    def kept(self, q: float) -> int:
        """How many leading components are coded at quality q."""
        if ("kept", q) not in self._cache:  # asked per block: counted once
            self._cache["kept", q] = int(np.count_nonzero(self.std >= DROP * self.step(q)))
        return self._cache["kept", q]

    def spreads(self, q: float) -> np.ndarray:
        """Each coded component's spread in steps (float32: the entropy classes compare it with stored edges)."""
        return self.std[: self.kept(q)] / np.float32(self.step(q))

    def encode(self, x: np.ndarray, q: float) -> np.ndarray:
        """Integer codes `[n, t]`, component-major, of `x` `[H, t, D]`: int8, or wider where a code needs it."""
        heads, _, width = x.shape
        forward, offset, _ = self._matrices(q)
        x = np.asarray(x, dtype=np.float32)
        codes = forward[:, :width] @ x[0].T  # [n, t], in steps; x[head].T is a BLAS flag, not a transposing copy
        for head in range(1, heads):
            codes += forward[:, head * width : (head + 1) * width] @ x[head].T
        codes -= offset[:, None]
        np.rint(codes, out=codes)
        peak = max(float(codes.max(initial=0.0)), -float(codes.min(initial=0.0)))
        dtype = next((t for t in _CODE_TYPES if peak <= np.iinfo(t).max), np.int32)
        if peak > np.iinfo(dtype).max:
            np.clip(codes, -np.iinfo(dtype).max, np.iinfo(dtype).max, out=codes)
        return codes.astype(dtype)

    def decode(self, codes: np.ndarray, q: float, heads: int, width: int) -> np.ndarray:
        """`[H, t, D]` float32 from `encode`'s codes `[n, t]` (n is checked by the caller)."""
        kept, tokens = codes.shape
        coeffs = np.empty((kept + 1, tokens), dtype=np.float32)
        coeffs[:kept] = codes
        coeffs[kept] = 1.0
        out = np.empty((tokens, heads * width), dtype=np.float32)
        self.decode_rows(coeffs, q, out)
        return np.ascontiguousarray(out.reshape(tokens, heads, width).transpose(1, 0, 2))

    def decode_rows(self, coeffs: np.ndarray, q: float, out: np.ndarray) -> None:
        """Channels token by token, `out` `[T, F]`, from coefficients `[n + 1, T]` float32 (codes in steps,
        then a row of ones that carries the mean): one matmul, the transposes are BLAS flags."""
        np.matmul(coeffs.T, self._matrices(q)[2].T, out=out)

    def decode_columns(self, coeffs: np.ndarray, q: float, out: np.ndarray) -> None:
        """The same channels channel by channel, `out` `[F, T]`."""
        np.matmul(self._matrices(q)[2], coeffs, out=out)

    def _matrices(self, q: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """At quality q: the forward map into steps `[n, F]`, its offset `[n]` (the mean, in steps) and
        the inverse `[F, n + 1]` (steps back to channels, the mean as its last column)."""
        q = float(q)
        if q not in self._cache:
            kept, step = self.kept(q), self.step(q)
            forward = np.ascontiguousarray(self.analysis[:, :kept].T / np.float32(step), dtype=np.float32)
            inverse = np.ascontiguousarray(np.concatenate([self.basis[:, :kept] * np.float32(step), self.mean[:, None]],
                                                          axis=1), dtype=np.float32)
            self._cache[q] = (forward, forward @ self.mean, inverse)
        return self._cache[q]


@dataclass(frozen=True, eq=False)
class EntropyModel:
    """Static ANS models for `tc` codes, by class of spread (see the module docstring)."""

    edges: np.ndarray  # [C-1] float32: class c holds spreads r with edges[c-1] <= r < edges[c]
    sizes: np.ndarray  # [C] int32: class c codes -R..R (R = sizes[c]) and an escape
    tables: np.ndarray  # [C, 2*MAX_CODE+2] float32: probabilities of -R..R, then the escape, then 0s
    _cache: dict = field(default_factory=dict, repr=False)  # ANS models by class, row groups by layout

    @classmethod
    def gaussian(cls) -> EntropyModel:
        low, high = CLASS_LOG2
        centers = [2.0 ** (k / CLASSES_PER_OCTAVE) for k in range(low * CLASSES_PER_OCTAVE, high * CLASSES_PER_OCTAVE + 1)]
        edges = np.array([math.sqrt(a * b) for a, b in zip(centers, centers[1:])], dtype=np.float32)
        sizes, tables = [], np.zeros((len(centers), 2 * MAX_CODE + 2), dtype=np.float32)
        for c, spread in enumerate(centers):
            size = int(min(MAX_CODE, max(2, math.ceil(6 * spread))))
            cdf = [0.5 * (1 + math.erf((v + 0.5) / (spread * math.sqrt(2)))) for v in range(-size - 1, size + 1)]
            probs = [max(b - a, 1e-7) for a, b in zip(cdf, cdf[1:])]
            escape = max(2 * (1 - cdf[-1]), 1e-6)
            tables[c, : 2 * size + 2] = probs + [escape]
            sizes.append(size)
        return cls(edges, np.array(sizes, dtype=np.int32), tables)

    def classes(self, spreads: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges, spreads.astype(np.float32), side="right")

    def model(self, c: int):
        if c not in self._cache:
            from constriction import stream  # only where blocks are entropy-coded

            self._cache[c] = stream.model.Categorical(self.tables[c, : 2 * int(self.sizes[c]) + 2].astype(np.float64), perfect=False)
        return self._cache[c]

    def encode(self, codes: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ANS words (uint32) and escaped codes (int32) for `codes` `[n, t]` whose rows are in `classes` `[n]`."""
        from constriction import stream

        coder = stream.stack.AnsCoder()
        escapes = []
        groups = self._groups(classes)
        for c, rows in reversed(groups):  # a stack: the class encoded last is decoded first
            size = int(self.sizes[c])
            flat = codes[rows].reshape(-1).astype(np.int32)
            escaped = np.abs(flat) > size
            escapes.append(flat[escaped])
            flat += size
            flat[escaped] = 2 * size + 1
            coder.encode_reverse(flat, self.model(c))
        escapes = np.concatenate(escapes[::-1]) if escapes else np.zeros(0, np.int32)
        return coder.get_compressed().astype(np.uint32), escapes.astype(np.int32)

    def decode(self, words: np.ndarray, escapes: np.ndarray, classes: np.ndarray, tokens: int) -> np.ndarray:
        """The codes `[n, tokens]` (int32) from `encode`'s words and escapes."""
        from constriction import stream

        out = np.empty((len(classes), tokens), dtype=np.int32)
        coder = stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        used = 0
        for c, rows in self._groups(classes):
            size = int(self.sizes[c])
            flat = coder.decode(self.model(c), len(rows) * tokens).astype(np.int32)
            flat -= size
            escaped = np.flatnonzero(flat == size + 1)
            if len(escaped):
                if used + len(escaped) > len(escapes):
                    raise ValueError("more escaped codes than the block holds")
                flat[escaped] = escapes[used : used + len(escaped)]
                used += len(escaped)
            out[rows] = flat.reshape(len(rows), tokens)
        if used != len(escapes):
            raise ValueError(f"{len(escapes) - used} escaped codes left over")
        return out

    def _groups(self, classes: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(class, its rows) in class order; the same few layouts recur in every block, so they are kept."""
        key = classes.tobytes()
        if key not in self._cache:
            self._cache[key] = [(int(c), np.flatnonzero(classes == c)) for c in np.unique(classes)]
        return self._cache[key]


# ---------------------------------------------------------------- pcodec, by octave of spread


def octaves(spreads: np.ndarray) -> list[np.ndarray]:
    """The rows of each octave of spread present, ascending; from the float's exponent, so every machine
    groups alike (no log2 whose last bit could differ)."""
    return [rows for rows, _ in _octave_runs(np.asarray(spreads, dtype=np.float32).tobytes())]


@functools.lru_cache(maxsize=1024)  # a model's layers x the few q in use: the same layouts in every block
def _octave_runs(spreads: bytes) -> tuple[tuple[np.ndarray, tuple[tuple[int, int], ...]], ...]:
    """Per octave: its rows, and the same rows as runs (first, last + 1); spreads descend within each
    kind, so an octave is a run or two, and a slice copies faster than an index array."""
    _, exponent = np.frexp(np.maximum(np.frombuffer(spreads, dtype=np.float32), np.float32(DROP)))
    groups = []
    for e in np.unique(exponent):
        rows = np.flatnonzero(exponent == e)
        rows.flags.writeable = False  # shared by every caller
        breaks = np.flatnonzero(np.diff(rows) != 1)
        firsts, lasts = np.concatenate([[0], breaks + 1]), np.concatenate([breaks, [len(rows) - 1]])
        groups.append((rows, tuple((int(rows[a]), int(rows[b]) + 1) for a, b in zip(firsts, lasts))))
    return tuple(groups)


def pco_encode(codes: np.ndarray, spreads: np.ndarray) -> list[np.ndarray]:
    """One pcodec chunk (uint8) per octave of `spreads` `[n]`, of `codes` `[n, t]` (rows then tokens)."""
    config = ChunkConfig(compression_level=PCO_LEVEL, delta_spec=DeltaSpec.no_op())  # no delta search: codes
    # decorrelate little across tokens (lag-1 ~0.3); searching cost a third of the encode for 0.7% of the bytes
    return [np.frombuffer(standalone.simple_compress(np.ascontiguousarray(codes[rows], dtype=np.int32).reshape(-1),
                                                     config), dtype=np.uint8)
            for rows in octaves(spreads)]


def pco_decode(chunks: list[np.ndarray], spreads: np.ndarray, tokens: int) -> np.ndarray:
    """The codes `[n, tokens]` (int32) from `pco_encode`'s chunks. Each chunk is decoded into an array
    sized by the codebook and the manifest, never by the chunk's own header, and must fill it exactly."""
    groups = _octave_runs(np.asarray(spreads, dtype=np.float32).tobytes())
    if len(chunks) != len(groups):
        raise ValueError(f"{len(chunks)} pcodec chunks, the codebook groups {len(groups)} octaves")
    out = np.empty((len(spreads), tokens), dtype=np.int32)
    for (rows, runs), chunk in zip(groups, chunks):
        flat = np.empty((len(rows), tokens), dtype=np.int32)
        progress = standalone.simple_decompress_into(chunk.tobytes(), flat.reshape(-1))
        if progress.n_processed != flat.size or not progress.finished:
            raise ValueError(f"a pcodec chunk holds {'more' if not progress.finished else progress.n_processed} "
                             f"codes, expected {flat.size}")
        done = 0
        for first, end in runs:
            out[first:end] = flat[done : done + end - first]
            done += end - first
    return out


@dataclass(frozen=True, eq=False)
class Codebook:
    """Transforms for every layer of one model (`fingerprint`), and what they were fitted on."""

    model: str
    fingerprint: str
    geometry: tuple[int, int, int]  # layers, kv_heads, head_dim
    transforms: tuple[tuple[Transform, Transform], ...]  # [layer] -> (key, value)
    calibration: dict  # for people: the files and tokens it was fitted on, and how it was probed
    entropy: EntropyModel = field(default_factory=EntropyModel.gaussian)

    def layer(self, layer: int) -> dict:
        """What a layer's blocks are coded with: {"key": Transform, "value": Transform, "entropy": EntropyModel}."""
        return {**dict(zip(KINDS, self.transforms[layer])), "entropy": self.entropy}

    def to_bytes(self) -> bytes:
        tensors = {}
        for layer, pair in enumerate(self.transforms):
            for kind, t in zip(KINDS, pair):
                tensors[f"{layer}.{kind}.mean"] = t.mean.astype(np.float32)
                tensors[f"{layer}.{kind}.basis"] = t.basis.astype(np.float16)
                tensors[f"{layer}.{kind}.analysis"] = t.analysis.astype(np.float16)
                tensors[f"{layer}.{kind}.std"] = t.std.astype(np.float32)
                tensors[f"{layer}.{kind}.unit"] = np.array([t.unit], dtype=np.float32)
        tensors["ans.edges"], tensors["ans.sizes"], tensors["ans.tables"] = \
            self.entropy.edges, self.entropy.sizes, self.entropy.tables
        # the description is a tensor of JSON bytes, not safetensors metadata: the library writes that map
        # in no fixed order, and the same codebook must have one digest
        description = {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
                       "geometry": list(self.geometry), "calibration": self.calibration}
        tensors[META] = np.frombuffer(json.dumps(description, sort_keys=True).encode(), dtype=np.uint8)
        return st_save(tensors)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    def describe(self) -> str:
        return f"codebook for {self.model} ({self.geometry[0]} layers, {self.geometry[1]}x{self.geometry[2]} per token)"

    def check_for(self, fingerprint: str, geometry: tuple[int, int, int], source: str) -> None:
        """Refuse a codebook made for another model or cache shape (its blocks would decode to garbage)."""
        if self.fingerprint != fingerprint or tuple(self.geometry) != tuple(geometry):
            raise IntegrityError(f"{source}: the {self.describe()} (fingerprint {self.fingerprint[:12]}) does not "
                                 f"belong to this model space ({fingerprint[:12]}, geometry {list(geometry)})")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "codebook") -> Codebook:
        try:
            tensors = read_safetensors(data)
            meta = tensors.get(META)
            description = json.loads(meta.tobytes()) if meta is not None and meta.dtype == np.uint8 else {}
            if not isinstance(description, dict) or description.get("format") != FORMAT:
                found = description.get("format") if isinstance(description, dict) else None
                raise UsageError(f"{source}: not a celslm codebook (format {str(found)[:40]!r}, expected {FORMAT})")
            layers, heads, width = (int(n) for n in description["geometry"])
            if not 0 < layers <= 1024 or not 0 < heads * width <= 1 << 16:
                raise ValueError(f"geometry {description['geometry']} out of range")
            if len(tensors) != 5 * len(KINDS) * layers + 4:
                raise ValueError(f"{len(tensors)} tensors for {layers} layers")
            transforms = tuple(tuple(_transform(tensors, layer, kind, heads * width) for kind in KINDS)
                               for layer in range(layers))
            calibration = description.get("calibration")
            return cls(str(description["model"]), str(description["fingerprint"]), (layers, heads, width), transforms,
                       calibration if isinstance(calibration, dict) else {}, _entropy(tensors))
        except UsageError:
            raise
        except Exception as exc:  # the digest matched (or the file is local): its contents do not fit
            raise IntegrityError(f"{source}: codebook does not decode: {str(exc)[:200]}") from exc


def _entropy(tensors: dict) -> EntropyModel:
    edges, sizes, tables = (tensors[f"ans.{n}"] for n in ("edges", "sizes", "tables"))
    classes = len(sizes)
    if edges.shape != (classes - 1,) or tables.shape != (classes, 2 * MAX_CODE + 2) or sizes.dtype != np.int32:
        raise ValueError(f"entropy tables of shapes {edges.shape}, {sizes.shape}, {tables.shape}")
    if not ((sizes >= 1) & (sizes <= MAX_CODE)).all() or not (np.isfinite(tables) & (tables >= 0)).all() \
            or not (np.diff(edges) > 0).all():
        raise ValueError("entropy tables out of range")
    return EntropyModel(edges.astype(np.float32), sizes.astype(np.int32), tables.astype(np.float32))


def _transform(tensors: dict, layer: int, kind: str, width: int) -> Transform:
    name = f"{layer}.{kind}"
    mean, basis, std, unit, analysis = (tensors[f"{name}.{part}"] for part in ("mean", "basis", "std", "unit", "analysis"))
    if mean.shape != (width,) or basis.shape != (width, width) or std.shape != (width,) or unit.shape != (1,) \
            or analysis.shape != (width, width):
        raise ValueError(f"{name}: shapes {mean.shape}, {basis.shape}, {std.shape}, {unit.shape} do not fit {width} channels")
    t = Transform(mean.astype(np.float32), basis.astype(np.float32), std.astype(np.float32), analysis.astype(np.float32),
                  float(unit[0]))
    if not (np.isfinite(t.mean).all() and np.isfinite(t.basis).all() and np.isfinite(t.analysis).all()
            and np.isfinite(t.std).all()
            and np.isfinite(t.unit) and t.unit > 0 and (t.std >= 0).all() and (np.diff(t.std) <= 0).all()):
        raise ValueError(f"{name}: values out of range (non-finite, a non-positive unit, or spreads not descending)")
    return t
