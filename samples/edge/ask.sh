#!/usr/bin/env bash
# Ask a private question about a shared context from an edge device.
#
#   usage: ask.sh TAG CONTEXT_FILE "QUESTION" [PEER_URL ...]
#   env:   CELSLM_CLOUD (the cloud's serve-cache URL), CELSLM_MODEL (default qwen2.5-coder-0.5b), CELSLM_TOKEN,
#          CELSLM_TRUST (the producer's public key: only a tag and artifact it signed are used; a peer's
#          unsigned answer is passed over for the cloud, and nothing signed at all is refused, exit 3)
#
# The artifact named by TAG is fetched from this device's own cache, then each peer in order, then the
# cloud; blobs are verified as they land. If nothing can be fetched (all down, or the artifact is gone),
# the context file is prefilled here instead, so the question is still answered. The question never
# leaves this device. Prints the answer, then the time split and bytes by source on stderr.
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 TAG CONTEXT_FILE \"QUESTION\" [PEER_URL ...]" >&2
    exit 2
fi
tag=$1 context=$2 question=$3
shift 3
if [ -z "${CELSLM_TRUST:-}" ]; then
    echo "ask.sh: warning: CELSLM_TRUST is not set, so a peer can name any context for $tag; set it to the producer's .pub" >&2
fi
peers=()
for peer in "$@"; do
    peers+=(--peer "$peer")
done
exec "${CELSLM:-celslm}" decode -m "${CELSLM_MODEL:-qwen2.5-coder-0.5b}" --kv "$tag" --context "$context" \
    "${peers[@]}" ${CELSLM_CLOUD:+--cloud "$CELSLM_CLOUD"} --prompt "$question" --stats
