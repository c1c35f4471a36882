"""The standalone app's login (--auth) against guessing, and its start-up warning when it is open to a network.

The HTTP test drives a real server on 127.0.0.1, logging in from 127.0.0.1 and from 127.0.0.2 (both this
computer's loopback) as two different addresses; its waits are a second or two, set through ``LoginThrottle``.
"""

from __future__ import annotations

import hmac
import http.client
import logging
import socket
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from tests.helpers_app import free_port
from train_tools.hosts.base import StandaloneHost

USER, PASSWORD = "ann", "s3cret"


def _login(port: int, password: str, source: str = "127.0.0.1") -> tuple[int, dict[str, str], str]:
    """POST /login from ``source`` as the Gradio login page does: (status, headers, the access cookie)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        body = urllib.parse.urlencode({"username": USER, "password": password})
        conn.request("POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        response = conn.getresponse()
        response.read()
        cookies = [c.split(";", 1)[0] for c in response.headers.get_all("set-cookie") or []]
        return response.status, {k.lower(): v for k, v in response.getheaders()}, "; ".join(cookies)
    finally:
        conn.close()


def _get(port: int, path: str, cookie: str = "") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _second_loopback_address_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


def test_wrong_logins_make_that_address_wait_and_a_right_login_works_afterwards(tmp_path: Path):
    import gradio as gr

    if int(gr.__version__.split(".")[0]) < 5:
        pytest.skip("Gradio < 5 cannot start its server in this test environment (its own template error)")
    if not _second_loopback_address_works():
        pytest.skip("this computer has no 127.0.0.2 to log in from as a second address")
    from train_tools.ui.app import serve
    from train_tools.ui.login import LoginThrottle

    port = free_port()
    throttle = LoginThrottle(free_tries=3, first_wait_s=1.5)
    demo = serve(
        StandaloneHost(tmp_path / "data"),
        port=port,
        open_browser=False,
        block=False,
        auth=[(USER, PASSWORD), ("bob", "other")],
        throttle=throttle,
    )
    try:
        # The free tries are answered as usual (wrong credentials).
        for wrong in ("nope", "s3cre", "S3CRET"):
            assert _login(port, wrong)[0] == 400
        # Now even the right password is refused, with a Retry-After, and no access cookie is given.
        status, headers, cookie = _login(port, PASSWORD)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 2 and not cookie
        # Another address is not slowed: its wrong login is just wrong, its right login works at once.
        assert _login(port, "nope", source="127.0.0.2")[0] == 400
        status, _headers, other_cookie = _login(port, PASSWORD, source="127.0.0.2")
        assert status == 200 and other_cookie
        # After the wait, the right login works from the first address too, and opens the app.
        deadline = time.monotonic() + 10
        while throttle.wait_left("127.0.0.1") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _headers, cookie = _login(port, PASSWORD)
        assert status == 200 and cookie
        assert _get(port, "/config") == 401 and _get(port, "/config", cookie) == 200
        # ... and the right login cleared its count: three fresh free tries again.
        for wrong in ("a", "b"):
            assert _login(port, wrong)[0] == 400
        assert _login(port, PASSWORD)[0] == 200
    finally:
        demo.close()


def test_the_wait_doubles_with_each_further_failure_up_to_a_cap_and_is_per_address():
    from train_tools.ui.login import LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(
        free_tries=3, first_wait_s=2.0, longest_wait_s=10.0, forget_after_s=60.0, clock=lambda: now[0]
    )
    assert [throttle.failed("10.0.0.1") for _ in range(2)] == [(1, 0.0), (2, 0.0)]
    assert throttle.wait_left("10.0.0.1") == 0
    waits = []
    for _ in range(4):
        count, wait = throttle.failed("10.0.0.1")
        waits.append(wait)
        assert throttle.wait_left("10.0.0.1") == pytest.approx(wait)
        now[0] += wait  # the address waits its turn, then fails again
    assert waits == [2.0, 4.0, 8.0, 10.0] and count == 6
    assert throttle.wait_left("10.0.0.2") == 0  # others are not slowed
    throttle.succeeded("10.0.0.1")
    assert throttle.failed("10.0.0.1") == (1, 0.0)
    # An address that stopped failing long ago is forgotten (the table does not grow forever).
    now[0] += 61
    throttle.failed("10.0.0.3")
    assert throttle.failed("10.0.0.1") == (1, 0.0)


def test_the_login_check_compares_every_pair_in_constant_time(monkeypatch: pytest.MonkeyPatch):
    import train_tools.ui.login as login

    check = login.login_checker([("ann", "s3cret"), ("bob", "pa:ss"), ("猫", "ключ")])
    assert check("ann", "s3cret") and check(" bob ", "pa:ss") and check("猫", "ключ")
    assert not check("ann", "pa:ss") and not check("bob", "s3cret") and not check("ann", "s3cret ")
    assert not check("", "") and not check("eve", "s3cret")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(login.hmac, "compare_digest", spy)
    for user, password in (("ann", "s3cret"), ("ann", "x"), ("eve", "x"), ("猫", "ключ")):
        calls.clear()
        check(user, password)
        assert len(calls) == 6  # user and password of all three pairs, whoever asks, right or wrong


def _serve_with_fake_launch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: list[str]
) -> list[dict[str, Any]]:
    """Run ``python -m train_tools ARGV`` up to Gradio's launch; each launch records the warnings logged
    before it (Gradio prints its URL line inside launch)."""
    import gradio as gr

    from train_tools.ui.app import main

    launches: list[dict[str, Any]] = []

    def launch(self: Any, **kw: Any) -> None:
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        launches.append({**kw, "warnings_before": warnings})
        print(f"* Running on local URL:  http://{kw['server_name']}:{kw['server_port']}")

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--data-dir", str(tmp_path), "--no-browser", "--port", "7009", *argv]) == 0
    return launches


@pytest.mark.parametrize("listen", ["0.0.0.0", "192.168.1.20", "my-pc.local"])
def test_listening_on_a_network_without_auth_warns_before_the_url_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, listen: str
):
    (launch,) = _serve_with_fake_launch(monkeypatch, tmp_path, caplog, ["--listen", listen])
    assert launch["server_name"] == listen
    (warning,) = [w for w in launch["warnings_before"] if "--auth" in w]
    assert listen in warning and "anyone on your network can" in warning
    assert "train" in warning and "write files" in warning


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "127.0.0.1"],
        ["--listen", "127.0.0.5"],
        ["--listen", "localhost"],
        ["--listen", "::1"],
        ["--listen", "0.0.0.0", "--auth", "ann:s3cret"],
    ],
)
def test_no_network_warning_for_this_computer_only_or_with_a_login(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, argv: list[str]
):
    (launch,) = _serve_with_fake_launch(monkeypatch, tmp_path, caplog, argv)
    assert not [w for w in launch["warnings_before"] if "anyone on your network" in w]
    if "--auth" in argv:
        assert callable(launch["auth"]) and launch["auth"]("ann", "s3cret") and not launch["auth"]("ann", "x")


def test_logins_sent_all_at_once_from_one_address_are_checked_one_at_a_time():
    """Many logins fired at once would all find the count below the limit; the middleware lets one through per
    address while it is being checked and refuses the others (429), and a late answer still counts."""
    import asyncio

    from train_tools.ui.login import LoginThrottle, LoginThrottleMiddleware

    checked: list[str] = []

    async def gradio_login(scope: dict[str, Any], receive: Any, send: Any) -> None:
        checked.append(scope["client"][0])
        await asyncio.sleep(0.05)  # a slow check: the others arrive meanwhile
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b'{"detail": "Incorrect credentials."}'})

    throttle = LoginThrottle(free_tries=3, first_wait_s=60.0)
    middleware = LoginThrottleMiddleware(gradio_login, throttle)

    async def attempt(address: str, method: str = "POST", path: str = "/login") -> int:
        answers: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            answers.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": method, "path": path, "client": (address, 50000)}
        await middleware(scope, receive, send)
        return int(answers[0]["status"])

    async def burst() -> list[int]:
        return list(await asyncio.gather(*(attempt("10.0.0.9") for _ in range(20)), attempt("10.0.0.10")))

    statuses = asyncio.run(burst())
    assert statuses[:20].count(400) == 1 and statuses[:20].count(429) == 19 and statuses[20] == 400
    assert checked.count("10.0.0.9") == 1
    # One at a time they are all checked, until the free tries are used up.
    assert asyncio.run(attempt("10.0.0.9")) == 400 and asyncio.run(attempt("10.0.0.9")) == 400
    assert asyncio.run(attempt("10.0.0.9")) == 429 and checked.count("10.0.0.9") == 3
    # Only the login is held back: the address's other requests go on to Gradio (which asks for the cookie).
    assert throttle.wait_left("10.0.0.9") > 0
    assert asyncio.run(attempt("10.0.0.9", "GET", "/config")) == 400 and checked.count("10.0.0.9") == 4
