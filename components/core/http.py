"""JSON over HTTP for the remote scorers (GRPO's reward endpoints, evaluate's LLM judge), with retries.

A request that fails to connect, times out, or gets 429 or a 5xx is retried with exponential backoff (or
after the server's Retry-After); any other 4xx is the request's own fault and ends the run with the server's
answer. The standard library's client: one small request at a time per thread needs nothing more.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from rlhf_components.core.errors import UserError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


def _retry_after(error: urllib.error.HTTPError, attempt: int) -> float:
    header = error.headers.get("Retry-After") if error.headers else None
    if header is not None and header.strip().isdigit():
        return min(float(header), MAX_BACKOFF_S)
    return min(0.5 * 2**attempt, MAX_BACKOFF_S)


def post_json(
    url: str,
    payload: Any,
    *,
    where: str,
    timeout_s: float,
    retries: int,
    headers: dict[str, str] | None = None,
) -> Any:
    """POST `payload` as JSON to `url` and return the parsed answer; `where` names the caller in errors."""
    request = urllib.request.Request(
        url,
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            retryable = error.code == 429 or error.code >= 500
            if not retryable or attempt == retries:
                detail = error.read()[:300].decode(errors="replace")
                raise UserError(f"{where}: {url} answered {error.code}: {detail}") from None
            wait = _retry_after(error, attempt)
        except (urllib.error.URLError, TimeoutError, OSError) as error:
            if attempt == retries:
                raise UserError(
                    f"{where}: {url} did not answer ({error}) in {retries + 1} attempts"
                ) from None
            wait = min(0.5 * 2**attempt, MAX_BACKOFF_S)
        except json.JSONDecodeError:
            raise UserError(f"{where}: {url} did not answer JSON") from None
        log.warning(
            "%s: %s failed (attempt %d of %d); retrying in %.1f s", where, url, attempt + 1, retries + 1, wait
        )
        time.sleep(wait)
    raise AssertionError("unreachable: the last attempt returns or raises")
