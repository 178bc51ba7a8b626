"""``chatstream serve`` with the engine's own options, for side-by-side engine benchmarks.

    .venv/bin/python -m benchmarks.engine_server --port 8000 --concurrency 16 \\
        [--quantization auto|int8|none] [--no-prefix-caching] [--context-len 1024] [--max-new-tokens 128]

The same app as ``chatstream serve`` (sessions, ``/chat_stream``, ``/v1``, ``/stats/loop_lag``),
built around an ``LLMEngine`` made here, because the server's flags do not (yet) reach the
engine's ``quantization`` and ``enable_prefix_caching``. The model loads before the server starts.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from chatstream import ChatStream, load_model
from chatstream.engine.core.llm_engine import LLMEngine


def build_app(opts: argparse.Namespace) -> FastAPI:
    model, tokenizer = load_model(opts.model)
    engine = LLMEngine(
        model, tokenizer, max_num_seqs=opts.concurrency, max_model_len=opts.context_len,
        enable_prefix_caching=opts.prefix_caching, quantization=opts.quantization,
    )
    chat_stream = ChatStream(
        model=model, tokenizer=tokenizer, engine=engine, num_of_concurrent_executions=opts.concurrency,
        max_queue_size=opts.queue_size, max_new_tokens=opts.max_new_tokens, context_len=opts.context_len,
        session_secret="benchmark",
    )
    gc.collect()  # as ChatStream does for the engines it makes: no full collection walks the model
    gc.freeze()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await chat_stream.start_queue_worker()
        yield
        await chat_stream.shutdown()

    app = FastAPI(title="chatstream engine benchmark", lifespan=lifespan)
    chat_stream.append_middlewares(app)
    chat_stream.append_apis(app)
    chat_stream.append_openai_apis(app)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--queue-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--quantization", choices=("auto", "int8", "none"), default="auto")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    opts = parser.parse_args()
    uvicorn.run(build_app(opts), host=opts.host, port=opts.port, log_level="warning")


if __name__ == "__main__":
    main()
