"""InfoStreamDecoder: reassembly across reads and Portmaster's resync rules (kext-contract
C14-1): a known type with a bad body is reported and skipped by its length, an unknown type ends
the stream, and a record cut off by the end of the stream is reported by close()."""

from __future__ import annotations

import pytest

from kextless.protocol.kext import (
    BandwidthEntry,
    BandwidthStatsV6,
    ConnectionEndEventV4,
    ConnectionIpv4,
    ConnectionIpv6,
    DecodeError,
    Info,
    InfoStreamDecoder,
    LogLine,
    encode_info,
)

V4 = ConnectionIpv4(
    7, 99, 0, 6, bytes([10, 0, 0, 1]), bytes([1, 1, 1, 1]), 40000, 443, 3, b"\x45" * 40
)
V6 = ConnectionIpv6(
    1, 2, 3, 4, bytes(range(1, 17)), bytes(range(2, 18)), 5, 6, 7, bytes(range(1, 11))
)
LOG = LogLine(3, "src/device.rs:201 Verdict invalid id: 7")
END = ConnectionEndEventV4(99, 0, 6, bytes([10, 0, 0, 1]), bytes([1, 1, 1, 1]), 40000, 443)
BW = BandwidthStatsV6(17, (BandwidthEntry(bytes(16), 1, bytes(15) + b"\x01", 2, 3, 4),))
RECORDS: list[Info] = [LOG, V4, V6, END, BW]
STREAM = b"".join(encode_info(r) for r in RECORDS)


def decode_all(chunks: list[bytes], max_body: int | None = None) -> list[Info | DecodeError]:
    decoder = InfoStreamDecoder() if max_body is None else InfoStreamDecoder(max_body)
    out: list[Info | DecodeError] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out + decoder.close()


def test_one_chunk_and_one_byte_at_a_time_give_the_same_records() -> None:
    assert decode_all([STREAM]) == RECORDS
    assert decode_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == RECORDS


@pytest.mark.parametrize("cut", range(len(STREAM) + 1))
def test_split_at_every_byte_offset(cut: int) -> None:
    assert decode_all([STREAM[:cut], STREAM[cut:]]) == RECORDS


def test_records_come_out_as_soon_as_they_are_complete() -> None:
    decoder = InfoStreamDecoder()
    first = len(encode_info(LOG))
    assert decoder.feed(STREAM[: first - 1]) == []
    assert decoder.buffered == first - 1
    assert decoder.feed(STREAM[first - 1 : first]) == [LOG]
    assert decoder.buffered == 0


def test_v6_body_labelled_v4_in_the_middle_is_reported_and_skipped() -> None:
    # The kext's own test stream opens with exactly this record (kext-contract C2-3).
    bad = b"\x01" + encode_info(V6)[1:]
    stream = encode_info(LOG) + bad + encode_info(END)
    out = decode_all([stream])
    assert out[0] == LOG and out[2] == END and len(out) == 3
    err = out[1]
    assert isinstance(err, DecodeError)
    assert err.offset == len(encode_info(LOG))
    assert not err.fatal
    assert "ConnectionIpv4" in err.message and "payload_len" in err.message


