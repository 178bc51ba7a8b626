"""A JSON answer that may be megabytes (a long conversation), encoded without stalling the event loop.

``json.dumps`` runs in C and holds the GIL for the whole document: a 25 MB conversation took
0.2-0.5 s, during which no other user's request was served, and a thread does not help (it holds
the same GIL). Here the list is encoded item by item into chunks of about 64 KiB, yielding to the
loop between chunks, and sent chunk by chunk (no 25 MB copy on the loop either), with its
``Content-Length``. The bytes are exactly what Starlette's ``JSONResponse`` sends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

_CHUNK = 64 * 1024  # characters encoded between two yields to the loop


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


async def json_with_list(head: dict[str, Any], key: str, items: list[Any], status_code: int = 200) -> StreamingResponse:
    """``{**head, key: items}`` as ``JSONResponse`` encodes it, yielding to the loop every 64 KiB."""
    opening = _dumps({**head, key: []})
    batch = [opening[:-2]]  # '{..., "key":[' : the list is written item by item
    size = len(batch[0])
    chunks: list[bytes] = []
    for n, item in enumerate(items):
        text = _dumps(item)
        batch.append("," + text if n else text)
        size += len(text)
        if size >= _CHUNK:
            chunks.append("".join(batch).encode("utf-8"))
            batch, size = [], 0
            await asyncio.sleep(0)
    batch.append("]}")
    chunks.append("".join(batch).encode("utf-8"))

    async def send() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0)

    length = str(sum(len(chunk) for chunk in chunks))
    return StreamingResponse(send(), status_code=status_code, media_type="application/json",
                             headers={"content-length": length})
