"""Secrets kept out of everything shown or written: a URL's password becomes ``***``.

One function, :func:`redact`, for every message, log line and file (``run.json``, ``summary.json``,
the run spec in Redis, a worker's command line, what ``/v1/task`` tells devices): a password in a
URL's user info (``redis://USER:PASSWORD@HOST``) or its query (``?password=...``) is replaced by
:data:`REDACTED`, host, port and database kept, so what is written still says where the run's state
lives. A redacted URL still connects: the store then takes the password from ``AMBLE_REDIS_PASSWORD``
(:func:`amble.server.store.redis.connect`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

REDACTED = "***"
"""What a password is shown as."""

_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]*:)\S*(?=@)")
"""``scheme://USER:`` then the password: everything up to the last ``@`` of the word (a password
holding an unescaped ``@`` or ``/`` is still hidden whole)."""
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` (a URL, or a message that may quote one) with every URL password replaced by ``***``."""
    text = _USERINFO_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + REDACTED, text)


def redact_values(data: Any) -> Any:
    """``data`` (plain JSON-like data: a config as a dict) with :func:`redact` applied to every string."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {key: redact_values(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [redact_values(value) for value in data]
    return data


def split_password(url: str) -> tuple[str, str | None]:
    """``url`` without its password, and the password (decoded; None if it has none). A redacted URL
    gives ``***`` as its password: the caller takes the real one from elsewhere."""
    parsed = urlsplit(url)
    password = unquote(parsed.password) if parsed.password is not None else None
    netloc = parsed.netloc
    if parsed.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}@{hostport}" if user else hostport
    query = parse_qsl(parsed.query, keep_blank_values=True)
    kept = [(key, value) for key, value in query if key.lower() != "password"]
    if len(kept) != len(query) and password is None:
        password = next(value for key, value in query if key.lower() == "password")
    if password is None:
        return url, None
    query_text = f"?{urlencode(kept)}" if kept else ""
    fragment = f"#{parsed.fragment}" if parsed.fragment else ""
    return f"{parsed.scheme}://{netloc}{parsed.path}{query_text}{fragment}", password
