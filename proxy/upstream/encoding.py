"""Response bodies in a content coding: decoded (gzip, deflate) or refused, never relayed as is.

The forwarder asks engines for `accept-encoding: identity`, relays bodies under its own headers
(without the engine's `content-encoding`) and reads usage from them. A body sent encoded anyway
(a compressing proxy in front of vLLM) would reach the client as bytes labelled JSON. So:
gzip and deflate are decoded as the bytes arrive, whole bodies up to `max_decoded_bytes` (a
small body can decode to gigabytes), streams in pieces of at most `_PIECE` bytes (the client's
pace bounds the rest); any other coding is refused. Both failures are `WireProtocolError`s,
so `proxy.core.transport.upstream_errors` maps them like any other upstream protocol violation.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Iterator

from proxy.core.transport import ProtocolViolation as WireProtocolError

_PIECE = 64 * 1024
_GZIP, _ZLIB, _RAW = zlib.MAX_WBITS | 16, zlib.MAX_WBITS, -zlib.MAX_WBITS
_CODINGS = {"gzip": _GZIP, "x-gzip": _GZIP, "deflate": _ZLIB}


def coding_of(value: str | None) -> str | None:
    """The content coding a `content-encoding` value asks to undo (None: the body is as it
    is); raises for one we cannot."""
    if value is None:
        return None
    codings = [c for c in (part.strip().lower() for part in value.split(",")) if c]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) > 1 or codings[0] not in _CODINGS:
        raise WireProtocolError(f"the body's content-encoding {value!r} cannot be decoded")
    return codings[0]


class _Decoder:
    """One body's decoder: `feed` yields its decoded bytes in pieces (lazily: a reader that
    stops stops the decoding), `end` checks that the body ended."""

    def __init__(self, coding: str) -> None:
        self._wbits = _CODINGS[coding]
        self._z = zlib.decompressobj(self._wbits)
        self._raw_next = coding == "deflate"  # until its first bytes decode as zlib

    def feed(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                piece = self._z.decompress(data, _PIECE)
            except zlib.error as exc:
                if self._raw_next:
                    # "deflate" should be zlib-wrapped; some servers send it raw.
                    self._raw_next = False
                    self._wbits = _RAW
                    self._z = zlib.decompressobj(_RAW)
                    continue
                raise WireProtocolError(f"the body does not decode: {exc}") from None
            self._raw_next = False
            if piece:
                yield piece
            if self._z.eof:
                data = self._z.unused_data
                if data:
                    if self._wbits != _GZIP:
                        raise WireProtocolError("bytes after the end of the encoded body")
                    self._z = zlib.decompressobj(_GZIP)  # gzip allows several members
            else:
                data = self._z.unconsumed_tail

    def end(self) -> None:
        if not self._z.eof:
            raise WireProtocolError("the encoded body was cut short")


async def decode_whole(chunks: AsyncIterator[bytes], coding: str, limit: int) -> bytes:
    """A whole body's decoded bytes; refused past `limit` of them (a decompression bomb)."""
    decoder = _Decoder(coding)
    out: list[bytes] = []
    size = 0
    async for chunk in chunks:
        for piece in decoder.feed(chunk):
            size += len(piece)
            if size > limit:
                raise WireProtocolError(f"the body decodes to more than {limit} bytes")
            out.append(piece)
    decoder.end()
    return b"".join(out)


async def decode_stream(chunks: AsyncIterator[bytes], coding: str) -> AsyncIterator[bytes]:
    """A stream's decoded bytes as they arrive, never an empty chunk."""
    decoder = _Decoder(coding)
    async for chunk in chunks:
        for piece in decoder.feed(chunk):
            yield piece
    decoder.end()
