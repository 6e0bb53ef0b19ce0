"""mep frames on the client's side: payload bytes beside a JSON header, without base64.

The layout (docs/api.md, "Frames"): ``b"MEPF"``, version byte 1, a 4-byte big-endian
header length, the UTF-8 JSON header, a 4-byte frame count, then each frame as a 4-byte
length and its bytes, nothing after. The daemon's side is ``mepd.frames``; the client
keeps its own few lines so that it imports nothing server-side.

Deliberately not here: HTTP and negotiation (``mepcore.client.service``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from mepcore.client.errors import ClientError

MEDIA_TYPE = "application/vnd.mep.frames"
# What the client asks for on result routes: frames first, JSON from an older daemon.
ACCEPT = f"{MEDIA_TYPE}, application/json;q=0.5"
MAGIC = b"MEPF"
VERSION = 1
_U32 = struct.Struct(">I")


def encode(header: Any, frames: Sequence[bytes]) -> bytes:
    """One frames body: ``header`` (JSON-serializable) and the frames in order."""
    text = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, bytes([VERSION]), _U32.pack(len(text)), text, _U32.pack(len(frames))]
    for frame in frames:
        parts.append(_U32.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


def _protocol(detail: str) -> ClientError:
    return ClientError("client.protocol_error", f"frames answer: {detail}")


def decode(body: bytes) -> tuple[Any, list[bytes]]:
    """The JSON header and the frames of an answer; ``client.protocol_error`` if the
    body does not follow the layout."""
    if body[:4] != MAGIC or len(body) < 9 or body[4] != VERSION:
        raise _protocol("no MEPF version 1 prefix")
    view = memoryview(body)
    at = 5

    def u32() -> int:
        nonlocal at
        if at + 4 > len(body):
            raise _protocol(f"ends at byte {len(body)}, a length expected")
        value = int(_U32.unpack_from(view, at)[0])
        at += 4
        return value

    def take(length: int) -> bytes:
        nonlocal at
        if at + length > len(body):
            raise _protocol(f"{length} bytes declared at byte {at}, body too short")
        out = bytes(view[at : at + length])
        at += length
        return out

    header_bytes = take(u32())
    frames = [take(u32()) for _ in range(u32())]
    if at != len(body):
        raise _protocol(f"{len(body) - at} bytes after the last frame")
    try:
        header = json.loads(header_bytes)
    except ValueError as exc:
        raise _protocol("the header is not JSON") from exc
    return header, frames
