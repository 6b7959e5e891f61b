#!/usr/bin/env bash
# Cloud and edge as two separate hosts on one machine: two network namespaces joined by a veth pair
# (cloud 10.47.0.1, edge 10.47.0.2), the link shaped by tc (token bucket at RATE each way; emulated).
# The cloud host runs serve-cache, prefills the context and pushes it under a tag; the edge host, with
# its own cache directory, asks a question over the link twice: first from the cloud, then from its
# local cache. Everything it creates (namespaces, veth, server, files) is removed on exit.
#
#   usage: sudo samples/netns/walkthrough.sh [CONTEXT_FILE] ["QUESTION"]
#   env:   CELSLM_MODEL (default qwen2.5-coder-0.5b), RATE (default 100mbit), CELSLM (the celslm command)
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "walkthrough: needs root (ip netns, tc); run it with sudo" >&2
    exit 2
fi
context=$(realpath "${1:-samples/context/sched.py}")
question=${2:-What does enterabs return?}
model=${CELSLM_MODEL:-qwen2.5-coder-0.5b}
rate=${RATE:-100mbit}
celslm=$(command -v "${CELSLM:-celslm}")
home=${CELSLM_HOME:-$HOME/.cache/celslm}
cloud=celslm-cloud-$$ edge=celslm-edge-$$
work=$(mktemp -d)
server=

cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    ip netns del "$cloud" 2>/dev/null || true  # deleting a namespace deletes its end of the veth pair
    ip netns del "$edge" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$cloud"
ip netns add "$edge"
ip link add "vc$$" type veth peer name "ve$$"
ip link set "vc$$" netns "$cloud"
ip link set "ve$$" netns "$edge"
for side in "$cloud vc$$ 10.47.0.1" "$edge ve$$ 10.47.0.2"; do
    set -- $side
    ip -n "$1" link set lo up
    ip -n "$1" addr add "$3/24" dev "$2"
    ip -n "$1" link set "$2" up
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$rate" burst 64kb latency 100ms
done
url=http://10.47.0.1:8470
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')  # beyond loopback serve-cache wants a write token (in the environment: not in ps)

echo "== cloud host ($cloud): serve-cache on $url, link $rate each way (emulated by tc)"
ip netns exec "$cloud" env CELSLM_HOME="$home" CELSLM_WRITE_TOKEN="$token" "$celslm" serve-cache --root "$work/cloud-store" \
    --host 10.47.0.1 --port 8470 2>"$work/server.log" &
server=$!
for _ in $(seq 100); do
    ip netns exec "$edge" curl -fsS -o /dev/null "$url/v1/health" 2>/dev/null && break
    sleep 0.2
done
ip netns exec "$cloud" env CELSLM_HOME="$home" CELSLM_TOKEN="$token" "$celslm" prefill -m "$model" -c "$context" \
    --push "$url" --tag walkthrough:latest

# The edge host has its own cache directory; it shares only the model files with this machine.
mkdir -p "$work/edge-home"
[ -d "$home/models" ] && ln -s "$home/models" "$work/edge-home/models"
for run in "first ask: fetched from the cloud" "second ask: from the edge's own cache"; do
    echo "== edge host ($edge), $run"
    ip netns exec "$edge" env CELSLM_HOME="$work/edge-home" "$celslm" decode -m "$model" --kv walkthrough:latest \
        --cloud "$url" --prompt "$question" --max-new-tokens 48 --json \
        | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["text"].strip()); print("bytes by source:", r["bytes_by_source"], "| ttft", round(r["ttft_s"], 3), "s")'
done
