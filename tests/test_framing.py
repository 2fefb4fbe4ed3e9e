"""The 4-byte length-prefixed frame codec."""

from __future__ import annotations

import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snocat_proto._wire.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from snocat_proto._wire.framing import LENGTH_PREFIX_SIZE, FrameDecoder, encode_frame

# The "valid result or ProtocolError" properties get more examples than the rest.
ARBITRARY_EXAMPLES = 500

cut_points = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds)]


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def decode_chunks(chunks: list[bytes], max_size: int) -> tuple[list[bytes], bytes, bool]:
    """Frames, the undecoded tail, and whether FrameTooLarge was raised."""
    decoder = FrameDecoder(max_size)
    frames: list[bytes] = []
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
    except FrameTooLarge:
        return frames, b"", True
    return frames, decoder.take_remainder(), False


def test_encode_examples() -> None:
    assert LENGTH_PREFIX_SIZE == 4
    assert encode_frame(b"") == bytes(4)
    assert encode_frame(b'""') == bytes.fromhex("00000002") + b'""'
    assert encode_frame(b'["[::]:8080"]') == bytes.fromhex("0000000D") + b'["[::]:8080"]'
    assert encode_frame(b"x" * 256)[:4] == bytes.fromhex("00000100")


def test_encode_refuses_oversized_payload() -> None:
    class Huge(bytes):
        def __len__(self) -> int:
            return 2**32

    with pytest.raises(LocalProtocolError):
        encode_frame(Huge())


def test_decode_trace() -> None:
    decoder = FrameDecoder(1024)
    decoder.feed(bytes.fromhex("0000000D") + b'["[::]:8080"]' + b"tail")
    assert decoder.next_frame() == b'["[::]:8080"]'
    assert decoder.buffered == 4
    assert decoder.take_remainder() == b"tail"
    assert decoder.buffered == 0
    assert decoder.next_frame() is None


def test_partial_frames() -> None:
    decoder = FrameDecoder(100)
    assert decoder.next_frame() is None
    decoder.feed(b"\x00\x00")
    assert decoder.next_frame() is None
    decoder.feed(b"\x00\x03ab")
    assert decoder.next_frame() is None
    assert decoder.buffered == 6
    decoder.feed(b"c\x00")
    assert decoder.next_frame() == b"abc"
    assert decoder.next_frame() is None
    assert decoder.take_remainder() == b"\x00"


def test_empty_frames() -> None:
    decoder = FrameDecoder(0)
    decoder.feed(bytes(12))
    assert drain(decoder) == [b"", b"", b""]


def test_limit_is_inclusive() -> None:
    decoder = FrameDecoder(5)
    decoder.feed(encode_frame(b"12345"))
    assert decoder.next_frame() == b"12345"
    with pytest.raises(FrameTooLarge):
        decoder.feed(encode_frame(b"123456"))


def test_too_large_raised_on_header_alone() -> None:
    decoder = FrameDecoder(2048)
    header = (2049).to_bytes(4, "big")
    for byte in header[:3]:
        decoder.feed(bytes([byte]))
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header[3:])
    assert isinstance(info.value, RemoteProtocolError)
    assert "2049" in info.value.reason
    # Nothing of the payload was needed, and the decoder keeps refusing.
    assert decoder.buffered == 4
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_too_large_is_judged_only_at_the_head() -> None:
    # Bytes after the frame a protocol wants belong to the next layer.
    decoder = FrameDecoder(4)
    decoder.feed(encode_frame(b"addr") + b"\xff\xff\xff\xff service bytes")
    assert decoder.next_frame() == b"addr"
    assert decoder.take_remainder() == b"\xff\xff\xff\xff service bytes"


def test_bad_max_size() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(-1)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(2**32)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(True)
    assert FrameDecoder(7).max_size == 7


def test_linear_for_bytewise_and_bulk_input() -> None:
    payloads = [bytes([i % 256]) * (i % 17) for i in range(20_000)]
    stream = b"".join(encode_frame(p) for p in payloads)
    started = time.perf_counter()
    decoder = FrameDecoder(64)
    decoder.feed(stream)
    assert drain(decoder) == payloads
    one_frame = encode_frame(bytes(range(256)) * 400)
    decoder = FrameDecoder(len(one_frame))
    for index in range(len(one_frame)):
        decoder.feed(one_frame[index : index + 1])
    assert decoder.next_frame() == bytes(range(256)) * 400
    assert decoder.buffered == 0
    # Quadratic copying would take minutes here; linear takes well under a second.
    assert time.perf_counter() - started < 10


@given(st.lists(st.binary(max_size=40), max_size=10), st.binary(max_size=3), cut_points)
def test_roundtrip_any_chunking(payloads: list[bytes], tail: bytes, cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads) + tail
    frames, remainder, too_large = decode_chunks(split_at(stream, cuts), 40)
    assert (frames, remainder, too_large) == (payloads, tail, False)


@settings(max_examples=ARBITRARY_EXAMPLES)
@given(st.binary(max_size=80), cut_points, st.integers(min_value=0, max_value=64))
def test_arbitrary_bytes_independent_of_chunking(
    data: bytes, cuts: list[int], max_size: int
) -> None:
    whole = decode_chunks([data], max_size)
    bytewise = decode_chunks([data[i : i + 1] for i in range(len(data))], max_size)
    chunked = decode_chunks(split_at(data, cuts), max_size)
    # Frames before an oversized header are delivered however the bytes arrive.
    assert whole == bytewise == chunked
    frames, remainder, too_large = whole
    if not too_large:
        assert b"".join(encode_frame(f) for f in frames) + remainder == data
