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


def third_party_modules() -> list[Path]:
    """Modules of libraries installed beside celslm (held out from calibration, which reads only the
    standard library), sorted by package and path."""
    import importlib.util

    paths = []
    for package in THIRD_PARTY:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        paths += [p for p in sorted(root.rglob("*.py")) if 8_000 < p.stat().st_size < 400_000
                  and not any(part.startswith("_") or part in ("test", "tests") for part in p.relative_to(root).parts)]
    return paths


def _stride(paths: list[Path], files: int) -> int:
    return max(2, len(paths) // files)


def eval_cases(tokenizer, files: int = 20, min_context: int = 1024, max_context: int = 2048,
               continuation: int = 128, exclude: set[str] = frozenset(), source: str = "stdlib") -> list[Case]:
    """Evenly spaced modules with enough text; the context is up to `max_context` tokens of the file.
    `source`: "stdlib" (the standard library) or "third-party" (`third_party_modules`)."""
    if source not in ("stdlib", "third-party"):
        raise ValueError(f"unknown evaluation source {source!r}")
    paths = stdlib_modules() if source == "stdlib" else third_party_modules()
    cases = []
    for path in paths[:: _stride(paths, 20)]:
        if path.name in exclude:
            continue
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=True)["input_ids"]
        length = min(max_context, len(ids) - continuation)
        if length < min_context:
            continue
        name = path.name if source == "stdlib" else "/".join(path.parts[path.parts.index("site-packages") + 1 :]) \
            if "site-packages" in path.parts else path.name
        cases.append(Case(name, ids[:length], ids[length : length + continuation]))
        if len(cases) == files:
            break
    return cases


def calibration_files(count: int) -> list[Path]:
    """Modules halfway between the evaluation picks: never among `eval_cases`' files."""
    paths = stdlib_modules()
    stride = _stride(paths, 20)
    picks = paths[stride // 2 :: stride] + paths[stride // 2 + 1 :: stride]
    return picks[:count]
