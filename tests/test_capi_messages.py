"""The C ABI's pure helpers (bindings/kvwire_capi.py), without building libkvwire.so: the
option grammar, messages in C terms, and the layout difference read from a real handshake.
The library itself is tested from C by ctest (bindings/tests)."""

import errno
import importlib.util
import time
from pathlib import Path

import pytest

import kvwire
from kvwire.engine.sender import layout_summary
from kvwire.proto import NEED_DATA, ClientConnection, FrameReader, ServerConnection

_spec = importlib.util.spec_from_file_location(
    "kvwire_capi_helpers", Path(__file__).resolve().parent.parent / "bindings" / "kvwire_capi.py"
)
capi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capi)

C_LAYOUT = {"num_layers": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 16, "dtype": 2}  # KVW_FP32


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("", {}),
        ("   ", {}),
        ("streams=2", {"streams": 2}),
        (" streams = 2 , codec = fp8 ", {"streams": 2, "codec": "fp8"}),
        ("connect_timeout=2.5,transport=ucx", {"connect_timeout": 2.5, "transport": "ucx"}),
        ("connect_timeout=.5", {"connect_timeout": 0.5}),
    ],
)
def test_options_that_parse(text, parsed):
    assert capi.parse_options(text, capi.SENDER_OPTIONS) == parsed


@pytest.mark.parametrize(
    "text, message",
    [
        ("streams=2,,codec=raw", "item 2 .* is empty"),
        ("streams=2,", "item 2 .* is empty"),
        ("streams=2,streams=3", "streams is given twice"),
        ("codec=", "codec has an empty value"),
        ("codec", "'codec' is not key=value"),
        ("Streams=2", "unknown option 'Streams'"),
        ("streams=0", r"streams=0 is out of range 1\.\.64"),
        ("streams=1e3", "streams='1e3' is not a whole number"),
        ("streams=+2", "not a whole number"),
        ("connect_timeout=nan", "connect_timeout='nan' is not a number of seconds"),
        ("connect_timeout=-1", "not a number of seconds"),
        ("transport=TCP", r"transport='TCP' is not one of tcp\|ucx"),
        ("chunk_kib=1", r"chunk_kib=1 is out of range 4\.\.1048576"),
    ],
)
def test_options_that_are_refused_name_the_option(text, message):
    with pytest.raises(capi.Invalid, match=message):
        capi.parse_options(text, capi.SENDER_OPTIONS)


def test_messages_are_rewritten_in_c_terms():
    assert capi.c_terms("dtype torch.bfloat16 does not match the layout's torch.float32") == (
        "dtype KVW_BF16 does not match the layout's KVW_FP32"
    )
    assert capi.c_terms("accepted codecs are ['fp8', 'int4/g64']") == "accepted codecs are fp8|int4/g64"
    assert capi.c_terms("cannot connect to h:1: [Errno 111] Connection refused") == (
        "cannot connect to h:1: connection refused (ECONNREFUSED)"
    )
    assert capi.c_terms("finish: layers [1, 2] of 'x' were never sent").startswith("kvw_transfer_finish: layers [1, 2]")
    assert capi.c_terms("no expect() for 'r' within 60 s") == "no kvw_expect for 'r' within 60 s"
    assert capi.c_terms("timeout: must be a finite number of seconds, got inf").startswith("timeout_s: must")
    assert capi.c_terms("connect_timeout: must be positive").startswith("connect_timeout: must")
    assert capi.c_terms("staging_bytes: budget of 1048576 bytes is less than one slot (2162688)") == (
        "staging_mib: budget of 1048576 bytes is less than one slot (2162688)"
    )
    assert capi.c_terms("window_bytes: 1048576 is less than one slot (4259840)") == (
        "window_mib: 1048576 bytes is less than one slot (4259840)"
    )
    assert capi.c_terms("chunk_bytes: an int of at least 4096").startswith("chunk_kib: an int")
    assert capi.c_terms("cannot resolve 'x': [Errno -2] Name or service not known") == (
        "cannot resolve 'x': name or service not known"
    )
    assert capi.os_error_text(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "address already in use (EADDRINUSE)"
    )


