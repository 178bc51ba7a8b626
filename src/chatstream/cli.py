"""``chatstream`` command line: ``serve`` runs the server, ``chat`` a console chat.

Every option also reads CHATSTREAM_<NAME>.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from pydantic import ValidationError

from .settings import Settings

# (flag, settings field, type, help). Defaults come from Settings, so the environment applies.
_SERVE_OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "port to listen on"),
    ("--model", "model", str, "local Hugging Face model folder or .gguf file (default: embedded SmolLM2-135M-Instruct)"),
    ("--device", "device", str, "torch device: cpu or cuda"),
    ("--concurrency", "concurrency", int, "generations that run at once (num_of_concurrent_executions)"),
    ("--queue-size", "queue_size", int, "requests that may wait for a slot (max_queue_size)"),
    ("--max-new-tokens", "max_new_tokens", int, "longest reply in tokens"),
    ("--context-len", "context_len", int, "prompt + reply token budget"),
    ("--kv-cache-mb", "kv_cache_mb", int, "KV-cache memory budget in MiB (default: from free memory)"),
    ("--temperature", "temperature", float, "sampling temperature (0 = greedy)"),
    ("--system-prompt", "system_prompt", str, "system message for new conversations"),
    ("--api-key", "api_key", str, "require this bearer key on /v1/*"),
    ("--log-level", "log_level", str, "log level"),
]

# The `serve` options that `chat` shares: they shape the in-process model (ignored with --url).
_CHAT_OPTIONS = [o for o in _SERVE_OPTIONS if o[1] in
                 {"model", "device", "max_new_tokens", "context_len", "temperature", "system_prompt"}]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat server for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the chat server (browser UI, /chat_stream, OpenAI API)")
    for flag, field, kind, help_text in _SERVE_OPTIONS:
        env = f"CHATSTREAM_{field.upper()}"
        serve.add_argument(flag, dest=field, type=kind, default=None, help=f"{help_text} [env {env}]")
    serve.add_argument("--mock", dest="mock", action="store_const", const=True, default=None,
                       help="stream canned text without a model [env CHATSTREAM_MOCK]")
    chat = sub.add_parser(
        "chat", help="chat in the terminal, on a local model or with a running server",
        description="Interactive console chat that streams the reply as it is written. Commands: "
                    "/regenerate, /clear, /exit (or Ctrl+D). Ctrl+C stops a reply; at the prompt it exits.",
    )
    chat.add_argument("--url", dest="url", default=None,
                      help="chat with the chatstream server at this URL (e.g. http://127.0.0.1:8000) "
                           "instead of running a model in this process")
    for flag, field, kind, help_text in _CHAT_OPTIONS:
        env = f"CHATSTREAM_{field.upper()}"
        chat.add_argument(flag, dest=field, type=kind, default=None, help=f"{help_text} [env {env}]")
    chat.add_argument("--mock", dest="mock", action="store_const", const=True, default=None,
                      help="stream canned text without a model [env CHATSTREAM_MOCK]")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        for error in exc.errors():
            name = "--" + str(error["loc"][0]).replace("_", "-") if error["loc"] else "settings"
            print(f"chatstream: error: {name}: {error['msg']}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(settings)
    if args.command == "chat":
        return _chat(settings, args)
    return 2


def _serve(settings: Settings) -> int:
    import uvicorn

    from .web.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    print(f"chatstream: serving on http://{settings.host}:{settings.port}  "
          f"(model: {'mock' if settings.mock else settings.model or 'embedded default'}, "
          f"concurrency {settings.concurrency}, queue {settings.queue_size})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from .console import run_console

    if args.url and (args.model or args.mock):
        print("chatstream: error: --url talks to a running server; --model and --mock are for a local model",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    return run_console(settings, url=args.url)


if __name__ == "__main__":
    sys.exit(main())
