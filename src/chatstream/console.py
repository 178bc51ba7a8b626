"""Console chat (``chatstream chat``): a terminal conversation that streams tokens as they come.

Two backends answer the same events, so the terminal loop does not care where the text comes from:

- :class:`LocalChat` runs :class:`~chatstream.service.Turn` s of a :class:`ChatService` in this
  process (a local model, or the mock engine). No HTTP in between: an in-process ASGI transport
  would buffer the whole reply instead of streaming it.
- :class:`RemoteChat` speaks ``/chat_stream`` Server-Sent Events to a running server, keeping
  the session cookie so the server keeps the history.

Events are ``(kind, value)`` pairs: ``("queued", position)``, ``("delta", text)``,
``("done", info)`` and ``("error", message)``; a reply ends after ``done`` or ``error``.
Commands: ``/regenerate``, ``/clear``, ``/exit``. Ctrl+C stops a reply; at the prompt it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import httpx

from .errors import ChatError, NothingToRegenerate
from .service.events import Delta, Done, Queued
from .settings import Settings

if TYPE_CHECKING:
    from .service import ChatService

ReplyEvent = tuple[str, Any]

# Worth rendering: emphasis, code, headings, lists, quotes, links, tables.
_MARKDOWN_MARKS = re.compile(r"(\*\*|__|`|^#{1,6} |^\s*([-*+]|\d+[.)]) |^>|\]\(|^\|)", re.M)

HELP = "Commands: /regenerate  /clear  /exit (or Ctrl+D).  Ctrl+C stops a reply; at the prompt it exits."


class ChatBackend(Protocol):
    """Where replies come from. ``reply(None)`` regenerates the last reply."""

    description: str

    async def start(self) -> None: ...

    def reply(self, user_input: str | None) -> AsyncGenerator[ReplyEvent, None]: ...

    async def clear(self) -> None: ...

    async def aclose(self) -> None: ...


class ConsoleError(Exception):
    """A failure to show the user as one line (server unreachable, model missing, ...)."""


# -- in process --------------------------------------------------------------------------------

class LocalChat:
    """A conversation in this process: turns of ``service`` in a private in-memory session.

    The same :class:`~chatstream.service.Turn` as the server's, so admission, truncation, saving
    and cancellation behave exactly as they do over HTTP.
    """

    def __init__(self, service: ChatService) -> None:
        from .session import MemorySessionStore, Session

        self.service = service
        self.session = Session(MemorySessionStore(), "console", is_new=False, ttl_s=365 * 24 * 3600)
        self.description = f"{service.model_name} (in this process)"

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalChat:
        """Load ``settings.model`` (the embedded default if unset), or the mock engine with ``settings.mock``."""
        from .model_loader import GGUF_WEIGHTS, ModelNotFoundError, load_model
        from .service import ChatService

        settings = settings.model_copy(update={"concurrency": 1, "queue_size": 0})
        if settings.mock:
            return cls(ChatService.from_settings(settings))
        try:
            model, tokenizer = load_model(settings.model, device=settings.device,
                                          quantized=GGUF_WEIGHTS[settings.gguf_weights])
        except ModelNotFoundError as exc:
            raise ConsoleError(str(exc)) from None
        return cls(ChatService.from_settings(settings, model=model, tokenizer=tokenizer))

    async def start(self) -> None:
        await self.service.start()

    async def reply(self, user_input: str | None) -> AsyncGenerator[ReplyEvent, None]:
        turn = self.service.session_turn(self.session, self.service.defaults, user_input=user_input,
                                         regenerate=user_input is None, face="console")
        try:
            await turn.start()
        except ChatError as exc:
            message = "there is no reply to regenerate yet" if isinstance(exc, NothingToRegenerate) else exc.message
            yield ("error", message)
            return
        try:
            async for event in turn.events():
                if isinstance(event, Queued):
                    yield ("queued", event.position)
                elif isinstance(event, Delta):
                    yield ("delta", event.text)
                elif isinstance(event, Done):
                    yield ("done", {"finish_reason": event.finish_reason, "usage": {
                        "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}})
                else:
                    yield ("error", event.message)
        finally:
            # Stopped (Ctrl+C) or finished, like the server: keep what was shown.
            turn.cancel()
            await turn.wait()

    async def clear(self) -> None:
        await self.service.clear_conversation(self.session)
        self.session.is_new = False  # the console keeps one private session, whatever its id

    async def aclose(self) -> None:
        await self.service.shutdown()


# -- against a server ---------------------------------------------------------------------------

class RemoteChat:
    """A conversation held by a chatstream server at ``url``, through ``/chat_stream``.

    With ``session_file``, the session cookie for ``url`` is kept there between runs, so a later
    ``chatstream chat --url`` goes on with the same conversations: ``conversation`` (an id from
    ``GET /conversations``), or else the one used last.
    """

    def __init__(self, url: str, client: httpx.AsyncClient | None = None, busy_retry_s: float = 3.0,
                 *, conversation: str | None = None, session_file: Path | None = None) -> None:
        self.url = url.rstrip("/")
        # No read timeout: a reply may wait long in the queue between events.
        self.client = client or httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(10.0, read=None))
        self.busy_retry_s = busy_retry_s
        self.description = self.url
        self.conversation = conversation
        self.session_file = session_file
        if session_file is not None:
            cookie = _saved_sessions(session_file).get(self.url)
            if isinstance(cookie, str):
                self.client.cookies.set(_SESSION_COOKIE, cookie)

    async def start(self) -> None:
        try:
            health = await self.client.get("/health")
        except httpx.TransportError as exc:
            raise ConsoleError(f"cannot reach {self.url}: {_transport_reason(exc)}") from None
        try:
            info = health.json()
        except ValueError:
            raise ConsoleError(f"{self.url} does not look like a chatstream server (GET /health: {health.status_code})") from None
        model = info.get("model", "?") if isinstance(info, dict) else "?"
        state = "" if health.status_code == 200 else f", {info.get('status', 'not ready')}"
        self.description = f"{model} at {self.url}{state}"
        resumed = await self._resume()
        if resumed:
            self.description += f"\nresuming {resumed}"

    async def _resume(self) -> str | None:
        """Check ``--conversation`` (or find the last one); a line saying which, or None for a new chat."""
        try:
            if self.conversation is not None:
                response = await self.client.get(f"/conversations/{self.conversation}")
                if response.status_code != 200:
                    raise ConsoleError(f"no conversation {self.conversation!r} here: "
                                       f"{_error_message(response, response.content)}")
                found = response.json()
            else:
                response = await self.client.get("/conversations")
                listed = response.json() if response.status_code == 200 else {}
                current = listed.get("current") if isinstance(listed, dict) else None
                found = next((c for c in listed.get("conversations", []) if c.get("id") == current), None) if current else None
        except httpx.TransportError as exc:
            raise ConsoleError(f"connection to {self.url} failed: {_transport_reason(exc)}") from None
        except ValueError:
            return None  # a server without /conversations: a plain chat
        if not found:
            return None
        count = found.get("message_count", len(found.get("messages", [])))
        return f"\u201c{found.get('title') or 'Untitled'}\u201d ({count} messages, id {found.get('id')})"

    async def reply(self, user_input: str | None) -> AsyncGenerator[ReplyEvent, None]:
        body: dict[str, Any] = {"regenerate": True} if user_input is None else {"user_input": user_input}
        if self.conversation is not None:
            body["conversation_id"] = self.conversation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.busy_retry_s
        try:
            while True:
                async with self.client.stream(
                    "POST", "/chat_stream", json=body, headers={"accept": "text/event-stream"}
                ) as response:
                    if response.status_code == 409 and loop.time() < deadline:
                        # The reply we just stopped is still being saved on the server.
                        await asyncio.sleep(0.1)
                        continue
                    if response.status_code != 200:
                        yield ("error", _error_message(response, await response.aread()))
                        return
                    self._save_session()
                    async for event in _sse_events(response):
                        yield event
                    return
        except httpx.TransportError as exc:
            yield ("error", f"connection to {self.url} failed: {_transport_reason(exc)}")

    async def clear(self) -> None:
        try:
            params = {"conversation_id": self.conversation} if self.conversation else None
            if params is None:  # empty the current conversation only, not every conversation of the session
                listed = await self.client.get("/conversations")
                current = listed.json().get("current") if listed.status_code == 200 else None
                params = {"conversation_id": current} if current else None
            response = await self.client.post("/clear_context", params=params)
            self._save_session()
        except httpx.TransportError as exc:
            raise ConsoleError(f"connection to {self.url} failed: {_transport_reason(exc)}") from None
        if response.status_code != 200:
            raise ConsoleError(_error_message(response, response.content))

    async def aclose(self) -> None:
        await self.client.aclose()

    def _save_session(self) -> None:
        cookie = self.client.cookies.get(_SESSION_COOKIE)
        if self.session_file is None or not cookie:
            return
        sessions = _saved_sessions(self.session_file)
        if sessions.get(self.url) == cookie:
            return
        sessions[self.url] = cookie
        with contextlib.suppress(OSError):  # not being able to remember is no reason to stop chatting
            self.session_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.session_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a cookie is a credential
            with os.fdopen(fd, "w") as f:
                json.dump(sessions, f)


_SESSION_COOKIE = "chatstream_session"


def _saved_sessions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


async def _sse_events(response: httpx.Response) -> AsyncIterator[ReplyEvent]:
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()
        elif not line and data:
            payload = json.loads(data)
            if event == "queued":
                yield ("queued", payload.get("position"))
            elif event == "delta":
                yield ("delta", payload.get("text", ""))
            elif event == "done":
                yield ("done", payload)
            elif event == "error":
                yield ("error", payload.get("message") or payload.get("error") or "the server reported an error")
            event, data = "message", ""


def _error_message(response: httpx.Response, body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        data = {}
    message = data.get("message") if isinstance(data, dict) else None
    if response.status_code == 503 and isinstance(data, dict) and data.get("error") == "too_many_requests":
        retry = response.headers.get("retry-after")
        return "the server is busy (all generation slots and its queue are full)" + (
            f"; try again in {retry} s" if retry else "; try again later")
    return f"{message or body.decode(errors='replace')[:200] or 'no details'} (HTTP {response.status_code})"


def _transport_reason(exc: httpx.TransportError) -> str:
    cause: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> anyio -> the socket's own error
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__


# -- the terminal ---------------------------------------------------------------------------------

class Console:
    """The interactive loop: read a line, stream the reply, repeat.

    It runs each reply as one task on a persistent event loop (``asyncio.Runner``), so Ctrl+C
    cancels that task: the generation stops (or the server sees the client leave) and the next
    prompt appears. Ctrl+C or Ctrl+D at the prompt ends the chat.
    """

    def __init__(self, backend: ChatBackend, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.backend = backend
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._tty = self.out.isatty()
        self._column0 = True  # is the cursor at the start of a line?

    def run(self) -> int:
        if self._tty and sys.stdin.isatty():
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        with asyncio.Runner() as runner:
            try:
                try:
                    runner.run(self.backend.start())
                except ConsoleError as exc:
                    self._error(str(exc))
                    return 1
                self._write(f"chatstream chat: {self.backend.description}\n{HELP}\n")
                self._loop(runner)
                return 0
            except KeyboardInterrupt:
                self._write("\n")
                return 130
            finally:
                with contextlib.suppress(Exception, KeyboardInterrupt):
                    runner.run(self.backend.aclose())

    def _loop(self, runner: asyncio.Runner) -> None:
        while True:
            try:
                self._column0 = True
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                self._write("\n")
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.split()[0].lower()
                if command in ("/exit", "/quit"):
                    return
                if command == "/help":
                    self._write(HELP + "\n")
                    continue
                if command == "/clear":
                    try:
                        runner.run(self.backend.clear())
                        self._write("(conversation cleared)\n")
                    except ConsoleError as exc:
                        self._error(str(exc))
                    continue
                if command != "/regenerate":
                    self._error(f"unknown command {command}. {HELP}")
                    continue
            try:
                runner.run(self._show_reply(None if text.startswith("/") else text))
            except KeyboardInterrupt:
                self._write("[stopped]\n" if self._column0 else " [stopped]\n")

    async def _show_reply(self, user_input: str | None) -> None:
        prefixed = status_shown = False
        shown = ""  # the reply as streamed, to draw again as Markdown at its end
        async with contextlib.aclosing(self.backend.reply(user_input)) as events:
            async for kind, value in events:
                if kind == "queued":
                    status = f"[waiting in the queue: position {value}]"
                    if self._tty:  # one line, rewritten in place
                        self._write(f"\r\x1b[Kassistant> {status}")
                        prefixed = status_shown = True
                    else:
                        self._write(("" if self._column0 else "\n") + status + "\n")
                elif kind == "delta":
                    if status_shown:
                        self._write("\r\x1b[K")
                        prefixed = status_shown = False
                    if not prefixed:
                        self._write("assistant> ")
                        prefixed = True
                    self._write(value)
                    shown += value
                elif kind == "done":
                    self._end_line()
                    self._render_markdown(shown)
                    if isinstance(value, dict) and value.get("finish_reason") == "length":
                        self._write("[reply cut at the token limit]\n")
                elif kind == "error":
                    self._end_line()
                    self._error(str(value))

    def _render_markdown(self, text: str) -> None:
        """On a terminal, draw the finished reply again as Markdown (rich) over its plain stream.

        The plain text streams as it comes (nothing to re-layout per token); at the end it is
        erased and drawn rendered, when it has any Markdown and still fits on the screen.
        """
        if not self._tty or not _MARKDOWN_MARKS.search(text):
            return
        try:
            from rich.cells import cell_len
            from rich.console import Console as RichConsole
            from rich.markdown import Markdown
        except ImportError:
            return
        size = shutil.get_terminal_size()
        rows = sum(max(1, -(-cell_len(line) // size.columns)) for line in f"assistant> {text}".split("\n"))
        if rows >= size.lines:
            return  # part of it scrolled away: it cannot be redrawn in place
        self._write(f"\x1b[{rows}A\r\x1b[J" if rows else "\r\x1b[J")
        rich = RichConsole(file=self.out, width=size.columns, force_terminal=True, highlight=False)
        rich.print("[bold]assistant>[/bold]")
        rich.print(Markdown(text, code_theme="monokai"))
        self._column0 = True

    def _end_line(self) -> None:
        if not self._column0:
            self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._column0 = text.endswith("\n")

    def _error(self, message: str) -> None:
        self.out.flush()
        self.err.write(f"error: {message}\n")
        self.err.flush()


def run_console(settings: Settings | None = None, url: str | None = None, conversation: str | None = None) -> int:
    """Run ``chatstream chat``: against the server at ``url``, else in this process. Returns the exit code.

    Against a server, the session is remembered in the data folder, so the next run goes on with
    ``conversation`` or else the conversation used last.
    """
    settings = settings or Settings()
    backend: ChatBackend
    if url:
        backend = RemoteChat(url, conversation=conversation,
                             session_file=settings.resolved_data_dir / "console-sessions.json")
    else:
        if not settings.mock:
            print(f"chatstream chat: loading {settings.model or 'the embedded default model'} ...", flush=True)
        try:
            backend = LocalChat.from_settings(settings)
        except ConsoleError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return Console(backend).run()
