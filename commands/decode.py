"""celslm decode: generate from a KV artifact (or an edge-only prefill) and a private prompt."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from celslm.errors import CelslmError, IntegrityError, UnavailableError, UsageError
from celslm.models import default_engine, load_model
from .common import (FLAG, MODEL_HELP, ApiTokenOpt, CacheCapacityOpt, CloudOpt, EngineOpt, IdentityOpt, JsonOpt,
                     LinkTokensOpt, MaxNewTokensOpt, PeerOpt, TokenOpt, TrustOpt, cache_capacity, check_link_tokens,
                     err_console, examples, for_option, identity, identity_hint, log, print_json, progress_bar,
                     read_file_or_stdin, read_text, trust_policy, typed, warn)

if TYPE_CHECKING:
    from celslm.decode import DecodeStats

EPILOG = examples(
    "celslm decode -m qwen2.5-coder-0.5b --kv sched.kv --prompt 'What does scheduler.run return?'",
    "celslm decode -m qwen2.5-coder-0.5b --context samples/context/sched.py --prompt 'What does run return?' --stats",
    "celslm prefill -m smollm2-135m -c doc.txt -o - | celslm decode -m smollm2-135m --kv - --prompt 'Summarize.' --json",
    "celslm decode -m qwen2.5-coder-0.5b --kv sched:latest --peer http://peer:8470 --cloud http://cloud:8470 --trust cloud.pub -p 'Why?'",
    "celslm decode -m qwen2.5-coder-0.5b --context sched.py --cloud http://cloud:8470 -p 'Why?'   # cached prefix + local rest",
    "celslm decode -m qwen2.5-coder-0.5b --kv sched-cross.kv --recompute-last 512 -p 'Why?'   # cross-model KV + own recent tokens",
    "celslm decode -m qwen2.5-coder-0.5b --kv models.kv --kv views.kv --kv urls.kv -p 'Which view uses Order?'   # three contexts in one",
    "celslm decode -m qwen2.5-coder-0.5b --engine transformers --kv sched.kv -p 'Why?'   # the fp32 reference engine",
    "celslm decode --server http://127.0.0.1:8480 --kv sched:latest -p 'Why?' --json   # a warm celslm serve answers",
    "celslm decode -m qwen2.5-coder-0.5b --kv notes:latest --cloud http://cloud:8470 --identity edge1.key -p 'Why?'   # an encrypted context",
)


def decode(
    invocation: typer.Context,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The private prompt text, or - for stdin. Never leaves this machine.")],
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="CELSLM_MODEL", show_envvar=True,
                                              help=MODEL_HELP + " Not with --server: the service's model answers.")] = None,
    kv: Annotated[list[str] | None, typer.Option("--kv", help="KV artifact: a directory, .tar file, - (stdin), an artifact id, a tag, or a server URL. Repeat it to compose several contexts prefilled apart, read in the order given.")] = None,
    context: Annotated[str | None, typer.Option("--context", "-c", help="Context file (or -): edge-only without --kv; with --kv, recomputes what cannot be fetched.")] = None,
    max_new_tokens: MaxNewTokensOpt = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling, for repeatable output.")] = None,
    raw: Annotated[bool, typer.Option("--raw", metavar=FLAG, help="Do not apply the model's chat template to the prompt.")] = False,
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    token: TokenOpt = None,
    trust: TrustOpt = None,
    identity_: IdentityOpt = None,
    cache_capacity_: CacheCapacityOpt = None,
    recompute_last: Annotated[int | None, typer.Option("--recompute-last", min=0, help="With --kv: prefill at least the context's last N tokens here (whole chunks), over the artifact's earlier chunks: edge compute for quality with cross-model artifacts. Default: what a cross-model artifact's alignment advises from its measured gain curve (`celslm inspect` shows it), 0 for a native one; 0 turns it off.")] = None,
    link_tokens: LinkTokensOpt = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="With --context and servers: chunk size of the prefix lookup.")] = 256,
    link: Annotated[str | None, typer.Option("--link", help="Emulate a link for the artifact's bytes, RATE[:RTT] (e.g. 100mbit:20ms); numbers are labelled emulated.")] = None,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", metavar=FLAG, help="Run the prompt's layer l as soon as layer l's KV is in (default), or wait for all of it.")] = True,
    stats: Annotated[bool, typer.Option("--stats", metavar=FLAG, help="Print the time split on stderr after generation.")] = False,
    engine: EngineOpt = None,
    server: Annotated[str | None, typer.Option("--server", envvar="CELSLM_SERVER", show_envvar=True, help="Answer through a running `celslm serve` (URL): the model is already loaded, recent contexts already decoded. The context is --kv.")] = None,
    api_token: ApiTokenOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Generate from a KV artifact (or an edge-only prefill) and a private prompt."""
    from celslm.compose import DEFAULT_LINK
    from celslm.decode import Sampling, TextStream, eos_ids  # torch and transformers: not for --help
    from celslm.edge import answer
    from celslm.store.tiers import Sources
    from celslm.stream import Link

    with for_option("--temperature/--top-p"):
        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if server:
        # typed ones only: CELSLM_CLOUD, CELSLM_TRUST and the like set for local decodes do not stop --server
        theirs = [flag for name, flag in (("context", "--context"), ("recompute_last", "--recompute-last"), ("link", "--link"),
                                          ("engine", "--engine"), ("peer", "--peer"), ("cloud", "--cloud"), ("token", "--token"),
                                          ("trust", "--trust"), ("identity_", "--identity")) if typed(invocation, name)]
        if not kv or theirs:
            raise UsageError("--server takes the context as --kv (an id, tag or path the service can read); "
                             f"{', '.join(theirs) or '--context, --peer, --cloud, --trust and the like'} "
                             f"{'is one of' if len(theirs) == 1 else 'are'} the service's own settings")
        if typed(invocation, "model"):
            warn(f"--server answers with the service's own model; -m {model} is not used")
        check_link_tokens(link_tokens, kv)
        return _through_server(server, api_token, kv, link_tokens, read_text(prompt, "--prompt"), sampling, raw, json_)
    if model is None:
        raise UsageError("give --model (-m) or set CELSLM_MODEL (or answer through a celslm serve with --server)")
    if not kv and context is None:
        raise UsageError("give --kv ARTIFACT, --context FILE (edge-only), or both (the context recomputes what cannot be fetched)")
    if recompute_last is not None and not kv:
        raise UsageError("--recompute-last goes with --kv")
    if kv and len(kv) > 1 and context is not None:
        raise UsageError("--context recomputes what one --kv cannot fetch; it does not go with several --kv")
    check_link_tokens(link_tokens, kv)
    if [prompt, context, *(kv or ())].count("-") > 1:
        raise UsageError("only one of --prompt, --kv and --context can read stdin")
    prompt_text = read_text(prompt, "--prompt")
    capacity = cache_capacity(cache_capacity_)
    policy = trust_policy(trust)
    keys = identity(identity_)
    with for_option("--link"):
        shaped = Link.parse(link) if link else None
    context_text = read_file_or_stdin(context, "--context") if context is not None else None
    with progress_bar() as progress, identity_hint():
        with for_option("--engine"):
            engine = default_engine(model, engine)
        loaded = load_model(model, progress, engine=engine)
        result = answer(loaded, prompt_text, kv=kv, context_text=context_text,
                        sources=Sources(tuple(peer or ()), cloud, token, chunk_size, policy, keys, capacity),
                        recompute_last=recompute_last, link_tokens=DEFAULT_LINK if link_tokens is None else link_tokens,
                        link=shaped, pipeline=pipeline, raw=raw, sampling=sampling,
                        progress=lambda done, total: progress("prefill (tokens)", done, total),
                        stdin=sys.stdin.buffer, warn=log)
    ctx = result.context
    stream = TextStream(loaded.tokenizer, skip=eos_ids(loaded))
    pieces = []
    for token in result.tokens:
        piece = stream.push(token)
        pieces.append(piece)
        if not json_ and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = stream.flush()
    pieces.append(tail)
    if not json_:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
    if stats:
        err_console.print(stats_table(ctx.stats))
    if json_:
        print_json({"text": "".join(pieces), "artifact": result.artifact_id, "artifacts": list(result.artifacts),
                    "engine": loaded.engine.name,
                    **ctx.stats.to_json()})


