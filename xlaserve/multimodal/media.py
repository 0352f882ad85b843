"""Image URLs in chat content parts -> encoded image bytes, under the engine's media policy:
base64 `data:` URLs always; `file://` only inside an allowed folder; `http(s)://` only when
remote media are allowed, with a size and a time limit."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from xlaserve.errors import InvalidRequestError

PARAM = "messages"


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_path: str | None = None
    allow_remote: bool = False
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0


def fetch_image_bytes(url: object, policy: MediaPolicy) -> bytes:
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(
            PARAM, f"image_url.url must be a non-empty string, got {url!r}"[:200]
        )
    if url.startswith("data:"):
        return _data_url(url, policy)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "file":
        return _local_file(url, policy)
    if scheme in ("http", "https"):
        return _remote(url, policy)
    raise InvalidRequestError(PARAM, f"image URL scheme {scheme or url[:20]!r} is not supported "
                              "(data:, file:// under the allowed folder, http(s):// when "
                              "allowed)")  # fmt: skip


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequestError(PARAM, "image data URLs must be data:<type>;base64,<data>")
    if not header.startswith("image/"):
        raise InvalidRequestError(PARAM, f"data URL type {header[:-7]!r} is not an image type")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise InvalidRequestError(PARAM, f"image data exceeds {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequestError(PARAM, f"image data URL is not valid base64: {e}") from None


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise InvalidRequestError(PARAM, "file:// image URLs are refused: the server allows "
                                  "no local folder (allowed_local_media_path)")  # fmt: skip
    root = Path(policy.allowed_local_path).resolve()
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).resolve()
    if not path.is_relative_to(root):
        raise InvalidRequestError(PARAM, f"image file {path} is outside the allowed folder")
    if not path.is_file():
        raise InvalidRequestError(PARAM, f"image file {path} does not exist")
    if path.stat().st_size > policy.max_bytes:
        raise InvalidRequestError(PARAM, f"image file {path} exceeds {policy.max_bytes} bytes")
    return path.read_bytes()


def _remote(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise InvalidRequestError(PARAM, "remote image URLs are refused (allow_remote_media "
                                  "is off); send the image as a base64 data URL")  # fmt: skip
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:  # noqa: S310
            data = response.read(policy.max_bytes + 1)
    except OSError as e:
        raise InvalidRequestError(PARAM, f"image URL {url[:100]} could not be fetched: {e}"
                                  ) from None  # fmt: skip
    if len(data) > policy.max_bytes:
        raise InvalidRequestError(PARAM, f"image at {url[:100]} exceeds {policy.max_bytes} bytes")
    return data
