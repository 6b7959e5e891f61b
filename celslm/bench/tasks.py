"""Tasks with ground truth, built from held-out standard-library files, and their scores.

- complete: the context is a file up to a function; the private prompt is the function's `def` line;
  the answer is the function's first lines. Scored by exact match of the first line and by edit
  similarity of as many lines as the answer has.
- qa: the context is a file; the private prompt asks what a named function returns; the answer is the
  expression of its single `return`. Scored by whether the answer, spaces removed, appears in the output.

Tasks are plain dataclasses saved as JSON, so a run can be re-scored without re-running models.
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Task:
    kind: str  # "complete" or "qa"
    file: str
    context: str
    prompt: str
    answer: str

    def to_json(self) -> dict:
        return asdict(self)


def completion_task(path: Path, min_context_chars: int, answer_lines: int = 2) -> Task | None:
    """The first top-level or method function starting after `min_context_chars` with enough body."""
    source = path.read_text(errors="replace")
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for node in sorted(_functions(source), key=lambda n: n.lineno):
        start = offsets[node.lineno - 1]
        body_start = node.body[0].lineno - 1
        if start < min_context_chars or node.body[0].lineno == node.lineno:
            continue
        if body_start != node.lineno:  # a multi-line signature: keep it simple, skip
            continue
        body = [line.rstrip("\n") for line in lines[body_start : body_start + answer_lines]]
        if len(body) < answer_lines or not all(line.strip() for line in body):
            continue
        return Task("complete", path.name, source[:start], lines[node.lineno - 1], "\n".join(body))
    return None


def qa_task(path: Path, max_context_chars: int) -> Task | None:
    """A uniquely named function, within the context, whose body ends in one short `return EXPR`."""
    source = path.read_text(errors="replace")
    context = source[:max_context_chars]
    functions = _functions(source)
    names = [f.name for f in functions]
    for node in functions:
        returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
        if names.count(node.name) != 1 or node.name.startswith("_") or len(returns) != 1 or returns[0].value is None:
            continue
        answer = ast.unparse(returns[0].value)
        if not 3 <= len(answer) <= 40 or f"def {node.name}(" not in context or _normal(answer) not in _normal(context):
            continue
        prompt = (f"In the code above, what expression does the function `{node.name}` return? "
                  "Answer with the expression only.")
        return Task("qa", path.name, context, prompt, answer)
    return None


def _functions(source: str) -> list[ast.FunctionDef]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]


def _normal(text: str) -> str:
    return "".join(text.split()).strip("`").replace('"', "'")


def score(task: Task, output: str) -> dict:
    """The task's scores for a model's output text."""
    if task.kind == "qa":
        return {"correct": float(_normal(task.answer) in _normal(output))}
    expected = task.answer.splitlines()
    got = output.splitlines()[: len(expected)]
    first = got[0].strip() if got else ""
    return {
        "exact": float(first == expected[0].strip()),
        "edit_similarity": difflib.SequenceMatcher(None, "\n".join(got), "\n".join(expected)).ratio(),
    }