def rejection(sender: kvwire.KVLayout, receiver: kvwire.KVLayout) -> str:
    """The message a sender gets when the receiver refuses its layout, from the real
    handshake (sans I/O: the two protocol objects talk through memory)."""
    secret = b"x" * 16
    c = ClientConnection(secret, session="ab" * 8, conn_index=0, conn_count=1, fingerprint=sender.model_fingerprint(),
                         layout=layout_summary(sender), codec="raw")  # fmt: skip
    s = ServerConnection(secret, fingerprint=receiver.model_fingerprint(), layout=layout_summary(receiver),
                         check_codec=lambda codec: None, window=1 << 20, max_payload=1 << 16)  # fmt: skip
    to_server, to_client = FrameReader(s), FrameReader(c)

    def deliver(data: bytes, reader: FrameReader) -> None:
        reader.feed(data)
        while reader.next_events() is not NEED_DATA:
            pass

    deliver(c.data_to_send(), to_server)  # HELLO
    deliver(s.data_to_send(), to_client)  # CHALLENGE, and the client answers
    with pytest.raises(kvwire.LayoutMismatch):
        deliver(c.data_to_send(), to_server)  # AUTH: the server rejects the layout
    with pytest.raises(kvwire.LayoutMismatch) as rejected:
        deliver(s.data_to_send(), to_client)  # REJECT
    return str(rejected.value)


@pytest.mark.parametrize(
    "receiver, named",
    [
        (kvwire.KVLayout.gqa(6, 2, 64, 16, "fp32"), "num_layers is 4 here, 6 on the receiver"),
        (kvwire.KVLayout.gqa(4, 2, 64, 16, "bf16"), "dtype is KVW_FP32 here, KVW_BF16 on the receiver"),
        (kvwire.KVLayout.mla(4, 128, 16, "fp32"), "num_kv_heads is 2 here, 0 (MLA latent) on the receiver"),
        (kvwire.KVLayout.gqa(4, 4, 64, 16, "fp32"), "num_kv_heads is 2 here, 4 on the receiver"),
        (kvwire.KVLayout.gqa(4, 2, 32, 16, "fp32"), "head_dim is 64 here, 32 on the receiver"),
    ],
)
def test_a_layout_mismatch_names_the_field_that_differs(receiver, named):
    sender = kvwire.KVLayout.gqa(4, 2, 64, 16, "fp32")
    message = capi.layout_difference(rejection(sender, receiver), C_LAYOUT)
    assert named in message
    assert "torch." not in message and "fingerprint" not in message


def test_a_layout_message_it_cannot_read_is_passed_on_in_c_terms():
    assert capi.layout_difference("the layouts differ: torch.float32", C_LAYOUT) == "the layouts differ: KVW_FP32"


def test_status_codes_match_the_header_and_each_error_has_its_own():
    import re

    header = (Path(__file__).resolve().parent.parent / "bindings" / "kvwire.h").read_text()
    enum = header[header.index("enum kvw_status {") : header.index("};", header.index("enum kvw_status {"))]
    codes = {name: int(value) for name, value in re.findall(r"\bKVW_([A-Z_]+) = (\d+)", enum)}
    names = {name.removeprefix("ERR_"): value for name, value in codes.items()}
    assert names == {name: getattr(capi, name) for name in names}, "kvwire.h and kvwire_capi.py disagree"
    assert set(capi.MESSAGES) == set(codes.values())
    assert capi.status_of(kvwire.ChecksumMismatch("9 payloads failed their checksum")) == capi.CHECKSUM
    assert capi.status_of(kvwire.TransferError("another token count")) == capi.TRANSFER
    assert capi.status_of(kvwire.Cancelled("by the peer")) == capi.CANCELLED


