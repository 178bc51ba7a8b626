"""``/conversations``: several conversations per user, each with a title and its own settings.

Usable without the UI::

    GET    /conversations          -> {"conversations": [summary, ...] (newest first), "current": id|null, "limit": n}
    POST   /conversations          {"title"?, "settings"?}            -> 201 summary (it becomes current)
    GET    /conversations/{id}     -> summary + {"messages": [...]} (a reply also says how it ended: "details")
    PATCH  /conversations/{id}     {"title"?, "settings"?, "current"?: true, "select"?: {"message", "version"}} -> summary
    DELETE /conversations/{id}     -> {"deleted": id, "current": id|null}
    GET    /settings               -> {"server": {defaults}, "limits": {...}, "defaults": {the user's, for all chats}}
    PATCH  /settings               {"defaults": {settings}}             -> the same as GET

A summary is ``{"id", "title", "created", "updated", "message_count", "settings"}``. Renaming,
settings and creating change only the session's small index (under its lock, held for
milliseconds), so they work while replies stream; ``select`` and DELETE take the conversation's
own lock, so they are refused (409 ``session_busy``, naming the conversation) while a reply is
being written into it; an id this session does not hold, another user's included, is 404 and
nothing more.
``select`` picks which answer of a regenerated reply the conversation goes on from (``version``
indexes the reply's answers oldest first: its ``alternatives`` with ``content`` at ``version``), or,
at a user message that was edited, which of its versions (``branches`` with the messages shown at
``branch``), and the conversation goes on with the messages that followed that version.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from ..errors import ChatError, InputTooLarge, InvalidRequest, LeaseLost
from ..service import ChatService
from ..service import conversations as book
from ..service.sampling import SamplingLimits
from ..session import Session
from .chat_request import parse_json_object
from .chat_stream import _session_of, chat_error_response
from .json_body import require_json
from .large_json import json_with_list
from .limits import BodyTimeout, BodyTooLarge, read_request_body

logger = logging.getLogger("chatstream")

_CREATE_FIELDS = {"title", "settings"}
_PATCH_FIELDS = {"title", "settings", "current", "select"}


def add_conversation_routes(app: Any, service: ChatService) -> None:
    routes = _ConversationRoutes(service)
    app.add_route("/conversations", routes.list_or_create, methods=["GET", "POST"])
    app.add_route("/conversations/{conversation_id}", routes.one, methods=["GET", "PATCH", "DELETE"])
    app.add_route("/settings", routes.settings, methods=["GET", "PATCH"])


class _ConversationRoutes:
    def __init__(self, service: ChatService) -> None:
        self.service = service

    async def list_or_create(self, request: Request) -> Response:
        try:
            if request.method == "GET":
                return await self._list(_session_of(request))
            return await self._create(request)
        except ChatError as exc:
            return chat_error_response(exc)

    async def one(self, request: Request) -> Response:
        try:
            conversation_id = book.check_id(request.path_params["conversation_id"])
            session = _session_of(request)
            if request.method == "GET":
                return await self._read(session, conversation_id)
            if request.method == "DELETE":
                return await self._delete(session, conversation_id)
            return await self._patch(request, session, conversation_id)
        except ChatError as exc:
            return chat_error_response(exc)

    async def settings(self, request: Request) -> Response:
        """The server's defaults and limits (what a settings form shows), and the user's defaults for all chats."""
        try:
            session = _session_of(request)
            if request.method == "GET":
                data = await self.service.read_index(session)
                return JSONResponse(self._settings_view(book.session_defaults(data)))
            body = await _json_object(request, {"defaults"}, allow_empty=False, **self._body_limits())

            def change(data: dict[str, Any]) -> dict[str, Any]:  # the defaults live in the session's index
                defaults = self._settings(body["defaults"], book.session_defaults(data))
                if defaults:
                    data[book.DEFAULTS_KEY] = defaults
                else:
                    data.pop(book.DEFAULTS_KEY, None)
                return defaults

            return JSONResponse(self._settings_view(await self.service.update_index(session, change)))
        except ChatError as exc:
            return chat_error_response(exc)

    def _settings_view(self, defaults: dict[str, Any]) -> dict[str, Any]:
        server, settings = self.service.defaults, self.service.settings
        return {
            "server": {"system_prompt": settings.system_prompt, "temperature": server.temperature,
                       "top_p": server.top_p, "max_tokens": server.max_new_tokens, "top_k": server.top_k,
                       "seed": server.seed, "stop": list(server.stop)},
            "limits": {"temperature": book.MAX_TEMPERATURE, "max_tokens": settings.max_new_tokens,
                       "top_k": self.service.vocab_size, "stop": book.MAX_STOP_STRINGS,
                       "stop_chars": book.MAX_STOP_CHARS, "system_prompt_chars": settings.max_input_chars},
            "defaults": defaults,
        }

    async def _list(self, session: Session) -> Response:
        data = await self.service.read_index(session)
        return JSONResponse({
            "conversations": [book.summary(cid, entry) for cid, entry in book.ordered(data)],
            "current": data.get(book.CURRENT_KEY),
            "limit": book.MAX_CONVERSATIONS,
        })

    async def _read(self, session: Session, conversation_id: str) -> Response:
        data = await self.service.read_index(session)
        entry = book.get(data, conversation_id)
        messages = await self.service.history(session, conversation_id, details=True)
        return await json_with_list(book.summary(conversation_id, entry), "messages", messages)

    async def _create(self, request: Request) -> Response:
        body = await _json_object(request, _CREATE_FIELDS, allow_empty=True, **self._body_limits())
        title = book.parse_title(body["title"]) if "title" in body else ""
        settings = self._settings(body["settings"]) if "settings" in body else {}
        session = _session_of(request)

        def create(data: dict[str, Any]) -> dict[str, Any]:
            conversation_id = book.create_conversation(data, title, settings)
            return book.summary(conversation_id, book.get(data, conversation_id))

        return JSONResponse(await self.service.update_index(session, create), status_code=201)

    async def _patch(self, request: Request, session: Session, conversation_id: str) -> Response:
        body = await _json_object(request, _PATCH_FIELDS, allow_empty=False, **self._body_limits())
        title = book.parse_title(body["title"]) if "title" in body else None
        if "current" in body and body["current"] is not True:
            raise InvalidRequest("'current' can only be true (make this the current conversation)", param="current")
        select = _parse_select(body["select"]) if "select" in body else None
        if session.is_new:
            raise book.ConversationNotFound(f"there is no conversation {conversation_id!r} in this session")
        book.get(await self.service.read_index(session), conversation_id)
        # Settings are checked before anything is written, against the stored ones.
        settings = None
        if "settings" in body:
            current = book.get(await self.service.read_index(session), conversation_id).get("settings")
            settings = self._settings(body["settings"], current)

        def change(data: dict[str, Any]) -> dict[str, Any]:
            entry = book.get(data, conversation_id)
            if title is not None:
                entry["title"] = title
                entry.pop(book.AUTO_TITLE_KEY, None)  # renamed: edits of the first message no longer retitle it
            if settings is not None:
                entry["settings"] = settings
            if body.get("current"):
                data[book.CURRENT_KEY] = conversation_id
            return book.summary(conversation_id, entry)

        if select is None:
            return JSONResponse(await self.service.update_index(session, change))
        # Picking an answer rewrites the conversation's messages: that takes its own lock.
        async with self.service.hold_conversation(session, conversation_id) as lease:
            stored = await self.service.read_chat_prompt_data(session, conversation_id)
            prompt = self.service.chat_prompt_clazz.from_dict(stored if isinstance(stored, dict) else None)
            try:
                prompt.select_version(*select)
            except IndexError as exc:
                raise InvalidRequest(str(exc), param="select") from None
            await session.put_part(conversation_id, {**(stored or {}), **prompt.to_dict()}, lease)

            def change_and_count(data: dict[str, Any]) -> dict[str, Any]:
                book.get(data, conversation_id)["message_count"] = len(prompt.messages)  # a branch has its own
                return change(data)

            return JSONResponse(await self.service.update_index(session, change_and_count))

    async def _delete(self, session: Session, conversation_id: str) -> Response:
        if session.is_new:
            raise book.ConversationNotFound(f"there is no conversation {conversation_id!r} in this session")
        book.get(await self.service.read_index(session), conversation_id)
        async with self.service.hold_conversation(session, conversation_id) as lease:

            def delete(data: dict[str, Any]) -> Any:
                book.delete(data, conversation_id)
                return data.get(book.CURRENT_KEY)

            current = await self.service.update_index(session, delete)
            try:
                await session.delete_part(conversation_id, lease)
            except LeaseLost:
                # The index no longer lists it, so it is deleted for the user: say so (a 409 here made
                # the Redis soak's user think the conversation was still there). Its messages stay
                # until the session expires, and a turn that took the lock meanwhile may bring it back.
                logger.warning("conversation %s… deleted from the index; its messages were left (lease lost)",
                               conversation_id[:8])
        return JSONResponse({"deleted": conversation_id, "current": current})

    def _body_limits(self) -> dict[str, Any]:
        # Bounded here too: the routes may run in an app without chatstream's body-limit middleware.
        return {"max_bytes": self.service.settings.max_body_bytes, "timeout_s": self.service.settings.body_timeout_s}

    def _settings(self, value: Any, current: Any = None) -> dict[str, Any]:
        service = self.service
        limits = SamplingLimits(max_new_tokens=service.settings.max_new_tokens, vocab_size=service.vocab_size)
        return book.parse_settings(value, service.defaults, limits, service.max_input_chars,
                                   current if isinstance(current, dict) else None)


def _parse_select(value: Any) -> tuple[int, int]:
    def index(name: str) -> int:
        number = value.get(name) if isinstance(value, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 1 << 31:
            raise InvalidRequest(f"'select.{name}' must be an integer from 0", param=f"select.{name}")
        return number

    if not isinstance(value, dict) or set(value) != {"message", "version"}:
        raise InvalidRequest("'select' must be {\"message\": <index of a reply>, \"version\": <index of its answer>}",
                             param="select")
    return index("message"), index("version")


async def _json_object(request: Request, fields: set[str], *, allow_empty: bool, max_bytes: int,
                       timeout_s: float) -> dict[str, Any]:
    if require_json(request) is not None:
        raise InvalidRequest("send the body as 'application/json'")
    try:
        raw = await read_request_body(request, max_bytes, timeout_s)
    except BodyTooLarge:
        raise InputTooLarge(f"the request body is larger than {max_bytes} bytes") from None
    except (BodyTimeout, ClientDisconnect):
        raise InvalidRequest("the request body did not arrive") from None
    if not raw.strip() and allow_empty:
        return {}
    data = parse_json_object(raw, fields)
    if not data and not allow_empty:
        raise InvalidRequest(f"nothing to change: send one of {', '.join(sorted(fields))}")
    return data
