"""The house: every package ships, imports point down (no cycles, the library never imports commands),
and the command line starts without torch or transformers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.netutil import Server

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "boto3")  # boto3: only an s3:// store loads it
# The real CLI (`python -m celslm`), reporting at exit which heavy modules it loaded (on stderr, after everything else).
PROBED_CLI = [sys.executable, "-c",
              "import atexit, runpy, sys\n"
              f"atexit.register(lambda: sys.stderr.write('\\nheavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules) + '\\n'))\n"
              "runpy.run_module('celslm', run_name='__main__')"]
# The [bench] extra's modules, and the only modules that may import them: an edge install has neither.
BENCH_EXTRA = {"matplotlib": ("celslm.plots",)}
# `python -m celslm` starts the command line, as the `celslm` script does: the one library file importing it.
ENTRY_POINT = "celslm.__main__"


def module_files() -> dict[str, Path]:
    """Every module of the installed package by dotted name (commands/ installs as celslm.commands)."""
    found = {}
    for base, package in ((ROOT / "celslm", "celslm"), (ROOT / "commands", "celslm.commands")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The celslm modules `name` imports anywhere in its file (functions and TYPE_CHECKING blocks included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from celslm import kvcache` imports a module; `from x import y` a name
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_package_folder_is_declared_in_pyproject():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert on_disk - declared == set(), "package folders missing from [tool.setuptools] packages"


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


def test_the_library_never_imports_the_command_line():
    offenders = {name: sorted(t for t in targets if t.startswith("celslm.commands"))
                 for name, targets in import_graph().items() if not name.startswith("celslm.commands") and name != ENTRY_POINT}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_command_module_imports_another_command():
    shared = {"celslm.commands", "celslm.commands.common"}
    graph = import_graph()
    crossing = {name: sorted(t for t in targets if t.startswith("celslm.commands") and t not in shared)
                for name, targets in graph.items() if name.startswith("celslm.commands") and name != "celslm.commands.main"}
    assert {k: v for k, v in crossing.items() if v} == {}


def heavy_loaded(stderr: str) -> list[str]:
    line = [part for part in stderr.splitlines() if part.startswith("heavy:")][-1]
    return [m for m in line.removeprefix("heavy:").split(",") if m]


def subcommands() -> list[list[str]]:
    from typer.main import get_command

    from celslm.commands.main import app

    found = []
    root = get_command(app)
    for name, command in root.commands.items():
        children = getattr(command, "commands", None)
        found += [[name, child] for child in children] if children else [[name]]
    return found


@pytest.mark.parametrize("args", [["--help"], ["--version"], *[[*c, "--help"] for c in subcommands()]],
                         ids=lambda args: " ".join(args))
def test_help_and_version_load_neither_torch_nor_transformers(args):
    result = subprocess.run(PROBED_CLI + args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert heavy_loaded(result.stderr) == []
    # flags take no value, so their help shows none (Typer's own -h and completion options still do)
    typers_own = ("-h ", "--install-completion", "--show-completion")
    assert [line for line in result.stdout.splitlines()
            if "<bool>" in line and not any(name in line for name in typers_own)] == []


def test_help_examples_name_files_that_ship():
    """Every samples/ path an example in --help names exists."""
    from celslm.commands import main

    modules = [main._module(name) for name in (*main.COMMANDS.values(), *main.GROUPS.values())]
    epilogs = "\n".join(getattr(module, name) for module in modules for name in dir(module) if name.endswith("EPILOG"))
    named = set(re.findall(r"samples/[\w./-]+", epilogs))
    assert named and all((ROOT / path).exists() for path in named), named


def test_the_probe_sees_torch_when_a_command_loads_it(tiny_qwen, tmp_path):
    """The check above can fail: a command that runs a model is seen loading torch."""
    (tmp_path / "c.txt").write_text("some context")
    result = subprocess.run(PROBED_CLI + ["prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / "c.txt"), "-o",
                                          str(tmp_path / "c.kv")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in heavy_loaded(result.stderr)


def test_sharing_commands_never_load_torch(prefilled, tmp_path):
    """serve-cache, push, pull, verify and inspect move and check bytes; they never need a tensor."""
    artifact = str(prefilled / "a.kv")
    server = Server(tmp_path / "store", cli=PROBED_CLI)
    try:
        commands = {"verify": ["verify", artifact], "inspect": ["inspect", artifact, "--json"],
                    "push": ["push", artifact, server.url, "--tag", "ctx:latest"],
                    "pull": ["pull", f"{server.url}/v1/tags/ctx:latest", "--out", str(tmp_path / "p.kv")]}
        for name, args in commands.items():
            result = subprocess.run(PROBED_CLI + args, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and heavy_loaded(result.stderr) == [], (name, result.stderr)
    finally:
        assert server.stop() == 0
    assert heavy_loaded(server.proc.stderr.read().decode()) == []
    assert (tmp_path / "p.kv" / "manifest.json").read_bytes() == (prefilled / "a.kv" / "manifest.json").read_bytes()


def test_every_library_import_points_up_the_readme_layout():
    """README's Layout lists the library so that each module imports only modules above it; keep it true."""
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    order = [line.split()[0] for line in layout.splitlines() if line.startswith("celslm/")]

    def entry(module: str) -> int:
        path = module.replace(".", "/")
        matches = [i for i, name in enumerate(order) if path + ".py" == name or (path + "/").startswith(name)]
        assert matches, f"{module} is not in README's Layout"
        return matches[0]

    upward = {(name, target) for name, targets in import_graph().items() if not name.startswith("celslm.commands")
              and name not in ("celslm", ENTRY_POINT) for target in targets
              if entry(target) > entry(name)}
    assert upward == set()


def third_party_imports(path: Path) -> set[str]:
    """The top-level names a module imports anywhere in its file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_benchmarks_and_figures_import_the_bench_extra():
    """matplotlib only in celslm/plots.py: an edge install runs without it."""
    offenders = {name: sorted(third_party_imports(path) & {m for m, allowed in BENCH_EXTRA.items()
                                                          if not name.startswith(allowed)})
                 for name, path in module_files().items()}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "matplotlib" in third_party_imports(module_files()["celslm.plots"])  # the check sees an import


def test_the_bench_extra_is_not_a_dependency_of_the_edge_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {re.split(r"[<>=!~ ]", spec)[0] for spec in project["dependencies"]}
    extra = {re.split(r"[<>=!~ ]", spec)[0] for spec in project["optional-dependencies"]["bench"]}
    assert set(BENCH_EXTRA) <= extra and not set(BENCH_EXTRA) & required


@pytest.mark.parametrize("missing, args", [
    ("matplotlib", ["bench", "report", "--from", "suite.json", "--out", "report"]),
    ("matplotlib", ["bench", "latency", "-m", "no-such-model", "--plot", "latency.png"]),
], ids=lambda value: value if isinstance(value, str) else " ".join(value[:2]))
def test_a_bench_command_without_its_extra_says_how_to_install_it_in_one_line(missing, args, tmp_path):
    """As on an edge install: the module cannot be imported (None in sys.modules), and the command
    fails before any model loads, with one line naming the extra."""
    hidden = f"import runpy, sys\nsys.modules[{missing!r}] = None\nrunpy.run_module('celslm', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", hidden, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and missing in lines[0] and "pip install 'celslm[bench]'" in lines[0], lines


def test_python_dash_m_celslm_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "celslm", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("celslm "), result.stderr