def _through_server(server: str, api_token: str | None, kv: list[str], link_tokens: int | None, prompt: str, sampling,
                    raw: bool, json_: bool) -> None:
    """Stream the answer from a `celslm serve` (its OpenAI-style API), printing text as it comes."""
    import http.client
    import json
    import urllib.error
    import urllib.parse
    import urllib.request
    from pathlib import Path

    from celslm.decode import DecodeStats

    if "-" in kv:
        raise UsageError("--server reads the context from an id, a tag or a path, not stdin")
    kv = [str(Path(ref).resolve()) if Path(ref).exists() else ref for ref in kv]  # the service resolves paths from its own directory
    if raw:
        path, body = "/v1/completions", {"prompt": prompt}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    if link_tokens is not None:
        body["link_tokens"] = link_tokens
    body.update(context=kv[0] if len(kv) == 1 else kv, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                stream=True, **({"seed": sampling.seed} if sampling.seed is not None else {}))
    headers = {"Content-Type": "application/json"}
    if api_token:
        headers["Authorization"] = f"Bearer {api_token}"
    host = urllib.parse.urlsplit(server).hostname or ""
    if host not in ("localhost", "127.0.0.1", "::1"):
        log(f"note: the prompt goes to {server}, the service that answers it")
    request = urllib.request.Request(server.rstrip("/") + path, json.dumps(body).encode(), headers)
    pieces, final = [], {}
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise UnavailableError(f"{server}: {event['error']['message']}")
                choice = event["choices"][0]
                piece = choice.get("text") if raw else choice.get("delta", {}).get("content")
                if piece:
                    pieces.append(piece)
                    if not json_:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                if "celslm" in event:
                    final = event
    except (ValueError, KeyError, IndexError, http.client.HTTPException) as exc:  # a cut or garbled stream
        raise UnavailableError(f"{server}: the answer stream broke off ({type(exc).__name__}: {str(exc)[:120]})") from exc
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message, code = error["message"], error.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = str(exc), None
        if exc.code == 401:
            message += "; give --api-token or CELSLM_API_TOKEN"
        raise _error_of_status(exc.code, code)(f"{server}: {message}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UnavailableError(f"{server}: {getattr(exc, 'reason', exc)}") from exc
    if not final:
        raise UnavailableError(f"{server}: the answer stream ended before its last event (the text so far is incomplete)")
    if not json_:
        sys.stdout.write("\n")
        return
    # decode --json's schema: what the service reports, and null for the parts of the time split it does not
    answered, usage = final.get("celslm", {}), final.get("usage") or {}
    composed = len(kv) > 1
    known = DecodeStats(path="composed" if composed else "artifact", context_tokens=answered.get("context_tokens", 0),
                        recomputed_tokens=answered.get("recomputed_tokens", 0),
                        prompt_tokens=usage.get("prompt_tokens", 0), new_tokens=usage.get("completion_tokens", 0),
                        ttft_s=answered.get("ttft_s", 0.0), total_s=answered.get("total_s", 0.0)).to_json()
    reported = {"path", "pipelined", "link", "context_tokens", "recomputed_tokens", "prompt_tokens", "new_tokens", "ttft_s",
                "total_s", "fallback"}
    parts = answered.get("parts") or ([answered["context"]] if answered.get("context") else [])
    print_json({"text": "".join(pieces), "artifact": None if composed else answered.get("context"), "artifacts": parts,
                "engine": answered.get("engine"),
                **{key: value if key in reported else None for key, value in known.items()}})


def _error_of_status(status: int, code: str | None) -> type:
    """The error (so the exit code) a failure the service answered with `status` has without --server:
    README's "HTTP statuses" table read backwards. 403 is a refused signature (exit 3) or a context
    sealed for others (exit 2); 401 and 403 for the API token are usage (exit 2)."""
    if status == 422 or code == "context_untrusted":
        return IntegrityError
    if status in (400, 401, 403, 404, 409, 502):  # bad request, token, not found, exists, a token upstream
        return UsageError
    return CelslmError if status == 500 else UnavailableError  # 429, 503, 507 and any other: unavailable


def stats_table(s: DecodeStats) -> Table:
    title = f"time split ({s.path}{', pipelined' if s.pipelined else ''}{', ' + s.link if s.link else ''})"
    table = Table(title=title, show_header=True)
    table.add_column("part")
    table.add_column("seconds", justify="right")
    rows = [
        ("T_com_C  cloud compute (from the manifest)", s.t_com_c_s),
        ("T_comm   transfer" + (" (emulated)" if s.link else ""), s.t_comm_s),
        ("T_com_E  edge compute", s.t_com_e_s),
        ("  of which context prefill here", s.context_prefill_s),
        (f"  of which prompt prefill ({s.prompt_tokens} tokens)", s.prompt_prefill_s),
        (f"  of which decode ({s.new_tokens} tokens)", s.generate_s),
        ("time to first token (wall)", s.ttft_s),
        ("total on this machine (wall)", s.total_s),
    ]
    for part, seconds in rows:
        table.add_row(part, f"{seconds:.3f}")
    table.add_row("transfer hidden by pipelining", f"{s.hidden_share:.0%}")
    if s.kv_decode_s:
        table.add_row("artifact decode (wall)", f"{s.kv_decode_s:.3f}")
        table.add_row("  of it while the model loaded", f"{s.kv_decode_hidden:.0%}")
    for source, count in s.bytes_by_source.items():
        table.add_row(f"bytes from {source}", f"{count:,}")
    return table
