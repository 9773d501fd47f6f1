"""Fetch the bytes of an image URL: `data:` base64, `s3://` from allowed buckets (boto3), http(s) from an
allowlist. Every refusal is an InvalidRequest with the reason; nothing is fetched without a size cap."""

import asyncio
import base64
import binascii
import hashlib
import urllib.parse
from urllib.parse import urljoin

from pipeline.errors import InvalidRequest
from pipeline.storage import S3Settings, read_object

from .config import AppConfig
from .urls import allowed_url

DATA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WebP by magic bytes; None for anything else (PIL's rarer decoders are not exposed)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_key(data: bytes) -> str:
    """The encoder's feature-cache key: the same bytes always decode and preprocess to the same pixels."""
    return hashlib.sha256(data).hexdigest()


MAX_REDIRECTS = 5


def s3_key_problem(key: str) -> str | None:
    """Why an s3:// key is refused: empty, or a `.`/`..` segment (percent-encoded too), which an S3-compatible
    store or a proxy before it may resolve to another key."""
    segments = [urllib.parse.unquote(seg) for seg in key.split("/")]
    if not key:
        return "the URL names no key"
    if any(seg in (".", "..") for seg in segments):
        return "a key with '.' or '..' segments is refused"
    return None


class ImageFetcher:
    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self._s3 = None
        self._http = None

    async def fetch(self, url: str, what: str) -> bytes:
        if url.startswith("data:"):
            data = self._from_data_url(url, what)
        elif url.startswith("s3://"):
            data = await asyncio.to_thread(self._from_s3, url, what)
        elif url[:8].lower().startswith(("http://", "https://")):
            data = await self._from_http(url, what)
        else:
            raise InvalidRequest(f"{what}: unsupported URL scheme in {url[:40]!r}; use data:, s3:// or https://")
        if sniff_format(data) is None:
            raise InvalidRequest(f"{what} is not a PNG, JPEG or WebP image")
        return data

    def _check_size(self, n: int, what: str) -> None:
        if n > self.cfg.max_image_bytes:
            raise InvalidRequest(f"{what} is {n} bytes; the limit is {self.cfg.max_image_bytes}")

    def _from_data_url(self, url: str, what: str) -> bytes:
        header, sep, payload = url.partition(",")
        media, *params = header.removeprefix("data:").split(";")
        if not sep or "base64" not in params:
            raise InvalidRequest(f"{what}: a data URL must be data:<image type>;base64,<data>")
        if media.lower() not in DATA_TYPES:
            raise InvalidRequest(f"{what}: media type {media!r} is not one of {', '.join(DATA_TYPES)}")
        self._check_size(len(payload) * 3 // 4, what)  # before decoding anything
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest(f"{what}: invalid base64 ({exc})") from exc

    def _from_s3(self, url: str, what: str) -> bytes:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if bucket not in self.cfg.s3_buckets:
            raise InvalidRequest(f"{what}: bucket {bucket!r} is not one this deployment reads images from")
        if (problem := s3_key_problem(key)) is not None:
            raise InvalidRequest(f"{what}: {problem}")
        if self._s3 is None:
            self._s3 = S3Settings.from_env().client()  # honours AWS_ENDPOINT_URL and the usual credential chain
        data = read_object(self._s3, url, what, max_bytes=self.cfg.max_image_bytes)
        self._check_size(len(data), what)
        return data

    async def _from_http(self, url: str, what: str) -> bytes:
        """GET the normalised URL; a redirect is followed only to another allowlisted URL (each hop checked, at
        most MAX_REDIRECTS)."""
        import httpx

        if self._http is None:
            # Redirects by hand: each hop is checked against the allowlist before it is fetched.
            self._http = httpx.AsyncClient(timeout=self.cfg.image_fetch_timeout_s, follow_redirects=False)
        for _ in range(MAX_REDIRECTS + 1):
            target = allowed_url(url, self.cfg.http_allowlist)
            if target is None:
                raise InvalidRequest(f"{what}: http(s) image URLs are refused unless they match the allowlist")
            try:
                async with self._http.stream("GET", target) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = urljoin(target, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        raise InvalidRequest(f"{what}: GET {target} returned HTTP {resp.status_code}")
                    data = bytearray()
                    async for block in resp.aiter_bytes():
                        data += block
                        self._check_size(len(data), what)
                    return bytes(data)
            except httpx.HTTPError as exc:
                raise InvalidRequest(f"{what}: could not fetch {target}: {type(exc).__name__}: {exc}") from exc
        raise InvalidRequest(f"{what}: more than {MAX_REDIRECTS} redirects")
