"""Real text nobody in this project wrote: Python standard-library modules, split into disjoint sets.

Evaluation cases take evenly spaced modules; calibration (for `align`) takes the modules halfway
between them, so a quality figure is never measured on text an alignment was fitted on.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Files other benchmarks and samples use are neither evaluation nor calibration data.
RESERVED = {"sched.py", "textwrap.py", "fnmatch.py", "shlex.py", "string.py"}


@dataclass(frozen=True)
class Case:
    name: str
    context: list[int]
    continuation: list[int]


def stdlib_modules() -> list[Path]:
    """Top-level stdlib modules of a useful size, sorted by name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(stdlib.glob("*.py"))
            if p.name not in RESERVED and not p.name.startswith("_") and 8_000 < p.stat().st_size < 400_000]


THIRD_PARTY = ("rich", "aiohttp", "jinja2", "click", "redis", "matplotlib")  # installed with celslm, written elsewhere
# Other libraries installed beside celslm: calibration text for `align --calib-corpus broad`, package-disjoint
# from THIRD_PARTY, so that the third-party evaluation reads libraries no alignment has seen.
CALIBRATION_LIBRARIES = ("requests", "urllib3", "pydantic", "sympy", "networkx", "botocore", "boto3", "huggingface_hub",
                         "setuptools", "pygments", "markdown_it", "fsspec", "openai", "packaging", "accelerate",
                         "transformers", "yaml")
CALIBRATION_CORPORA = ("stdlib", "broad")


def library_modules(package: str) -> list[Path]:
    """An installed library's modules of a useful size (no tests, nothing private), sorted by path."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    return [p for p in sorted(root.rglob("*.py")) if 8_000 < p.stat().st_size < 400_000
            and not any(part.startswith("_") or part in ("test", "tests") for part in p.relative_to(root).parts)]


def third_party_modules() -> list[Path]:
    """Modules of libraries installed beside celslm (never calibration text: see CALIBRATION_LIBRARIES),
    sorted by package and path."""
    return [path for package in THIRD_PARTY for path in library_modules(package)]


TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
SOURCES = ("stdlib", "third-party")  # or a folder of the user's


def folder_files(folder: Path) -> list[Path]:
    """The text files under `folder` (.py, .txt, .md, .rst), sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def file_name(path: Path) -> str:
    """How calibration and evaluation name a file: an installed library's module by its path from the
    package on (`redis/connection.py`, not a bare `connection.py` several libraries have), else its name."""
    parts = path.parts
    return "/".join(parts[parts.index("site-packages") + 1 :]) if "site-packages" in parts else path.name


def corpus_label(source: str) -> str:
    """How a report names the corpus: stdlib, third-party, or the folder's path."""
    return source if source in SOURCES else f"folder {source}"


def _stride(paths: list[Path], files: int) -> int:
    return max(2, len(paths) // files)


def eval_cases(tokenizer, files: int = 20, min_context: int = 1024, max_context: int = 2048,
               continuation: int = 128, exclude: set[str] = frozenset(), source: str = "stdlib") -> list[Case]:
    """Evenly spaced modules with enough text; the context is up to `max_context` tokens of the file.
    `source`: "stdlib" (the standard library), "third-party" (`third_party_modules`), or a folder whose
    text files are all taken in path order (`folder_files`). A file whose name is in `exclude` (an
    alignment's calibration files, by `file_name` or by bare name) is passed over."""
    if source in SOURCES:
        paths = stdlib_modules() if source == "stdlib" else third_party_modules()
        paths = paths[:: _stride(paths, 20)]
    elif Path(source).is_dir():
        paths = folder_files(Path(source))
    else:
        raise ValueError(f"unknown evaluation source {source!r}: stdlib, third-party or a folder")
    cases = []
    for path in paths:
        if path.name in exclude or file_name(path) in exclude:
            continue
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=True)["input_ids"]
        length = min(max_context, len(ids) - continuation)
        if length < min_context:
            continue
        name = file_name(path) if source in SOURCES else path.relative_to(source).as_posix()
        cases.append(Case(name, ids[:length], ids[length : length + continuation]))
        if len(cases) == files:
            break
    return cases


def package_groups(modules: int) -> list[tuple[str, list[Path]]]:
    """Standard-library packages (json, email, http, ...) with at least `modules` modules of a useful size,
    sorted by name, each with its modules spread over it (`_spread`). Package modules are never
    calibration files (those are top-level modules or other libraries'), so these are held out."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = []
    for folder in sorted(p for p in stdlib.iterdir() if (p / "__init__.py").is_file()):
        if folder.name in ("test", "idlelib", "lib2to3", "distutils", "ensurepip", "turtledemo", "tkinter", "encodings"):
            continue
        files = [p for p in sorted(folder.rglob("*.py")) if 4_000 < p.stat().st_size < 400_000
                 and not any(part.startswith("_") and part != "__init__.py" or part in ("test", "tests")
                             for part in p.relative_to(folder).parts)]
        if len(files) >= modules:
            groups.append((folder.name, _spread(files)))
    return groups


def calibration_files(count: int, corpus: str = "stdlib") -> list[Path]:
    """Modules halfway between the standard-library evaluation picks: never among `eval_cases`' files.
    With corpus "broad", those in turn with modules of CALIBRATION_LIBRARIES (the libraries in turn,
    each library's spread over it): half standard-library code, half code of libraries the evaluation
    never reads."""
    if corpus not in CALIBRATION_CORPORA:
        raise ValueError(f"unknown calibration corpus {corpus!r}")
    paths = stdlib_modules()
    stride = _stride(paths, 20)
    picks = paths[stride // 2 :: stride] + paths[stride // 2 + 1 :: stride]
    if corpus == "broad":
        picks = _in_turn([picks, _in_turn([_spread(m) for m in map(library_modules, CALIBRATION_LIBRARIES) if m])])
    return picks[:count]


def _in_turn(sources: list[list[Path]]) -> list[Path]:
    """One from each source in turn, until all are used up."""
    return [source[index] for index in range(max(map(len, sources))) for source in sources if index < len(source)]


def _spread(paths: list[Path]) -> list[Path]:
    """`paths` reordered so that any first n of them are spread over the whole list (a library's
    modules are sorted by subpackage: its first few would all be one corner of it)."""
    order, seen, step = [], set(), len(paths)
    while step >= 1:
        fresh = [i for i in range(0, len(paths), step) if i not in seen]
        order += fresh
        seen.update(fresh)
        step //= 2
    return [paths[i] for i in order]
