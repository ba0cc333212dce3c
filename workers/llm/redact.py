"""Endpoint URLs without their credentials, for everything this layer shows or stores.

A `base_url` may carry secrets: `https://user:pass@host/v1`, or a query value such as `?api_key=...`. Only
`redact_url(url)` may leave the backend: journal keys, limiter names (the Ray actor's name), log lines and
error messages use it, never the raw URL.
"""
from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

HIDDEN = "***"
# query parameters whose value is a credential (api_key, access_token, sig, X-Amz-Signature, password, ...)
_SECRET_PARAM = re.compile(r"key|token|secret|sig|pass|auth|cred", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its user info replaced by '***' and the values of credential-like query parameters too;
    scheme and host lower-cased and a trailing '/' dropped, so one endpoint always reads the same."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # e.g. a port that is not a number: show nothing of it rather than guess
        return "<unparseable URL>"
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = f"{HIDDEN}@" if "@" in parts.netloc else ""
    netloc = f"{userinfo}{host}" + (f":{port}" if port is not None else "")
    query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme.lower(), netloc, parts.path.rstrip("/"), query, ""))


def url_secrets(url: str) -> list[str]:
    """The credential strings inside `url` (as written and percent-decoded), longest first, to scrub them
    from text that may quote them (an error body echoing the request URL)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    found: set[str] = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found.update(userinfo.split(":", 1))
        found.add(userinfo)
    for p in parts.query.split("&"):
        name, eq, value = p.partition("=")
        if eq and value and _SECRET_PARAM.search(name):
            found.add(value)
    found |= {unquote(s) for s in found}
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """`text` with `url` shown redacted and any credential from it replaced by '***'."""
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    for secret in url_secrets(url):
        text = text.replace(secret, HIDDEN)
    return text


def split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """(`url` without its user info, (user, password) percent-decoded or None): HTTP libraries log the URL
    they are given, so the credentials travel as an auth setting instead."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)), (unquote(parts.username or ""), unquote(parts.password or ""))


def _redact_param(param: str) -> str:
    name, eq, value = param.partition("=")
    return f"{name}={HIDDEN}" if eq and value and _SECRET_PARAM.search(name) else param
