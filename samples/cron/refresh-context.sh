#!/usr/bin/env bash
# Refresh a tagged shared context in the cloud cache: prefill it and push it, only when it changed.
#
#   usage: refresh-context.sh CONTEXT_FILE TAG
#   env:   CELSLM_CLOUD (required: the serve-cache URL), CELSLM_MODEL (default qwen2.5-coder-0.5b),
#          CELSLM_TOKEN (write token, if the server wants one), CELSLM_HOME (state lives under it),
#          CELSLM (the celslm command, default: celslm on PATH), CELSLM_SIGN_KEY (the producer's private
#          key: the artifact and the tag statement are signed, and re-published after 3 days, well before
#          the statement's 7-day validity ends, so trusting edges never see it expire)
#
# Cron-friendly: silent on success; on failure the captured output goes to stderr and the exit code is
# non-zero (1 failed, 2 usage, 75 another run for the same tag still holds the lock). Idempotent: when
# the context, model and tag are unchanged and the tag still exists on the server, nothing is computed.
#
#   # crontab -e: every night at 02:15
#   15 2 * * * CELSLM_CLOUD=http://cloud:8470 /opt/celslm/samples/cron/refresh-context.sh /srv/ctx/sched.py sched:latest
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 CONTEXT_FILE TAG" >&2
    exit 2
fi
context=$1 tag=$2
cloud=${CELSLM_CLOUD:?set CELSLM_CLOUD to the serve-cache URL}
model=${CELSLM_MODEL:-qwen2.5-coder-0.5b}
celslm=${CELSLM:-celslm}
state_dir=${CELSLM_HOME:-$HOME/.cache/celslm}/refresh
[ -r "$context" ] || { echo "refresh-context: cannot read $context" >&2; exit 2; }
mkdir -p "$state_dir"
slug=$(printf '%s' "$tag" | tr -c 'A-Za-z0-9._-' '_')

# No overlapping runs for one tag: a second run while the first holds the lock gives up at once.
exec 9>"$state_dir/$slug.lock"
if ! flock -n 9; then
    echo "refresh-context: a run for $tag is still going (lock $state_dir/$slug.lock)" >&2
    exit 75
fi

wanted=$( { printf '%s\n%s\n%s\n' "$model" "$tag" "$cloud"; cat "$context"; } | sha256sum | cut -d' ' -f1)
auth=()
[ -n "${CELSLM_TOKEN:-}" ] && auth=(-H "Authorization: Bearer $CELSLM_TOKEN")
fresh=yes
if [ -n "${CELSLM_SIGN_KEY:-}" ] && [ -z "$(find "$state_dir/$slug.done" -mmin -4320 2>/dev/null)" ]; then
    fresh=""  # the signed statement is 3 days old: sign a new one
fi
if [ -n "$fresh" ] && [ "$(cat "$state_dir/$slug.done" 2>/dev/null)" = "$wanted" ] \
        && curl -fsS -o /dev/null "${auth[@]}" "$cloud/v1/tags/$tag" 2>/dev/null; then
    exit 0  # unchanged and still published
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "$celslm" prefill -m "$model" -c "$context" --push "$cloud" --tag "$tag" --json >"$log" 2>&1; then
    echo "refresh-context: prefill/push of $context as $tag to $cloud failed:" >&2
    cat "$log" >&2
    exit 1
fi
printf '%s\n' "$wanted" >"$state_dir/$slug.done.tmp"
mv "$state_dir/$slug.done.tmp" "$state_dir/$slug.done"
