"""An authenticated peer sends mutated frames at a receiver whose caches are canary-guarded.

The invariant, whatever the bytes: no byte outside the expected request's rows changes,
no receiver thread dies of an unexpected exception, every fatal frame closes only its own
connection (counted, with a reason), and a well-behaved sender still gets through after.

Small by default (``--fuzz-frames``, default 300, or ``KVWIRE_FUZZ_FRAMES``); a large run:
``python -m pytest tests/test_fuzz.py --fuzz-frames 100000``.
"""

from __future__ import annotations

import random
import struct
import threading
import time

import pytest
import torch

import kvwire
from kvwire.proto import FrameType, Header, crc32c
from kvwire.proto.frames import HEADER_SIZE
from tests.helpers import SECRET, WireClient, assert_transferred, filled

LAYOUT = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16)
CANARY = 0x5A
DST_BLOCKS = [4, 5]
NUM_TOKENS = 20  # block 4 whole, rows 0..3 of block 5: the rest of block 5 is canary too
ROW_BYTES = 2 * 64 * 2


def valid_frames(tag: int) -> list[bytes]:
    """Every DATA frame of one request, raw: one chunk per layer and tensor."""
    frames = []
    for layer in range(LAYOUT.num_layers):
        for tensor in range(2):
            payload = random.randbytes(NUM_TOKENS * ROW_BYTES)
            header = Header(FrameType.DATA, tag=tag, layer=layer, tensor=tensor, start=0, count=NUM_TOKENS,
                            length=len(payload), payload_crc=crc32c(payload))  # fmt: skip
            frames.append(header.pack() + payload)
    return frames


def reseal(header_bytes: bytes) -> bytes:
    """A header whose checksum is recomputed, so a mutation reaches the semantic checks."""
    body = header_bytes[:28]
    return body + struct.pack("<I", crc32c(body))


# (offset, struct format) of the header fields a mutation may change
FIELDS = [(2, "B"), (3, "B"), (4, "I"), (8, "H"), (10, "B"), (11, "B"), (12, "I"), (16, "I"), (20, "I"), (24, "I")]
INTERESTING = [0, 1, 2, 3, 15, 16, 17, 19, 20, 21, 31, 32, 255, 256, 4095, 4096, 65535, 1 << 20, (1 << 31) - 1,
               (1 << 32) - 1]  # fmt: skip


def mutate(frame: bytes, rng: random.Random) -> bytes:
    header, payload = bytearray(frame[:HEADER_SIZE]), bytearray(frame[HEADER_SIZE:])
    kind = rng.randrange(8)
    if kind <= 2:  # one header field, checksum resealed
        offset, fmt = rng.choice(FIELDS)
        limit = 1 << (8 * struct.calcsize(fmt))
        value = rng.choice(INTERESTING + [rng.randrange(limit)]) % limit
        struct.pack_into("<" + fmt, header, offset, value)
        return reseal(bytes(header)) + bytes(payload)
    if kind == 3:  # payload bytes flipped, CRC left as it was
        for _ in range(rng.randint(1, 8)):
            payload[rng.randrange(len(payload))] ^= 1 << rng.randrange(8)
        return bytes(header) + bytes(payload)
    if kind == 4:  # payload bytes flipped and CRC recomputed: a "valid" frame with other data
        payload[rng.randrange(len(payload))] ^= 0xFF
        struct.pack_into("<I", header, 24, crc32c(bytes(payload)))
        return reseal(bytes(header)) + bytes(payload)
    if kind == 5:  # a random header byte, checksum not resealed
        header[rng.randrange(HEADER_SIZE)] ^= 1 << rng.randrange(8)
        return bytes(header) + bytes(payload)
    if kind == 6:  # truncated
        return frame[: rng.randrange(len(frame))]
    # a control frame with a random type and payload
    body = rng.randbytes(rng.randrange(64))
    ftype = rng.choice(list(FrameType))
    return Header(ftype, tag=rng.choice([1, 2, 7]), count=rng.choice(INTERESTING), length=len(body),
                  payload_crc=crc32c(body)).pack() + body  # fmt: skip


