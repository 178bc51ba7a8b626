"""The seed article's three endpoint examples, verbatim, each in its own app.

Only the setup around them (imports, app and chat_stream construction, middleware and the
recording of callbacks for assertions) is ours; the endpoint bodies are the article's code.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request

from chatstream import ChatStream


def basic_app(chat_stream: ChatStream) -> FastAPI:
    app = FastAPI()
    chat_stream.append_middlewares(app)

    @app.post("/chat_stream")
    async def stream_api(request: Request):
        # handling FastAPI/Starlette's Request
        response = await chat_stream.handle_chat_stream_request(request)
        return response

    return app


def intercept_app(chat_stream: ChatStream, seen: list[Any]) -> FastAPI:
    app = FastAPI()
    chat_stream.append_middlewares(app)

    @app.post("/chat_stream")
    async def stream_api(request: Request):

        # Request を インターセプトする場合
        request_body = await request.body()
        data = json.loads(request_body)

        user_input = data["user_input"]
        regenerate = data["regenerate"]

        print(f"user_input:{user_input} regenerate:{regenerate}")
        seen.append((user_input, regenerate))

        # インターセプトした場合は `request_body` を指定する
        response = await chat_stream.handle_chat_stream_request(request, request_body)

        return response

    return app


def callback_app(chat_stream: ChatStream, calls: list[tuple[str, str]]) -> FastAPI:
    app = FastAPI()
    chat_stream.append_middlewares(app)

    @app.post("/chat_stream")
    async def stream_api(request: Request):

        def callback_func(request, message):
            # 文章生成が終了したとき

            # ここでは、セッションに格納されている ChatPrompt を取得して、これまでの会話履歴をもとにプロンプトを生成する例
            session_mgr = getattr(request.state, "session", None)
            session = session_mgr.get_session()
            chat_prompt = session.get("chat_prompt")
            print(chat_prompt.create_prompt())
            calls.append((message, chat_prompt.create_prompt()))

        pass

        response = await chat_stream.handle_chat_stream_request(request, callback=callback_func)

        return response

    return app
