"""mep frames: a JSON header and raw byte frames in one body, without base64.

``application/vnd.mep.frames`` is the binary form of the routes that carry payloads
(submit, function registration) and of the answers that carry results (a task, a
long-poll). One body is::

    4 bytes   magic  b"MEPF"
    1 byte    version (1)
    4 bytes   header length H (unsigned, big-endian)
    H bytes   header: a UTF-8 JSON object (the route's JSON body, minus the bytes)
    4 bytes   frame count N (unsigned, big-endian)
    N times:  4 bytes length L (unsigned, big-endian), then L bytes

and nothing after the last frame. Which frame belongs where is the route's rule
(docs/api.md): a submit's task *i* takes frame *i* as its argument bytes; a function
registration's only frame is the function; an answer's task carries ``"result_frame":
k`` instead of ``"result"``.

``decode`` refuses a body that does not follow the layout with ``api.bad_request`` and
one violation saying exactly what is wrong (where, and what was found); the header is
then read with the same strict JSON rules as a JSON body (``mepd.api.parse_json``).

Deliberately not here: the meaning of the header (``mepd.shapes``) and size limits on
the whole body (``mepd.api`` applies ``max_body_bytes`` before this runs).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from mepcore.errors import Violation
from mepd.shapes import RequestError

MEDIA_TYPE = "application/vnd.mep.frames"
MAGIC = b"MEPF"
VERSION = 1
_U32 = struct.Struct(">I")
_PREFIX = len(MAGIC) + 1


def _bad(where: str, what: str) -> RequestError:
    return RequestError(
        "api.bad_request", f"bad frames body: {where}: {what}", violations=[Violation(where, what)]
    )


def _u32(body: bytes | memoryview, at: int, where: str) -> int:
    if at + 4 > len(body):
        raise _bad(where, f"body ends at byte {len(body)}, 4 length bytes expected at {at}")
    return int(_U32.unpack_from(body, at)[0])


def decode(body: bytes) -> tuple[bytes, list[bytes]]:
    """The header bytes and the frames of ``body`` (copies: the body may be released)."""
    if body[:4] != MAGIC:
        raise _bad("$frames.magic", f"the body does not start with {MAGIC!r}")
    if len(body) < _PREFIX or body[4] != VERSION:
        found = body[4] if len(body) > 4 else None
        raise _bad("$frames.version", f"version {found!r}, only {VERSION} is known")
    view = memoryview(body)
    header_length = _u32(view, _PREFIX, "$frames.header_length")
    at = _PREFIX + 4
    if at + header_length > len(body):
        raise _bad("$frames.header", f"{header_length} header bytes declared, body too short")
    header = bytes(view[at : at + header_length])
    at += header_length
    count = _u32(view, at, "$frames.count")
    at += 4
    # Each frame takes at least its 4 length bytes: a count the body cannot hold is
    # refused before any list is sized by it.
    if count * 4 > len(body) - at:
        raise _bad("$frames.count", f"{count} frames declared, the body cannot hold them")
    frames: list[bytes] = []
    for index in range(count):
        length = _u32(view, at, f"$frames[{index}].length")
        at += 4
        if at + length > len(body):
            raise _bad(f"$frames[{index}]", f"{length} bytes declared, body too short")
        frames.append(bytes(view[at : at + length]))
        at += length
    if at != len(body):
        raise _bad("$frames.end", f"{len(body) - at} bytes after the last frame")
    return header, frames


def encode(header: bytes, frames: Sequence[bytes]) -> bytes:
    """One frames body (``header`` is UTF-8 JSON already)."""
    parts = [MAGIC, bytes([VERSION]), _U32.pack(len(header)), header, _U32.pack(len(frames))]
    for frame in frames:
        parts.append(_U32.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def media_type_of(content_type: str | None) -> str | None:
    """The bare media type of a ``Content-Type`` value, lower-cased."""
    if content_type is None:
        return None
    return content_type.partition(";")[0].strip().lower()


def accepts_frames(accept: str | None) -> bool:
    """True when an ``Accept`` header lists frames with a quality above zero."""
    for item in (accept or "").split(","):
        media, *params = (part.strip().lower() for part in item.split(";"))
        if media != MEDIA_TYPE:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        return quality > 0.0
    return False