def settle(client: WireClient, handle, timeout: float = 5.0) -> int:
    """Wait until the request is done (every chunk arrived), the receiver closed this
    connection (a fatal frame: 1), or asked for a chunk again (a payload that failed its
    checksum: it is not sent again here). A mutation may also leave the request incomplete
    on an open connection (a dropped frame): then the wait ends at ``timeout``."""
    from kvwire.proto import FrameReader, Nack
    from kvwire.proto.reader import NEED_DATA

    reader = FrameReader(client.proto)
    client.sock.settimeout(0.02)
    end = time.monotonic() + timeout
    while time.monotonic() < end and not handle.done():
        try:
            data = client.sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return 1
        if data == b"":
            return 1
        reader.feed(data)
        while (events := reader.next_events()) is not NEED_DATA:
            if any(isinstance(e, Nack) for e in events):
                return 0
    return 0


def outside_rows_untouched(caches) -> bool:
    """Every cache byte outside the request's rows still holds the canary."""
    for layer in caches:
        for t in layer.values():
            b = t.view(torch.uint8).view(t.shape[0], -1)
            mask = torch.ones(b.shape, dtype=torch.bool)
            mask[DST_BLOCKS[0]] = False
            mask[DST_BLOCKS[1], : (NUM_TOKENS - 16) * ROW_BYTES] = False
            if not bool((b[mask] == CANARY).all()):
                return False
    return True


def test_mutated_frames_never_write_outside_the_request(request):
    budget = request.config.getoption("--fuzz-frames")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    random.seed(seed)
    dst = LAYOUT.allocate(8)
    for layer in dst:
        for t in layer.values():
            t.view(torch.uint8).fill_(CANARY)
    crashes: list[BaseException] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: crashes.append(args.exc_value)  # a reader thread died
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=dst)
    sent = closed = 0
    try:
        while sent < budget:
            request_id = f"victim-{sent}"
            handle = rx.expect(request_id, DST_BLOCKS, NUM_TOKENS, deadline=30)
            client = WireClient(rx.address, LAYOUT, session=rng.randbytes(16).hex())
            frames = valid_frames(tag=1)
            stream = [client.proto.begin(1, request_id, NUM_TOKENS)]
            for frame in frames:  # each frame mutated with probability 1/3
                if rng.random() < 1 / 3:
                    stream.append(mutate(frame, rng))
                    sent += 1
                else:
                    stream.append(frame)
            try:
                client.send(b"".join(stream))
            except OSError:
                pass  # the receiver closed it mid-way: a fatal frame came early
            closed += settle(client, handle)
            client.close()
            assert outside_rows_untouched(dst), f"canary overwritten (seed {seed})"
        assert not crashes, f"receiver threads died: {crashes[:3]} (seed {seed})"
        assert rx.stats()["protocol_errors"] >= 1  # the mutations were seen and refused
        # a well-behaved sender still gets through
        src = filled(LAYOUT, 8, seed=3)
        h = rx.expect("after-fuzz", [6, 7], 20)
        with kvwire.Sender(LAYOUT, rx.address, secret=SECRET, kv_caches=src, streams=2) as tx:
            tx.send("after-fuzz", [0, 1], 20, timeout=20)
        h.wait(timeout=10)
        assert_transferred(LAYOUT, src, [0, 1], dst, [6, 7], 20)
    finally:
        threading.excepthook = previous_hook
        rx.close()
    print(f"fuzz: {sent} mutated frames, {closed} connections closed by the receiver, seed {seed}")


@pytest.mark.parametrize("tokens", [0, LAYOUT.block_size * 8 + 1, (1 << 32) - 1])
def test_begin_out_of_bounds_is_refused(tokens):
    rx = kvwire.Receiver(LAYOUT, secret=SECRET, kv_caches=LAYOUT.allocate(8))
    try:
        client = WireClient(rx.address, LAYOUT)
        client.send(client.proto.begin(1, "oob", tokens))
        client.sock.settimeout(10)
        from kvwire.proto import parse_header

        header = parse_header(client._recv(HEADER_SIZE))
        assert header.type == FrameType.ACK and header.flags != 0
        assert rx.census()["requests"] == 0
    finally:
        rx.close()