# A LogLine's text has no length of its own, so only the fixed-layout types can mismatch.
@pytest.mark.parametrize("record", RECORDS[1:], ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("delta", [-1, 1])
def test_body_length_mismatch_of_every_type_is_skipped_by_its_length(
    record: Info, delta: int
) -> None:
    wire = encode_info(record)
    body = wire[5:] + b"\x00" if delta > 0 else wire[5:-1]
    bad = wire[:1] + len(body).to_bytes(4, "little") + body
    stream = encode_info(LOG) + bad + encode_info(END)
    out = decode_all([stream])
    assert [type(x) for x in out] == [LogLine, DecodeError, ConnectionEndEventV4]
    assert out[1].offset == len(encode_info(LOG))
    assert out[2] == END


@pytest.mark.parametrize("body", [b"", b"\x03"], ids=["no-severity", "no-text"])
def test_log_line_without_text_is_reported_and_skipped(body: bytes) -> None:
    # Portmaster cannot read a LogLine with an empty text (kext-contract C14-1).
    bad = b"\x00" + len(body).to_bytes(4, "little") + body
    out = decode_all([encode_info(END) + bad + encode_info(LOG)])
    assert [type(x) for x in out] == [ConnectionEndEventV4, DecodeError, LogLine]
    assert out[1].offset == len(encode_info(END)) and "LogLine" in out[1].message


@pytest.mark.parametrize("type_byte", [7, 8, 0x7F, 0xFF])
def test_unknown_type_is_fatal_and_nothing_follows(type_byte: int) -> None:
    decoder = InfoStreamDecoder()
    prefix = encode_info(LOG) + encode_info(V4)
    out = decoder.feed(
        prefix + bytes([type_byte]) + (3).to_bytes(4, "little") + b"abc" + encode_info(END)
    )
    assert out[:2] == [LOG, V4]
    assert len(out) == 3
    assert out[2] == DecodeError(f"unknown info type {type_byte}", len(prefix), fatal=True)
    assert decoder.finished
    assert decoder.feed(encode_info(END)) == []
    assert decoder.close() == []


def test_truncated_tail_is_reported_by_close_with_the_record_offset() -> None:
    decoder = InfoStreamDecoder()
    head = encode_info(LOG)
    assert decoder.feed(head + encode_info(V4)[:20]) == [LOG]
    [err] = decoder.close()
    assert err.offset == len(head)
    assert "truncated ConnectionIpv4" in err.message and "15 of 75" in err.message
    assert not err.fatal


def test_truncated_header_is_reported_by_close() -> None:
    decoder = InfoStreamDecoder()
    assert decoder.feed(encode_info(END) + b"\x02\x10") == [END]
    [err] = decoder.close()
    assert err.offset == len(encode_info(END))
    assert "header" in err.message


def test_clean_end_reports_nothing() -> None:
    decoder = InfoStreamDecoder()
    assert decoder.feed(STREAM) == RECORDS
    assert decoder.close() == []


def test_oversized_body_is_skipped_without_buffering_it() -> None:
    limit = 1000
    body_len = 50_000
    oversized = b"\x05" + body_len.to_bytes(4, "little") + bytes(body_len)
    stream = encode_info(LOG) + oversized + encode_info(END)
    decoder = InfoStreamDecoder(max_body=limit)
    out: list[Info | DecodeError] = []
    peak = 0
    for i in range(0, len(stream), 700):
        out += decoder.feed(stream[i : i + 700])
        peak = max(peak, decoder.buffered)
    out += decoder.close()
    assert peak < 700 + 5
    assert [type(x) for x in out] == [LogLine, DecodeError, ConnectionEndEventV4]
    assert out[1].offset == len(encode_info(LOG))
    assert "BandwidthStatsV4" in out[1].message and "50000" in out[1].message


def test_stream_ending_inside_a_skipped_record_names_that_record() -> None:
    decoder = InfoStreamDecoder(max_body=30)
    head = encode_info(END)
    out = decoder.feed(head + b"\x03" + (100).to_bytes(4, "little") + bytes(30))
    assert out[0] == END and isinstance(out[1], DecodeError)
    [err] = decoder.close()
    assert err.offset == len(head)
    assert "70 bytes" in err.message


def test_largest_legal_body_is_still_buffered_and_decoded() -> None:
    # Just at the limit: a real bandwidth table must not be mistaken for corruption.
    entries = tuple(BandwidthEntry(bytes(16), i, bytes(16), i, i, i) for i in range(100))
    big = BandwidthStatsV6(6, entries)
    wire = encode_info(big)
    assert decode_all(
        [wire[i : i + 333] for i in range(0, len(wire), 333)], max_body=len(wire) - 5
    ) == [big]
