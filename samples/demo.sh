#!/usr/bin/env bash
# The whole flow on the bundled model: the "cloud" prefills a real context once, the "edge" answers a
# private question from that artifact; then the same question edge-only (the model prefilling the
# context itself), with the time split of both side by side.
#   usage: samples/demo.sh ["your question"]      (make demo runs it)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
model="${CELSLM_DEMO_MODEL:-qwen2.5-coder-0.5b}"
context="$here/context/sched.py"
question="${1:-What does scheduler.enterabs return, and how do I cancel a scheduled event? Answer in two sentences.}"
work="$(mktemp -d "${TMPDIR:-/tmp}/celslm-demo.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "== pulling $model (once; later runs reuse it)" >&2
celslm models pull "$model"

echo "== cloud: prefill $(basename "$context") into an artifact" >&2
celslm prefill -m "$model" -c "$context" -o "$work/sched.kv"
celslm inspect "$work/sched.kv"

echo "== edge: answer from the artifact" >&2
celslm decode -m "$model" --kv "$work/sched.kv" -p "$question" --json > "$work/artifact.json"

echo "== edge-only: the model prefills the context itself" >&2
celslm decode -m "$model" --context "$context" -p "$question" --json > "$work/edge.json"

python3 "$here/compare.py" "$question" "$work/artifact.json" "$work/edge.json"
