"""``chatstream`` command line: ``serve`` runs the server, ``chat`` a console chat.

The options are generated from :class:`Settings`' fields, so a setting, its flag, its environment
variable (``CHATSTREAM_<NAME>``) and its help text can never drift apart.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

import uvicorn
from pydantic import ValidationError

from . import __version__
from .settings import Settings

if typing.TYPE_CHECKING:
    from .service import ChatService

# The settings that shape an in-process model: the ones `chat` shares with `serve`.
_CHAT_FIELDS = {"model", "mock", "mock_token_delay", "device", "kv_cache_mb", "max_new_tokens", "context_len",
                "temperature", "top_k", "top_p", "repetition_penalty", "system_prompt", "max_input_chars"}


def _add_settings_options(parser: argparse.ArgumentParser, fields: set[str] | None = None) -> None:
    for name, field in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"CHATSTREAM_{name.upper()}"
        value = field.get_default(call_default_factory=True)
        default = "none" if value in (None, [], "") else value
        # argparse expands %-codes in help texts: a literal "50%" must reach it as "50%%".
        description = (field.description or "").replace("%", "%%")
        help_text = f"{description} (default: {default}; env {env})"
        kind = _scalar_type(field.annotation)
        if typing.get_origin(kind) is list:  # repeatable: --engine-url A --engine-url B
            parser.add_argument(flag, dest=name, action="append", default=None, metavar="URL" if "url" in name else "TEXT",
                                help=f"{description} (env {env})")
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind, "TEXT")
            parser.add_argument(flag, dest=name, type=_parse_as(kind), default=None, metavar=metavar, help=help_text)


def _scalar_type(annotation: Any) -> type:
    """``int`` for ``int | None``, and so on."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _parse_as(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse if kind in (int, float) else str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatstream", description="Streaming chat server for language models.")
    parser.add_argument("--version", action="version", version=f"chatstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the chat server (browser UI, /chat_stream, OpenAI API)",
                           description="Run the chat server. Every option also reads CHATSTREAM_<NAME>.")
    _add_settings_options(serve)
    chat = sub.add_parser(
        "chat", help="chat in the terminal, on a local model or with a running server",
        description="Interactive console chat that streams the reply as it is written. Commands: "
                    "/regenerate, /clear, /exit (or Ctrl+D). Ctrl+C stops a reply; at the prompt it exits.",
    )
    chat.add_argument("--url", dest="url", default=None,
                      help="chat with the chatstream server at this URL (e.g. http://127.0.0.1:8000) "
                           "instead of running a model in this process")
    chat.add_argument("--conversation", dest="conversation", default=None, metavar="ID",
                      help="with --url: go on with this conversation (GET /conversations lists them); "
                           "without it, the conversation used last with that server")
    _add_settings_options(chat, _CHAT_FIELDS)
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
            print(f"chatstream: error: {name}: {str(error['msg']).removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(settings)
    if args.command == "chat":
        return _chat(settings, args)
    return 2


class DrainingServer(uvicorn.Server):
    """uvicorn's server, plus a drain on the first SIGTERM/SIGINT.

    uvicorn stops accepting and waits for open connections; the service meanwhile refuses new
    turns, lets running replies finish for ``drain_timeout_s``, then ends the rest with an error
    event (their partial replies saved), so the process exits in bounded time.
    """

    def __init__(self, config: uvicorn.Config, service: ChatService) -> None:
        super().__init__(config)
        self.service = service
        self.load_error: str | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        watch = asyncio.get_running_loop().create_task(self._stop_if_the_model_fails())
        try:
            await super().serve(sockets)
        finally:
            watch.cancel()

    async def _stop_if_the_model_fails(self) -> None:
        """A model that cannot load (a device it cannot use, a broken file) stops the server: a
        process that answers 503 forever looks alive to a supervisor that would restart or alert."""
        if not await self.service.wait_ready() and self.service.load_error:
            self.load_error = self.service.load_error
            self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(lambda: loop.create_task(self.service.drain()))
        super().handle_exit(sig, frame)


def _serve(settings: Settings) -> int:
    from .logs import configure_server_logging

    configure_server_logging(settings.log_level)  # first: it decides whether tqdm draws progress bars
    from .service import ChatService
    from .web.app import create_app, server_settings
    from .web.server import build_uvicorn_config

    # Everything that can be checked is checked before the model loads: a port in use or a setting
    # that cannot work is an error at once (exit 2), never a server that answers 503.
    try:
        listener = listen(settings.host, settings.port)
    except OSError as exc:
        print(f"chatstream: error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc} "
              "(is another server running there? choose another --port)", file=sys.stderr)
        return 2
    with listener:
        try:
            if not settings.mock and not settings.engine_url:  # a remote engine needs no local model
                from .model_loader import check_model

                check_model(settings.model)
                check_device(settings.device)
            settings = server_settings(settings)
            service = ChatService.from_settings(settings)
        except (ValueError, OSError) as exc:
            print(f"chatstream: error: {exc}", file=sys.stderr)
            return 2
        app = create_app(settings, service)
        host, port = listener.getsockname()[:2]
        print(f"chatstream: serving on http://{_url_host(host)}:{port}  "
              f"(model: {_engine_label(settings)}, "
              f"concurrency {settings.concurrency}, queue {settings.queue_size})", flush=True)
        config = build_uvicorn_config(
            app, host=settings.host, port=port, log_level=settings.log_level.lower(),
            keep_alive_s=settings.keep_alive_s, header_timeout_s=settings.header_timeout_s,
            max_connections=settings.max_connections, graceful_shutdown_s=int(settings.drain_timeout_s) + 5,
            log_config=None,  # configure_server_logging's setup, not uvicorn's
            forwarded_allow_ips=[ip.strip() for ip in settings.forwarded_allow_ips.split(",") if ip.strip()],
        )
        server = DrainingServer(config, service)
        server.run(sockets=[listener])
    if server.load_error:
        print(f"chatstream: error: the model could not be loaded: {server.load_error}", file=sys.stderr)
        return 2
    return 0


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound before the model loads so that a port in use is an error at once."""
    from .web.server import DEFAULT_BACKLOG

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=DEFAULT_BACKLOG)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_device(device: str) -> None:
    """Refuse a torch device this machine cannot run on (ValueError with the reason)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise ValueError(f"--device {device}: chatstream runs on cpu or cuda")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {device}: CUDA is not available here ({why}); use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there is no such GPU ({torch.cuda.device_count()} visible)")


def _engine_label(settings: Settings) -> str:
    if settings.engine_url:
        return "remote at " + ", ".join(settings.engine_url)
    return "mock" if settings.mock else settings.model or "embedded default"


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from .console import run_console

    if args.url and (args.model or args.mock):
        print("chatstream: error: --url talks to a running server; --model and --mock are for a local model",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(name)s: %(message)s")
    if args.conversation and not args.url:
        print("chatstream: error: --conversation needs --url (a local chat keeps no conversations)", file=sys.stderr)
        return 2
    return run_console(settings, url=args.url, conversation=args.conversation)


if __name__ == "__main__":
    sys.exit(main())
