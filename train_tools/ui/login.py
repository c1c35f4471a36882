"""The standalone app's login (``--auth``, ``--auth-file``): reading the pairs, checking one in constant time,
and slowing down an address that keeps typing wrong logins (a growing wait, answered 429 with Retry-After).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

#: Failed logins an address may make before it must wait; the wait then doubles with every further failure.
FREE_LOGIN_TRIES = 3
FIRST_LOGIN_WAIT_S = 2.0
LONGEST_LOGIN_WAIT_S = 600.0


def parse_auth(pairs: Sequence[str], auth_file: Path | None = None) -> list[tuple[str, str]]:
    """``user:password`` pairs from --auth and the lines of --auth-file; a UserError names a bad one."""
    lines = [(f"--auth {i + 1}", pair) for i, pair in enumerate(pairs)]
    if auth_file is not None:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"Cannot read the --auth-file {auth_file} ({exc}); check the path.") from exc
        lines += [
            (f"line {n} of {Path(auth_file).name}", line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")
        ]
    out = []
    for where, pair in lines:
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"The login in {where} must look like user:password.")
        out.append((user.strip(), password))
    return out


def login_checker(logins: Sequence[tuple[str, str]]) -> Callable[[str, str], bool]:
    """The ``auth`` callable for Gradio: whether (user, password) is one of ``logins``.

    Every pair is compared, each with ``hmac.compare_digest``, so the time taken says nothing about which
    user names exist or how much of a password was right.
    """
    pairs = [(user.encode("utf-8"), password.encode("utf-8")) for user, password in logins]

    def check(username: str, password: str) -> bool:
        given_user, given_password = str(username).strip().encode("utf-8"), str(password).encode("utf-8")
        ok = False
        for user, secret in pairs:
            same_user = hmac.compare_digest(given_user, user)
            same_password = hmac.compare_digest(given_password, secret)
            ok |= same_user and same_password
        return ok

    return check


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    wait_until: float = 0.0


@dataclass
class LoginThrottle:
    """Slows down guessing: per client address, after ``free_tries`` failed logins in a row every login from
    that address is refused for a while, ``first_wait_s`` after the last free try and twice as long after
    each further failure (at most ``longest_wait_s``). A right login clears the address's count; other
    addresses are not affected. An address that has not failed for ``forget_after_s`` is forgotten."""

    free_tries: int = FREE_LOGIN_TRIES
    first_wait_s: float = FIRST_LOGIN_WAIT_S
    longest_wait_s: float = LONGEST_LOGIN_WAIT_S
    forget_after_s: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    _by_address: dict[str, _Failures] = field(default_factory=dict, repr=False)
    _checking: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def wait_left(self, address: str) -> float:
        """Seconds ``address`` must still wait before its next login is looked at (0: it may try now)."""
        with self._lock:
            entry = self._by_address.get(address)
            return max(0.0, entry.wait_until - self.clock()) if entry else 0.0

    def begin(self, address: str) -> float:
        """Before a login from ``address`` is checked: 0 and the address marked busy until ``end``, or the
        seconds it must wait. One login at a time per address: many sent at once would all find the count
        below the limit."""
        with self._lock:
            entry = self._by_address.get(address)
            wait = max(0.0, entry.wait_until - self.clock()) if entry else 0.0
            if wait > 0:
                return wait
            if address in self._checking:
                return 1.0
            self._checking.add(address)
            return 0.0

    def end(self, address: str) -> None:
        with self._lock:
            self._checking.discard(address)

    def failed(self, address: str) -> tuple[int, float]:
        """Record a wrong login from ``address``: (its failures in a row, the seconds it must now wait; 0 while
        its tries are free)."""
        now = self.clock()
        with self._lock:
            self._forget_old(now)
            entry = self._by_address.setdefault(address, _Failures())
            entry.count += 1
            entry.last = now
            wait = 0.0
            if entry.count >= self.free_tries:
                wait = min(self.longest_wait_s, self.first_wait_s * 2.0 ** (entry.count - self.free_tries))
                entry.wait_until = now + wait
            return entry.count, wait

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._by_address.pop(address, None)

    def _forget_old(self, now: float) -> None:
        for address in [
            a for a, e in self._by_address.items() if now - e.last > self.forget_after_s and now >= e.wait_until
        ]:
            del self._by_address[address]


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class LoginThrottleMiddleware:
    """ASGI middleware in front of Gradio's ``POST /login``: counts failed logins per client address (the
    socket's address; forwarded-for headers are not trusted) and answers 429 while an address must wait."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], throttle: LoginThrottle) -> None:
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", "")).rstrip("/")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.endswith("/login"):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        wait = self.throttle.begin(address)
        if wait > 0:
            await self._refuse(send, wait)
            return
        status: list[int] = []

        async def watch(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status.append(int(message.get("status", 0)))
                # Counted before the answer goes out, so the next login from there sees this one's count.
                self._count(address, status[0])
                self.throttle.end(address)
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.throttle.end(address)

    def _count(self, address: str, status: int) -> None:
        if status < 300:
            self.throttle.succeeded(address)
        elif status in (400, 401, 403):
            count, wait = self.throttle.failed(address)
            if wait > 0:
                log.warning(
                    "Train Tools: %d wrong logins in a row from %s; logins from there are refused for %.0f s.",
                    count,
                    address,
                    wait,
                )

    @staticmethod
    async def _refuse(send: Send, wait: float) -> None:
        seconds = max(1, math.ceil(wait))
        unit = "second" if seconds == 1 else "seconds"
        body = json.dumps({"detail": f"Too many wrong logins: wait {seconds} {unit}, then try again."}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", str(seconds).encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
