"""The app's page, built once per visitor instead of on every load.

Gradio renders its index page anew for each request: it deep-copies the app's config and API description
(about 0.7 MB for this app) and writes code snippets for every endpoint, 100 ms of pure Python that competes
with training and every poll. The page depends only on the request's path and query, its cookies (the login)
and the headers that name the address the browser used; the app's layout never changes after launch. So the
first answer to each such request is kept and replayed.

An ASGI middleware, given to gradio's launch as `app_kwargs={"middleware": [page_cache_middleware()]}`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PAGE_PATHS = frozenset({"/", ""})
ENTRIES = 32  # visitors × addresses; each entry is one page (~0.7 MB)
# Request headers that cannot change the page; every other header is part of the key, so a header this list does
# not know about costs a rebuild, never a wrong page. Also ignored: the browsers' sec-* fetch metadata.
IGNORED_HEADERS = frozenset({
    b"accept", b"accept-encoding", b"accept-language", b"cache-control", b"connection", b"dnt", b"if-modified-since",
    b"if-none-match", b"pragma", b"priority", b"referer", b"upgrade-insecure-requests", b"user-agent",
})


class PageCache:
    """Keeps the 200 answers to GET requests of the page, keyed by everything in the request that matters."""

    def __init__(self, app: ASGIApp, entries: int = ENTRIES) -> None:
        self.app = app
        self.entries = entries
        self._pages: OrderedDict[tuple, tuple[int, list, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] not in PAGE_PATHS:
            await self.app(scope, receive, send)
            return
        key = page_key(scope)
        with self._lock:
            page = self._pages.get(key)
            if page is not None:
                self._pages.move_to_end(key)
                self.hits += 1
        if page is not None:
            status, headers, body = page
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, self._recording(key, send))

    def _recording(self, key: tuple, send: Send) -> Send:
        """`send`, keeping a copy of a whole 200 answer that sets no cookie."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False) and cacheable(start):
                    self._keep(key, (start["status"], list(start.get("headers", [])), b"".join(chunks)))
            await send(message)

        return record

    def _keep(self, key: tuple, page: tuple[int, list, bytes]) -> None:
        with self._lock:
            self._pages[key] = page
            self._pages.move_to_end(key)
            while len(self._pages) > self.entries:
                self._pages.popitem(last=False)


def page_key(scope: Scope) -> tuple:
    headers = tuple(sorted((name.lower(), value) for name, value in scope.get("headers", ())
                           if name.lower() not in IGNORED_HEADERS and not name.lower().startswith(b"sec-")))
    return scope["path"], scope.get("query_string", b""), scope.get("root_path", ""), scope.get("scheme"), headers


def cacheable(start: dict[str, Any]) -> bool:
    headers = {name.lower() for name, _ in start.get("headers", ())}
    return start.get("status") == 200 and b"set-cookie" not in headers


def page_cache_middleware() -> Any:  # noqa: ANN401 - a starlette Middleware
    """The middleware entry for gradio's launch(app_kwargs=...)."""
    from starlette.middleware import Middleware

    return Middleware(PageCache)
