"""One AutoMem API call with retries, for the ``automem`` driver.

Connection errors, timeouts, 5xx, unreadable bodies and JSON that is not an object are retried
(``max_tries`` tries, waits of ``backoff`` x 2^n) and end in ``BackendUnavailableError``. A
request that creates something is not retried after a timeout or an unreadable answer, since it
may have been carried out: that ends in ``OutcomeUnknownError`` so that the caller can undo what
may exist. 400 is ``InvalidInputError`` with the server's message, 401 names the token setting
(never the token), 404 is "not found" where the caller says so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app.core.memory.errors import BackendUnavailableError, InvalidInputError

logger = logging.getLogger(__name__)

class OutcomeUnknownError(BackendUnavailableError):
    """A creating request got no usable answer: it may or may not have been carried out.

    ``in_flight``: how many records the server may still create (set by the caller that knows).
    """

    in_flight: int = 0


class AutomemHttp:
    """The retrying caller over one ``httpx.Client`` (thread-safe, as the client is)."""

    def __init__(self, client: Any, httpx: Any, *, max_tries: int, backoff: float) -> None:
        self.client = client
        self._httpx = httpx
        self._max_tries = max(1, max_tries)
        self._backoff = backoff
        self.closed = False

    def request(self, method: str, path: str, *, params: Any = None, body: Any = None,
                creates: bool = False, not_found: Any = "raise") -> Any:
        """The decoded answer (a dict), or ``not_found`` on a 404 when it is not ``"raise"``."""
        if self.closed:
            raise BackendUnavailableError("this AutomemDriver is closed")
        httpx = self._httpx
        reason = ""
        for attempt in range(self._max_tries):
            if attempt:
                wait = self._backoff * 2 ** (attempt - 1)
                # The path names ids at most; the token (a header) and bodies are never logged.
                logger.warning("AutoMem %s %s: %s; try %d of %d in %.2fs", method, path,
                               reason, attempt + 1, self._max_tries, wait)
                time.sleep(wait)
            try:
                response = self.client.request(method, path, params=params, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                reason = f"cannot connect ({type(exc).__name__})"
                continue
            except httpx.TransportError as exc:
                if creates:
                    raise OutcomeUnknownError(
                        f"AutoMem {method} {path} failed ({type(exc).__name__}); it may or may "
                        "not have been carried out") from exc
                reason = f"no answer ({type(exc).__name__})"
                continue
            if response.status_code >= 500:
                reason = f"HTTP {response.status_code}"
                continue
            try:
                decoded = response.json()
            except ValueError:
                decoded = None
            if not isinstance(decoded, dict):
                # A proxy page, or JSON that is not an object ([] or "ok"): not AutoMem's answer.
                if creates and response.status_code < 300:
                    raise OutcomeUnknownError(
                        f"AutoMem {method} {path} answered an unreadable body; it may or may not "
                        "have been carried out")
                reason = f"unreadable answer (HTTP {response.status_code})"
                continue
            if response.status_code == 404 and not_found != "raise":
                return not_found
            if response.status_code == 400:
                raise InvalidInputError(f"AutoMem refused the request: "
                                        f"{decoded.get('message', 'bad request')}")
            if response.status_code == 401:
                raise BackendUnavailableError(
                    "AutoMem refused the token (HTTP 401): check AUTOMEM_API_TOKEN")
            if response.status_code >= 300:
                raise BackendUnavailableError(f"AutoMem {method} {path} answered HTTP "
                                              f"{response.status_code}")
            return decoded
        raise BackendUnavailableError(
            f"AutoMem {method} {path} failed after {self._max_tries} tries: {reason}")

    def close(self) -> None:
        self.closed = True
        self.client.close()
