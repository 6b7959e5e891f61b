"""The README names no missing file: every image, link and repository path it shows is committed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
# A path under one of the repository's top folders, wherever the README names it (prose, commands, Layout)
TOP = ("celslm", "commands", "completions", "deploy", "docs", "samples", "tests")
PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*)" % "|".join(TOP))
# In the Layout block, a folder's line names its files relative to it: "samples/  demo.sh, cron/, ..."
LAYOUT_FOLDER = re.compile(r"^([\w/]+/)\s{2,}(.*)$")
RELATIVE = re.compile(r"(?<![\w./-])([\w-]+(?:/[\w-]+)*(?:\.(?:py|sh|md)|/))(?![\w])")


def tracked() -> set[str]:
    """The files git would ship: an ignored or uncommitted file counts as missing."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare the README with")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    return set(filter(None, out.decode().split("\0")))


def exists(path: str, files: set[str]) -> bool:
    path = path.rstrip(".").split("#")[0]  # a sentence's full stop; an anchor
    if path.endswith("/"):
        return any(f.startswith(path) for f in files)
    return path in files or any(f.startswith(path + "/") for f in files)


def layout_block(text: str) -> str:
    section = text.split("\n## Layout\n", 1)[1]
    return section.split("```", 2)[1]


def named_paths(text: str) -> set[str]:
    """Every repository path the README names: link targets, top-folder paths, and Layout folders' files."""
    names = {m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:|#", m.group(1))}
    names |= {m.group(1) for m in PATH.finditer(text)}
    folder = None
    for line in layout_block(text).splitlines():
        if match := LAYOUT_FOLDER.match(line):
            folder, rest = match.groups()
        elif line[:1] == " " and folder:
            rest = line
        else:
            folder, rest = None, ""
        names |= {folder + m.group(1) for m in RELATIVE.finditer(rest)} if folder else set()
    return names


def test_every_path_the_readme_names_is_committed():
    files = tracked()
    names = named_paths(README.read_text())
    assert "docs/compress.png" in names and "samples/cron/refresh-context.sh" in names  # the parser sees them
    missing = sorted(name for name in names if not exists(name, files))
    assert not missing, f"README.md names files that are not committed: {missing}"


def test_a_missing_image_is_caught():
    files = tracked()
    text = README.read_text() + "\n![a plot](docs/never-drawn.png)\n"
    assert [n for n in named_paths(text) if not exists(n, files)] == ["docs/never-drawn.png"]

