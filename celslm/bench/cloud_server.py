"""Cloud processes for the concurrency benchmark (not a product command).

With --model and --context it loads the LLM, prefills the shared context once, and serves
  POST /v1/generate {"prompt": TEXT} -> {"text", "tokens"}: cloud-only, greedy generation over the
      context;
  POST /v1/defer {"messages": [[token ids], ...]} -> {"tokens": [...]}: CE-CoLLM, each message (the
      tokens the cloud has not seen yet) run over the context in turn, the LLM's next token for each;
one request at a time (the model is CPU bound; queueing is what a single cloud process does under
load). The cache is cropped back to the context after each request, so every request sees the same
state. With --sketch FILE it also serves GET /v1/sketch (PICE: the context's sketch, written once).
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from aiohttp import web

from celslm import prompting
from celslm.decode import Sampling, context_from_ids, generate
from celslm.models import load_model

MAX_DEFER_TOKENS = 4096  # per request: the single lock is held while they run


def _model_routes(app: web.Application, model: str, context_file: str, new_tokens: int) -> None:
    loaded = load_model(model)
    framing = prompting.default_framing(loaded.tokenizer)
    with open(context_file, encoding="utf-8") as handle:
        context_ids = prompting.context_ids(loaded.tokenizer, handle.read(), framing)
    ctx = context_from_ids(loaded, context_ids, framing=framing)
    lock = threading.Lock()

    def run(prompt: str) -> dict:
        with lock:
            ids = prompting.prompt_ids(loaded.tokenizer, prompt, framing, raw=False)
            try:
                tokens = list(generate(loaded, ctx, ids, Sampling(max_new_tokens=new_tokens)))
            finally:
                loaded.engine.crop(ctx.sequence, len(context_ids))
        return {"text": loaded.tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens)}

    def defer(messages: list[list[int]]) -> dict:
        tokens = []
        with lock:
            try:
                for message in messages:
                    tokens.append(int(loaded.engine.evaluate(ctx.sequence, message)[-1].argmax()))
            finally:
                loaded.engine.crop(ctx.sequence, len(context_ids))
        return {"tokens": tokens}

    async def generate_handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(await asyncio.to_thread(run, str(body["prompt"])))

    vocab = loaded.engine.vocab_size

    async def defer_handler(request: web.Request) -> web.Response:
        try:
            messages = (await request.json()).get("messages")
        except (ValueError, AttributeError):
            raise web.HTTPBadRequest(text="the body must be a JSON object") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, list) and m and all(type(t) is int and 0 <= t < vocab for t in m) for m in messages):
            raise web.HTTPBadRequest(text=f"messages: a list of non-empty lists of token ids in 0..{vocab - 1}")
        if sum(map(len, messages)) > MAX_DEFER_TOKENS:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_DEFER_TOKENS, actual_size=sum(map(len, messages)))
        return web.json_response(await asyncio.to_thread(defer, messages))

    app.router.add_post("/v1/generate", generate_handler)
    app.router.add_post("/v1/defer", defer_handler)


def make_app(model: str | None, context_file: str | None, new_tokens: int, sketch_file: str | None = None
             ) -> web.Application:
    app = web.Application()
    if model:
        _model_routes(app, model, context_file, new_tokens)
    if sketch_file:
        with open(sketch_file, encoding="utf-8") as handle:
            sketch = handle.read()

        async def sketch_handler(request: web.Request) -> web.Response:
            return web.Response(text=sketch)

        app.router.add_get("/v1/sketch", sketch_handler)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/v1/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--context")
    parser.add_argument("--sketch")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.model and not args.context:
        parser.error("--model needs --context")
    web.run_app(make_app(args.model, args.context, args.max_new_tokens, args.sketch), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
