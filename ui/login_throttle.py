"""Wrong passwords cost time: after a few failed logins from one address, that address waits before its next try.

Gradio (6.31) checks the login in its own `POST /login` route (routes.py: 400 "Incorrect credentials." or 200 with
the session cookie) and hands an `auth` callable only the user name and password, never the request, so the
address is known only around the route. This ASGI middleware, given to launch() as
`app_kwargs={"middleware": [...]}` beside the page cache, watches that route: the first FREE_FAILURES wrong
passwords in a row from an address cost nothing (typos); after that the address must wait FIRST_WAIT_S, doubling
with each further failure up to LONGEST_WAIT_S, and a login it sends earlier is answered 429 with Retry-After
without being checked. The right password resets the address. The wait never grows past LONGEST_WAIT_S, so the
right user behind a shared address (a share link's tunnel, a NAT) is kept out for half a minute at most, never
locked out; the terminal notes each address that goes on failing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ui.page_cache import ASGIApp, Message, Receive, Scope, Send

LOGIN_PATHS = frozenset({"/login", "/login/"})
FREE_FAILURES = 3
FIRST_WAIT_S = 2.0
LONGEST_WAIT_S = 30.0
FORGET_AFTER_S = 15 * 60.0  # an address that has not failed for this long starts afresh
TRACKED = 4096  # addresses remembered at most (the oldest are forgotten first)
REFUSED = 429
WRONG = 400  # gradio's answer to a wrong user name or password


@dataclass
class Failures:
    count: int
    last: float  # clock time of the latest failure


class LoginThrottle:
    """The middleware; `clock` and `say` are for tests (time.monotonic, print to the terminal)."""

    def __init__(self, app: ASGIApp, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.clock = clock
        self.say = say or (lambda line: print(line, flush=True))
        self.failures: dict[str, Failures] = {}
        self.checking: set[str] = set()  # addresses with a login being checked: one at a time, so a burst sent
        # at once cannot try many passwords before the first failure counts

    def wait_left(self, address: str) -> float:
        """Seconds until `address` may try again (0: now)."""
        seen = self.failures.get(address)
        if seen is None or seen.count < FREE_FAILURES:
            return 0.0
        return max(0.0, seen.last + wait_after(seen.count) - self.clock())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in LOGIN_PATHS:
            await self.app(scope, receive, send)
            return
        address = (scope.get("client") or ("unknown",))[0]
        self._forget_old()
        wait = self.wait_left(address)
        if wait > 0 or address in self.checking:
            await _refuse(send, max(wait, 1.0))
            return
        answered: dict[str, int] = {}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        self.checking.add(address)
        try:
            await self.app(scope, receive, watch)
        finally:
            self.checking.discard(address)
            if answered.get("status") == WRONG:
                self._failed(address)
            elif answered.get("status") == 200:
                self.failures.pop(address, None)

    def _failed(self, address: str) -> None:
        seen = self.failures.pop(address, None) or Failures(0, 0.0)
        seen.count, seen.last = seen.count + 1, self.clock()
        self.failures[address] = seen  # re-inserted: the dict stays ordered by latest failure
        if seen.count >= FREE_FAILURES:
            self.say(f"warning: {seen.count} failed logins in a row from {address}; it waits "
                     f"{wait_after(seen.count):.0f} s before its next try")

    def _forget_old(self) -> None:
        now = self.clock()
        while self.failures:
            address, seen = next(iter(self.failures.items()))
            if len(self.failures) <= TRACKED and now - seen.last < FORGET_AFTER_S:
                break
            del self.failures[address]


def wait_after(failures: int) -> float:
    """How long an address waits after its `failures`-th wrong login in a row."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(FIRST_WAIT_S * 2 ** (failures - FREE_FAILURES), LONGEST_WAIT_S)


async def _refuse(send: Send, wait: float) -> None:
    seconds = math.ceil(wait)
    body = json.dumps({"detail": f"Too many failed logins from this address: try again in {seconds} s."}).encode()
    await send({"type": "http.response.start", "status": REFUSED,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", str(seconds).encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def login_throttle_middleware() -> Any:  # noqa: ANN401 - a starlette Middleware
    """The middleware entry for gradio's launch(app_kwargs=...)."""
    from starlette.middleware import Middleware

    return Middleware(LoginThrottle)
