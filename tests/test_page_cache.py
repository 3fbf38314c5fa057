"""The page is built once per visitor: a repeated load is replayed, anything that could change it is not."""

from __future__ import annotations

import asyncio

from ui.page_cache import PageCache


class Page:
    """An ASGI app whose page names the cookie it was asked with and counts how often it was built."""

    def __init__(self) -> None:
        self.built = 0

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        self.built += 1
        headers = dict(scope["headers"])
        status = 500 if b"x-fail" in headers else 200
        extra = [(b"set-cookie", b"a=b")] if b"x-set-cookie" in headers else []
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html"), *extra]})
        await send({"type": "http.response.body", "body": b"page for ", "more_body": True})
        await send({"type": "http.response.body", "body": headers.get(b"cookie", b"nobody")})


def _get(cache: PageCache, path: str = "/", method: str = "GET", **headers: str) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def send(message) -> None:  # noqa: ANN001
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]}
    asyncio.run(cache(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_page_is_built_once_per_visitor_and_address():
    page = Page()
    cache = PageCache(page)
    first = _get(cache, host="localhost:7860", user_agent="one", cookie="access-token=alice")
    assert first == (200, b"page for access-token=alice") and page.built == 1
    assert _get(cache, host="localhost:7860", user_agent="another browser", cookie="access-token=alice") == first
    assert page.built == 1 and cache.hits == 1
    assert _get(cache, host="localhost:7860", cookie="access-token=bob") == (200, b"page for access-token=bob")
    _get(cache, host="192.168.1.5:7860", cookie="access-token=alice")  # another address: its own links
    assert page.built == 3


def test_only_whole_plain_page_loads_are_kept():
    page = Page()
    cache = PageCache(page)
    for _ in range(2):
        _get(cache, path="/gradio_api/info")
        _get(cache, method="POST")
        _get(cache, x_fail="1")
        _get(cache, x_set_cookie="1")
    assert page.built == 8 and cache.hits == 0


def test_the_cache_keeps_a_bounded_number_of_pages():
    page = Page()
    cache = PageCache(page, entries=2)
    for name in ("a", "b", "c", "a"):
        _get(cache, cookie=name)
    assert page.built == 4  # "a" had been dropped for "c"
