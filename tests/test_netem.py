"""The emulated wide-area link: its spec parser, segment-level loss on TSO super-packets,
and (as root) a real run of the benchmark across it."""

import os
import random
import struct

import pytest

from kvwire.bench import netem
from kvwire.bench.cli import main


@pytest.mark.parametrize(
    "text, message",
    [
        ("rate=2gbit", "rtt= is required"),
        ("rtt=40ms", "rate= is required"),
        ("rtt=40,rate=2gbit", "duration"),
        ("rtt=40ms,rate=2gb", "rate like"),
        ("rtt=40ms,rate=2gbit,loss=0.01", "percentage"),
        ("rtt=40ms,rate=2gbit,loss=100%", "percentage"),
        ("rtt=40ms,rate=2gbit,colour=red", "unknown field"),
        ("rtt=40ms rate=2gbit", "key=value"),
    ],
)
def test_bad_link_specs_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        netem.parse_link(text)


def test_link_spec_fields():
    spec = netem.parse_link("rtt=40ms,rate=2gbit,loss=0.01%,jitter=2ms,queue=16mb")
    assert (spec.rtt_s, spec.rate_bps, spec.loss, spec.jitter_s, spec.queue_limit) == (
        0.04, 2e9, 0.0001, 0.002, 16 << 20)  # fmt: skip
    assert netem.parse_link("rtt=40ms,rate=2gbit").queue_limit == 2 * 250_000_000 * 0.04


def super_packet(segments: int, mss: int = 1448) -> bytes:
    payload = bytes(range(256)) * (segments * mss // 256 + 1)
    payload = payload[: segments * mss - 100]  # the last segment is short
    tcp = struct.pack("!HHIIBBHHH", 5000, 6000, 1_000_000, 77, 5 << 4, 0x18 | 0x01, 512, 0, 0)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 42, 0, 64, 6, 0,
                               bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])))  # fmt: skip
    struct.pack_into("!H", ip, 10, 0xFFFF - netem._checksum(bytes(ip)))
    vnet = netem.VNET.pack(1, netem.VNET_GSO_TCPV4, 40, mss, 20, 16)
    return vnet + bytes(ip) + tcp + payload


def test_losing_one_segment_splits_the_super_packet_around_it():
    pkt = super_packet(10)
    keep = [True] * 10
    keep[4] = False
    parts = netem.split_segments(pkt, keep)
    assert len(parts) == 2
    original_payload = pkt[netem.VNET.size + 40 :]
    seqs, payloads = [], []
    for p in parts:
        ip = p[netem.VNET.size :]
        assert netem._checksum(ip[:20]) == 0xFFFF  # a valid IPv4 header checksum
        assert struct.unpack_from("!H", ip, 2)[0] == len(ip)
        seqs.append(struct.unpack_from("!I", ip, 24)[0])
        payloads.append(ip[40:])
    assert seqs == [1_000_000, 1_000_000 + 5 * 1448]
    assert payloads[0] == original_payload[: 4 * 1448]
    assert payloads[1] == original_payload[5 * 1448 :]
    assert parts[0][netem.VNET.size + 20 + 13] & 0x09 == 0  # no FIN/PSH before the end
    assert parts[1][netem.VNET.size + 20 + 13] & 0x09 == 0x09


def test_loss_rate_is_per_segment():
    rng = random.Random(1)
    pkt = super_packet(40)
    lost = sum(netem.lose_segments(pkt, 0.01, rng)[1] for _ in range(2000))
    assert 0.7 * 800 < lost < 1.3 * 800  # 2000 packets x 40 segments x 1%


def test_link_needs_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exc:
        main(["loopback", "--link", "rtt=10ms,rate=1gbit"])
    assert exc.value.code == 2
    assert "needs root" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun")
def test_a_transfer_across_the_emulated_link(tmp_path):
    import json

    out = tmp_path / "r.json"
    code = main(["loopback", "--link", "rtt=20ms,rate=1gbit,loss=0.1%", "--tokens", "256", "--streams", "2",
                 "--quiet", "--json", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["verified"] is True
    assert report["link"]["lost_segments"] > 0  # loss really happened, and TCP recovered
    assert min(c["tcp"]["rtt_us"] for c in report["connections"]) >= 20_000  # the delay is real
