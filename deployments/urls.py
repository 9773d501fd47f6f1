"""URLs as a server reads them (RFC 3986's normalisation) and the http allowlist compared on that form: a prefix
matches by scheme, host, port and whole path segments, so `..`, `%2e%2e`, case and default ports cannot leave it."""

import re
import string
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")


def _decode_unreserved(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in UNRESERVED else "%" + match.group(1).upper()


def _without_dot_segments(path: str) -> str:
    """RFC 3986's remove_dot_segments on an absolute path ("/a/b/../c/./d" -> "/a/c/d")."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for seg in segments:
        if seg == "..":
            out = out[:-1]
        elif seg != ".":
            out.append(seg)
    if segments and segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is the directory "/a/"
    return "/" + "/".join(out)


def normalize_http(url: str) -> str | None:
    """`url` as the server will read it (RFC 3986's normalisation): scheme and host in lower case, the default
    port dropped, percent-encoded unreserved characters decoded (`%2e` is `.`), dot segments removed, no fragment;
    None for a URL that cannot be compared safely (user info, a backslash, an encoded slash or backslash, which
    servers split differently, a host that is not ASCII, an invalid port)."""
    if "\\" in url or any(c.isspace() or ord(c) < 0x20 for c in url):
        return None
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return None
    scheme, host = u.scheme.lower(), (u.hostname or "").rstrip(".")
    if scheme not in DEFAULT_PORTS or not host or not host.isascii() or "@" in u.netloc:
        return None
    path = re.sub(r"%([0-9A-Fa-f]{2})", _decode_unreserved, u.path or "/")
    if re.search(r"%(2F|5C)", path) or not path.startswith("/"):
        return None
    host = f"[{host}]" if ":" in host else host
    netloc = host if port in (None, DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    return f"{scheme}://{netloc}{_without_dot_segments(path)}" + (f"?{u.query}" if u.query else "")


def allowed_url(url: str, prefixes: list[str]) -> str | None:
    """The normalised `url` (what is fetched) if it lies under one of the normalised `prefixes` (same scheme, host
    and port; the path equal to the prefix's or under it, segment by segment), else None."""
    norm = normalize_http(url)
    if norm is None:
        return None
    u = urlsplit(norm)
    for prefix in prefixes:
        p = urlsplit(normalize_http(prefix) or "")
        base = p.path if p.path.endswith("/") else p.path + "/"
        if (u.scheme, u.netloc) == (p.scheme, p.netloc) and (u.path == p.path or u.path.startswith(base)):
            return norm
    return None


def allowed_http(url: str, prefixes: list[str]) -> bool:
    return allowed_url(url, prefixes) is not None