@pytest.mark.parametrize("ending", ["deadline", "failed"])
def test_a_layer_given_after_a_poll_saw_the_failure_is_dropped_not_refused(ending, monkeypatch):
    """kvw_transfer_poll reads a failed transfer's outcome; a send_layer after it must be
    dropped (KVW_OK), as it is without the poll, not refused as the caller's mistake."""
    from tests.helpers import SECRET

    monkeypatch.setattr(capi, "_kvwire", kvwire)  # what kvw_init sets

    layout = kvwire.KVLayout.gqa(num_layers=3, num_kv_heads=2, head_dim=64, block_size=16)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(8))
    try:
        with kvwire.Sender(layout, rx.address, secret=SECRET, kv_caches=layout.allocate(8)) as tx:
            if ending == "failed":
                rx.expect("x", [4, 5], 20)  # the sender says 30: the receiver fails it at BEGIN
            handle = tx.transfer("x", [0, 1], 30 if ending == "failed" else 20, deadline=0.3)
            transfer = capi.Transfer(handle, on_gpu=False, deadline_s=0.3)
            handle.send_layer(0)
            deadline = time.monotonic() + 10
            while transfer.poll() == capi.PENDING if time.monotonic() < deadline else False:
                time.sleep(0.01)
    except kvwire.TransferError as exc:
        assert ("deadline" if ending == "deadline" else "expects 20") in str(exc)
        handle.send_layer(1)  # dropped
        handle.send_layer(2)
    else:
        pytest.fail("the poll did not report the failure")
    finally:
        rx.close()


def test_polling_a_request_past_its_deadline_never_blocks(monkeypatch):
    """A slow path: the request's deadline passes while a payload is still landing in its
    rows. kvw_request_poll must not wait for that payload (wait would, up to the drain
    limit): it says PENDING until the request has ended, then its outcome."""
    from tests.helpers import SECRET, TcpRelay

    monkeypatch.setattr(capi, "_kvwire", kvwire)
    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16)
    rx = kvwire.Receiver(layout, secret=SECRET, kv_caches=layout.allocate(64))
    relay = TcpRelay(rx.address, rate=16e3)  # a 64 KiB chunk takes 4 s: past the drain limit
    try:
        with kvwire.Sender(layout, relay.address, secret=SECRET, kv_caches=layout.allocate(64), streams=1,
                           max_streams=1, chunk_bytes=64 << 10) as tx:  # fmt: skip
            h = rx.expect("slow", list(range(64)), 1024, deadline=1.5)
            t = tx.transfer("slow", list(range(64)), 1024, deadline=30)
            for layer in range(layout.num_layers):
                t.send_layer(layer)
            longest, outcome, give_up = 0.0, None, time.monotonic() + 15
            while outcome is None and time.monotonic() < give_up:
                t0 = time.monotonic()
                try:
                    if capi.request_poll(h) == capi.OK:
                        outcome = "ok"
                except kvwire.TransferTimeout:
                    outcome = "timeout"
                longest = max(longest, time.monotonic() - t0)
                time.sleep(0.01)
            assert outcome == "timeout" and longest < 0.5, (outcome, longest)
    finally:
        relay.close()
        rx.close()


def test_a_handle_freed_by_two_threads_at_once_is_freed_once():
    """Handles.pop finds and removes in one hold of its lock: of several threads freeing
    one handle together, exactly one gets it, the others Closed (kvw_transfer_free twice
    at once returned KVW_OK twice)."""
    import threading

    class YieldingLock:  # gives the other threads their turn after each release, as a busy host might
        def __init__(self) -> None:
            self._lock = threading.Lock()

        def __enter__(self):
            self._lock.acquire()

        def __exit__(self, *exc) -> None:
            self._lock.release()
            time.sleep(0.001)

    def free(handles, h, start, got, closed) -> None:
        start.wait()
        try:
            got.append(handles.pop("transfer", h, "transfer"))
        except capi.Closed:
            closed.append(1)

    for _ in range(20):
        handles = capi.Handles()
        handles._lock = YieldingLock()
        h = handles.add("transfer", object())
        got: list = []
        closed: list = []
        start = threading.Barrier(4)
        threads = [threading.Thread(target=free, args=(handles, h, start, got, closed)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(got) == 1 and len(closed) == 3
