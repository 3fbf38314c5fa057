"""Wrong passwords are throttled per address (issue 22, point 4): a few typos cost nothing, then the address waits
(2 s, doubling, at most 30 s) and the terminal notes it; the right password still gets in once the wait is over,
and other addresses never notice. Driven through gradio's own /login route of a launched app, and against a clock."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from ui.login_throttle import FREE_FAILURES, LONGEST_WAIT_S, LoginThrottle, login_throttle_middleware, wait_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def gradio_login(scope, receive, send) -> None:  # noqa: ANN001 - gradio's answers to POST /login
    body = (await receive())["body"]
    right = urllib.parse.parse_qs(body.decode()) == {"username": ["u"], "password": ["p"]}
    await send({"type": "http.response.start", "status": 200 if right else 400, "headers": []})
    await send({"type": "http.response.body", "body": b'{"success": true}' if right else b'{"detail": "no"}'})


def _login(throttle: LoginThrottle, password: str, address: str = "10.0.0.7") -> tuple[int, dict[bytes, bytes]]:
    sent: list[dict] = []

    async def send(message) -> None:  # noqa: ANN001
        sent.append(message)

    body = urllib.parse.urlencode({"username": "u", "password": password}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body}

    scope = {"type": "http", "method": "POST", "path": "/login", "client": (address, 50000), "headers": []}
    asyncio.run(throttle(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def test_failures_make_the_address_wait_longer_up_to_a_limit() -> None:
    clock, said = Clock(), []
    throttle = LoginThrottle(gradio_login, clock=clock, say=said.append)
    assert [_login(throttle, "wrong")[0] for _ in range(FREE_FAILURES)] == [400] * FREE_FAILURES
    assert said == ["warning: 3 failed logins in a row from 10.0.0.7; it waits 2 s before its next try"]
    status, headers = _login(throttle, "p")  # even the right password waits: it is not checked
    assert status == 429 and headers[b"retry-after"] == b"2"
    assert _login(throttle, "wrong", address="10.0.0.8")[0] == 400  # another address is not slowed
    clock.now += 2.0
    assert _login(throttle, "wrong")[0] == 400 and throttle.wait_left("10.0.0.7") == 4.0
    waits = []
    for _ in range(6):
        clock.now += throttle.wait_left("10.0.0.7")
        assert _login(throttle, "wrong")[0] == 400
        waits.append(throttle.wait_left("10.0.0.7"))
    assert waits == [8.0, 16.0, LONGEST_WAIT_S, LONGEST_WAIT_S, LONGEST_WAIT_S, LONGEST_WAIT_S]
    assert len(said) == 1 + 1 + 6 and said[-1].startswith("warning: 10 failed logins in a row from 10.0.0.7")
    clock.now += LONGEST_WAIT_S  # the right user is kept out half a minute at most, then gets in
    assert _login(throttle, "p")[0] == 200 and throttle.wait_left("10.0.0.7") == 0.0
    assert _login(throttle, "wrong")[0] == 400  # and starts afresh
    assert wait_after(FREE_FAILURES - 1) == 0.0


def test_a_burst_sent_at_once_is_checked_one_at_a_time() -> None:
    gate = asyncio.Event()

    async def slow_login(scope, receive, send) -> None:  # noqa: ANN001
        await gate.wait()
        await gradio_login(scope, receive, send)

    throttle = LoginThrottle(slow_login, clock=Clock(), say=lambda line: None)

    async def burst() -> list[int]:
        statuses: list[int] = []

        async def one() -> None:
            sent: list[dict] = []

            async def send(message) -> None:  # noqa: ANN001
                sent.append(message)

            async def receive() -> dict:
                return {"type": "http.request", "body": b"username=u&password=guess"}

            await throttle({"type": "http", "method": "POST", "path": "/login", "client": ("10.0.0.9", 1),
                            "headers": []}, receive, send)
            statuses.append(sent[0]["status"])

        tasks = [asyncio.create_task(one()) for _ in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*tasks)
        return statuses

    statuses = asyncio.run(burst())
    assert statuses.count(400) == 1 and statuses.count(429) == 19


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_login(url: str, password: str) -> int:
    data = urllib.parse.urlencode({"username": "u", "password": password}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}login", data=data), timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_launched_app_throttles_its_login(capsys: pytest.CaptureFixture[str]) -> None:
    import gradio as gr

    with gr.Blocks() as blocks:
        gr.Markdown("hello")
    blocks.launch(prevent_thread_lock=True, server_port=_free_port(), auth=("u", "p"), quiet=True,
                  app_kwargs={"middleware": [login_throttle_middleware()]})
    try:
        answers = [_post_login(blocks.local_url, "wrong") for _ in range(FREE_FAILURES + 1)]
        assert answers == [400] * FREE_FAILURES + [429]
        assert _post_login(blocks.local_url, "p") == 429
        assert "3 failed logins in a row from 127.0.0.1" in capsys.readouterr().out
        time.sleep(wait_after(FREE_FAILURES) + 0.1)
        assert _post_login(blocks.local_url, "p") == 200
    finally:
        blocks.close()
