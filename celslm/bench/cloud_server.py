"""A cloud-only inference process for the concurrency benchmark (not a product command).

It loads the LLM, prefills the shared context once, and answers POST /v1/generate {"prompt": TEXT}
with {"text", "tokens"}: greedy generation over the context, one request at a time (the model is
CPU bound; queueing is what a single cloud process does under load). The cache is cropped back to
the context after each request, so every request sees the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import threading

from aiohttp import web

from celslm import kvcache, prompting
from celslm.decode import Sampling, context_from_ids, generate
from celslm.models import load_model


def make_app(model: str, context_file: str, new_tokens: int) -> web.Application:
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
                kvcache.crop(ctx.cache, len(context_ids))
        return {"text": loaded.tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens)}

    async def generate_handler(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response(await asyncio.to_thread(run, str(body["prompt"])))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/generate", generate_handler)
    app.router.add_get("/v1/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    web.run_app(make_app(args.model, args.context, args.new_tokens), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
