"""The kvwire-bench command line: real runs on loopback, and clear errors for bad flags."""

import json
import statistics

import pytest

from kvwire import scatter
from kvwire.bench.cli import main
from kvwire.bench.procstats import machine_delta, machine_split, machine_ticks
from kvwire.engine import lane


def test_loopback_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["loopback", "--tokens", "100", "--requests", "2", "--streams", "2", "--codec", "int4",
                 "--rounds", "2", "--baseline", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("wire_gb_per_s", "effective_gb_per_s", "exposed_ms", "verified", "baseline_gb_per_s",
                "baseline_hot_gb_per_s", "baseline_checked_gb_per_s", "cpu_s_per_gb", "staging",
                "connections"):  # fmt: skip
        assert key in report, key
    assert report["verified"] is True
    assert report["effective_gb_per_s"] > report["wire_gb_per_s"] > 0  # int4 shrinks the bytes
    assert len(report["connections"]) == 2
    by_round = report["effective_gb_per_s_by_round"]  # every round, the headline being the best
    assert len(by_round) == 2 and max(by_round) == report["effective_gb_per_s"]
    assert report["data_frames_per_send"] == 1  # checksums on: one frame per send (gathering is for none)
    if scatter.available():  # the receiver lands raw payloads as spans; int4 payloads go through staging
        assert report["spans"] == {"sender": True, "receiver": True}
    machine = report["machine_cpu"]  # the machine's CPU split per timed window (empty when too short to tick)
    assert set(machine) == {"kvwire", "cache", "hot", "checked", "in_place"}
    for split in machine.values():
        assert not split or abs(sum(split.values()) - 1) < 1e-9
    for suffix in ("", "_hot", "_checked", "_in_place"):  # each round over the baseline run right after it
        each = report[f"ratio_to_baseline{suffix}_by_round"]
        assert len(each) == 2 and all(r > 0 for r in each)
    assert report["receive_lane"]["lane_frames"] == 0  # int4 payloads are decoded: none lands in place as it is
    printed = capsys.readouterr().out
    assert "kvwire / plain" in printed and "each round, effective" in printed and "host data path" in printed
    assert "(best rounds); each round" in printed and "receive lane 0% of frames" in printed
    assert [c["send_buffer"] for c in report["connections"]] == [128 << 10] * 2  # loopback: local_sndbuf
    assert "send buffer 128 KiB" in printed


def test_loopback_reports_the_chunk_size_in_effect_and_frames_its_ceilings_alike(tmp_path, capsys):
    """--chunk-kib above the receiver's default slot (4 MiB + 64 KiB) must run as asked,
    the report must say what ran, and the checked ceilings must cut pieces that size."""
    from kvwire.bench import baselines
    from kvwire.engine.receiver import DEFAULT_SLOT_BYTES

    assert (8 << 20) > DEFAULT_SLOT_BYTES  # else this test would not test the cap
    for kib in (2048, 8192):
        out = tmp_path / f"{kib}.json"
        assert main(["loopback", "--tokens", "4096", "--rounds", "1", "--chunk-kib", str(kib), "--baseline",
                     "--json", str(out), "--quiet"]) == 0  # fmt: skip
        report = json.loads(out.read_text())
        assert report["verified"] is True and report["chunk_bytes"] == kib << 10
        assert report["baseline_in_place_piece_bytes"] == report["baseline_checked_piece_bytes"] == kib << 10
        assert "baseline_piece_bytes" not in report  # cache to cache has no pieces
        if lane.available():  # raw into host caches: after each part's first chunk, the lane takes them
            assert report["receive_lane"]["lane_frames"] > report["receive_lane"]["frames"] // 2
        printed = capsys.readouterr().out
        assert f"chunks of {kib / 1024:.2f} MiB" in printed and f"{kib / 1024:.2f} MiB pieces" in printed
    pieces = baselines.pieces([memoryview(bytes(5 << 20))], 2 << 20)  # how a ceiling cuts its bytes
    assert [len(p) for p in pieces] == [2 << 20, 2 << 20, 1 << 20]


def test_machine_split_shares_the_ticks_of_a_window():
    before = {"user": 10, "nice": 0, "system": 20, "idle": 5, "iowait": 0, "irq": 0, "softirq": 1, "steal": 0}
    after = {"user": 30, "nice": 0, "system": 70, "idle": 15, "iowait": 5, "irq": 0, "softirq": 31, "steal": 0}
    split = machine_split(machine_delta(before, after))  # 115 ticks in the window, 5 of them iowait
    assert split == pytest.approx({"user": 20 / 115, "system": 50 / 115, "softirq": 30 / 115, "idle": 10 / 115,
                                   "other": 5 / 115})  # fmt: skip
    assert machine_split(machine_delta(before, before)) == {}  # nothing ticked: no shares, not a division by zero
    assert set(machine_ticks()) >= {"user", "system", "idle", "softirq"}  # this machine reports them


def test_loopback_into_blocks_in_order_verifies(tmp_path):
    # One run of destination blocks per chunk (a fresh allocator's order), raw and int4.
    for codec in ("raw", "int4"):
        out = tmp_path / f"{codec}.json"
        assert main(["loopback", "--tokens", "300", "--codec", codec, "--destination", "forward", "--json", str(out),
                     "--quiet"]) == 0  # fmt: skip
        report = json.loads(out.read_text())
        assert report["verified"] is True and report["destination"] == "forward"


def test_loopback_with_exact_tokens_verifies_and_costs_bytes(tmp_path):
    reports = {}
    for exact in ("0", "20"):
        out = tmp_path / f"e{exact}.json"
        assert main(["loopback", "--tokens", "100", "--codec", "fp8", "--exact-tokens", exact, "--json", str(out),
                     "--quiet"]) == 0  # fmt: skip
        reports[exact] = json.loads(out.read_text())
    assert reports["0"]["verified"] is True and reports["20"]["verified"] is True
    assert reports["20"]["wire_bytes_per_round"] > reports["0"]["wire_bytes_per_round"]  # 32 tokens went raw
    assert reports["20"]["logical_bytes_per_round"] == reports["0"]["logical_bytes_per_round"]


def test_loopback_between_different_tensor_parallelism_and_block_sizes(tmp_path):
    # Two prefill ranks to four decode ranks whose blocks are twice as large, int4 with
    # exact tokens: every decode rank checks its heads against the codec's reference.
    reports = {}
    for name, extra in {
        "same": [],
        "split": ["--prefill-tp", "2", "--decode-tp", "4", "--decode-block-size", "32"],
    }.items():
        out = tmp_path / f"{name}.json"
        assert main(["loopback", "--tokens", "150", "--codec", "int4", "--exact-tokens", "16", "--streams", "1",
                     "--json", str(out), "--quiet", *extra]) == 0  # fmt: skip
        reports[name] = json.loads(out.read_text())
    same, split = reports["same"], reports["split"]
    assert same["verified"] is True and split["verified"] is True
    # The same model's bytes cross once, however they are split.
    assert split["logical_bytes_per_round"] == same["logical_bytes_per_round"]
    assert split["tensor_parallel"] == {"prefill": 2, "decode": 4, "prefill_block_size": 16, "decode_block_size": 32,
                                        "pairs": 4}  # fmt: skip
    assert len(split["connections"]) == 4  # each prefill rank serves two decode ranks, one connection each


def test_an_mla_run_counts_the_one_pair_that_sends(tmp_path):
    # An MLA latent goes to a decode rank from one prefill rank alone: one pair, one
    # connection, and the 1 -> 1 comparison gets as many.
    out = tmp_path / "mla.json"
    assert main(["loopback", "--profile", "deepseek-v3", "--tokens", "40", "--prefill-tp", "2", "--decode-tp", "1",
                 "--streams", "1", "--compare-homogeneous", "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verified"] is True and report["homogeneous"]["verified"] is True
    assert report["tensor_parallel"]["pairs"] == 1 and len(report["connections"]) == 1
    assert report["homogeneous"]["streams"] == 1


def test_a_latent_replicated_over_decode_ranks_counts_once_as_logical_bytes(tmp_path, capsys):
    """1 -> 2 with an MLA latent: each decode rank gets the whole latent. The request's KV
    is delivered once, so its logical bytes (and the effective rate, and the ratio to
    1 -> 1, which moves them once) count it once; the copies are reported beside."""
    out = tmp_path / "mla2.json"
    assert main(["loopback", "--profile", "deepseek-v3", "--tokens", "40", "--prefill-tp", "1", "--decode-tp", "2",
                 "--streams", "1", "--compare-homogeneous", "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verified"] is True
    assert report["logical_bytes_per_round"] == report["homogeneous"]["logical_bytes_per_round"]
    assert report["delivered_logical_bytes_per_round"] == 2 * report["logical_bytes_per_round"]
    assert "GiB as the decode ranks hold it" in capsys.readouterr().out


def test_the_baselines_move_every_byte_they_are_credited_with():
    """A baseline is credited with the run's wire bytes; it moves them from the memory
    kvwire moves (caches, then states), and again from the start if they outnumber it."""
    import torch

    from kvwire.bench import baselines, fixture

    caches = [{"k": torch.zeros(2, 8, dtype=torch.bfloat16)}]
    states = [{0: torch.ones(3, dtype=torch.bfloat16)}, {0: torch.ones(2, dtype=torch.bfloat16)}]
    views = fixture.memory_views(caches, states)
    assert [len(v) for v in views] == [32, 6, 4]
    for start, stop in [(0, 42), (10, 40), (30, 100), (84, 85), (5, 5)]:
        got = baselines.byte_range(views, start, stop)
        assert sum(len(v) for v in got) == stop - start
    assert bytes(b"".join(bytes(v) for v in baselines.byte_range(views, 40, 44))) == bytes(views[2][0:2]) + bytes(
        views[0][0:2])  # fmt: skip
    with pytest.raises(ValueError, match="no memory"):
        baselines.byte_range([], 0, 1)


def test_each_request_gets_states_of_its_own():
    """So that a state delivered to the wrong request (or left from the last round) fails."""
    import torch

    from kvwire.bench import fixture, profiles

    layout = profiles.get("kimi-linear-48b").layout()
    a, b = fixture.request_states(layout, 0), fixture.request_states(layout, 1)
    assert a.keys() == b.keys() and a
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_loopback_compares_a_sharded_run_with_one_to_one_in_the_same_run(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["loopback", "--tokens", "150", "--rounds", "2", "--prefill-tp", "2", "--decode-tp", "1",
                 "--streams", "2", "--compare-homogeneous", "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    home = report["homogeneous"]
    assert report["verified"] is True and home["verified"] is True and home["errors"] == []
    assert home["streams"] == 4 and home["connections_at_end"] == 4  # 2 per prefill rank, 2 ranks
    assert home["logical_bytes_per_round"] == report["logical_bytes_per_round"]  # the same bytes
    assert len(home["effective_gb_per_s_by_round"]) == 2 and len(home["ratio_by_round"]) == 2
    assert home["ratio"] == pytest.approx(report["effective_gb_per_s"] / home["effective_gb_per_s"])
    assert home["ratio_by_round"][1] == pytest.approx(
        report["effective_gb_per_s_by_round"][1] / home["effective_gb_per_s_by_round"][1]
    )
    printed = capsys.readouterr().out
    assert "2 TCP connections first per sender-receiver pair (4 in all)" in printed
    sharded_row = next(line for line in printed.splitlines() if line.startswith("sharded / 1 -> 1"))
    median = statistics.median(home["ratio_by_round"])
    assert sharded_row.split()[-1] == f"{median:.3f}" and "median" in sharded_row  # per-round pairs, summarised
    cpu = home["cpu_s_per_gb"]
    row = next(line for line in printed.splitlines() if line.startswith("CPU s per GB, 1 -> 1"))
    assert row.split()[-4:] == ["sender", f"{cpu['sender']:.3f},", "receiver", f"{cpu['receiver']:.3f}"]
    both = report["cpu_s_per_gb"]["sender"] + report["cpu_s_per_gb"]["receiver"]
    assert home["cpu_ratio"] == pytest.approx((cpu["sender"] + cpu["receiver"]) / both)
    row = next(line for line in printed.splitlines() if line.startswith("sharded / 1 -> 1, by CPU"))
    assert row.split("by CPU", 1)[1].split()[0] == f"{home['cpu_ratio']:.3f}"


def test_loopback_with_layer_pacing_reports_both_exposed_latencies(tmp_path):
    """Paced by --layer-ms, two requests with states of their own; a round's window opens
    at its first send_layer, not before the first layer's share of the prefill. (At 2 ms a
    layer, a busy CI machine once produced layer 0 at 1.4 ms: the pace is long enough now
    that half of it tells the two apart whatever the scheduler does.)"""
    out = tmp_path / "r.json"
    assert main(["loopback", "--profile", "kimi-linear-48b", "--tokens", "200", "--layer-ms", "20", "--requests", "2",
                 "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verified"] is True
    assert report["exposed_ms_after_prefill"] > 0 and report["one_layer_wire_ms"] > 0
    assert [t["layer"] for t in report["timeline"]] == list(range(27))
    assert report["timeline"][0]["produced_s"] < 0.010 < report["timeline"][1]["produced_s"]


def test_one_connection_runs_as_the_main_sender_and_its_rounds_are_checked(tmp_path):
    out = tmp_path / "one.json"
    assert main(["loopback", "--tokens", "100", "--rounds", "2", "--checksum", "none", "--compare-single-stream",
                 "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verified"] is True and report["errors"] == [] and report["checksum"] == "none"
    assert report["single_stream_wire_gb_per_s"] > 0


def test_calibrate_with_auto_plans_each_transfer_against_its_target(tmp_path):
    """calibrate --codec auto made a sender without a target, so auto took raw every
    time whatever the link; the target is an option now, and every transfer is planned."""
    out = tmp_path / "calibrate.json"
    assert main(["calibrate", "--transfers", "2", "--min-tokens", "32", "--max-tokens", "64", "--codec", "auto",
                 "--max-exposed-ms", "50", "--gap-ms", "0", "--quiet", "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    rows = report["runs"][0]["transfers"]
    assert len(rows) == 2 and all(r["codec"] in ("raw", "int8h", "int4a") for r in rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["loopback", "--codec", "zstd"], "unknown codec"),
        (["loopback", "--tokens", "0"], "--tokens"),
        (["loopback", "--exact-tokens", "-1"], "--exact-tokens"),
        (["loopback", "--compare-homogeneous"], "only with --prefill-tp"),
        (["loopback", "--profile", "gpt-9"], "unknown profile"),
        (["loopback", "--streams", "100"], "--streams"),
        (["loopback", "--layer-ms", "-1"], "--layer-ms"),
        (["loopback", "--layer-ms", "2", "--baseline"], "--baseline: not with --layer-ms"),
        (["codec", "--dtype", "int8"], "dtype"),
        (["profiles", "--link-gbit", "0"], "--link-gbit"),
        (["soak", "--minutes", "0"], "--minutes"),
        (["flood", "--transfers", "0"], "--transfers"),
        (["loopback", "--ktls"], "--ktls"),
        (["loopback", "--prefill-tp", "3"], "--prefill-tp: tp_size: 8 KV heads do not split evenly over 3 ranks"),
        (["loopback", "--decode-tp", "2", "--baseline"], "--baseline: not with --prefill-tp"),
        (["loopback", "--decode-block-size", "0"], "--decode-block-size"),
        (["loopback", "--local-sndbuf-kib", "64"], "--local-sndbuf-kib: 0 (the kernel's autotuning) or at least 128"),
        (["loopback", "--local-sndbuf-kib", "-1"], "--local-sndbuf-kib"),
        (["calibrate", "--codec", "auto"], "--max-exposed-ms: give it with --codec auto"),  # else auto is raw
        (["calibrate", "--max-exposed-ms", "5"], "--max-exposed-ms: give it with --codec auto"),
        (["calibrate", "--codec", "auto", "--max-exposed-ms", "-1"], "--max-exposed-ms: a positive number"),
    ],
)
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["teleport"])
    assert exc.value.code == 2


def test_codec_report_json(capsys):
    assert main(["codec", "--tokens", "64", "--codecs", "raw,fp8", "--repeat", "1", "--json", "-"]) == 0
    text = capsys.readouterr().out
    report = json.loads(text[text.index("{") :])
    assert {r["codec"] for r in report["results"]} == {"raw", "fp8"}


def test_profiles_table(capsys):
    assert main(["profiles", "--link-gbit", "100"]) == 0
    out = capsys.readouterr().out
    for name in ("llama3-8b", "llama3-70b", "qwen3-235b", "deepseek-v3", "kimi-linear-48b"):
        assert name in out


def test_serve_and_send_between_two_processes(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("KVWIRE_SECRET", "two-host-test-secret")
    serve = subprocess.Popen(
        [sys.executable, "-m", "kvwire.bench.cli", "serve", "--listen", "127.0.0.1:0", "--tokens", "64",
         "--rounds", "2", "--json", str(tmp_path / "serve.json")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = serve.stdout.readline()
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        assert main(["send", "--peer", address, "--tokens", "64", "--rounds", "2", "--quiet",
                     "--json", str(tmp_path / "send.json")]) == 0  # fmt: skip
        assert serve.wait(timeout=60) == 0
    finally:
        serve.kill()
    served = json.loads((tmp_path / "serve.json").read_text())
    assert served["verified"] is True and len(served["rounds"]) == 2
    assert json.loads((tmp_path / "send.json").read_text())["wire_gb_per_s"] > 0


def test_send_without_a_secret_is_an_error(monkeypatch, capsys):
    monkeypatch.delenv("KVWIRE_SECRET", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["send", "--peer", "127.0.0.1:9"])
    assert exc.value.code == 2 and "KVWIRE_SECRET" in capsys.readouterr().err


def test_loopback_plot(tmp_path):
    out = tmp_path / "plot.png"
    assert main(["loopback", "--tokens", "256", "--layer-ms", "2", "--quiet", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_reports_samples_and_flat_records(tmp_path):
    out = tmp_path / "soak.json"
    code = main(["soak", "--minutes", "0.15", "--sample-s", "2", "--warmup-s", "2", "--tokens", "16",
                 "--json", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert len(report["samples"]) >= 4 and report["requests"] > 20
    assert set(report["outcomes"]) == {"ok", "sender-cancel", "receiver-cancel", "never-expected", "refused"}
    assert report["outcomes"]["ok"] == {"completed/completed": report["outcomes"]["ok"]["completed/completed"]}
    for side in ("receiver", "sender"):
        assert report["growth"][f"{side}_records"]["grew"] is False
        assert report["samples"][-1][side]["fds"] > 0 and report["samples"][-1][side]["threads"] > 0
    assert code == (1 if any(g["grew"] for g in report["growth"].values()) else 0)


def test_a_soak_too_short_to_judge_says_so_and_exits_3(capsys):
    code = main(["soak", "--minutes", "0.03", "--sample-s", "1", "--tokens", "16"])
    printed = capsys.readouterr().out
    assert code == 3 and "growth not judged: too few samples after the warm-up" in printed
    assert "verdict" not in printed and "flat:" not in printed


def test_flood_times_transfers_under_each_attack(tmp_path):
    out = tmp_path / "flood.json"
    assert main(["flood", "--profile", "kimi-linear-48b", "--tokens", "16", "--transfers", "2", "--sockets", "40",
                 "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    attacks = [p["attack"] for p in report["phases"]]
    assert attacks[:3] == ["none", "unexpected", "slowloris"] and attacks[-1] == "all"
    slowloris = report["phases"][2]
    assert slowloris["refused_connections"] + slowloris["rejected_handshakes"] > 0  # the attack was seen


def test_loopback_over_tls_verifies(tmp_path):
    pytest.importorskip("trustme")
    out = tmp_path / "tls.json"
    assert main(["loopback", "--tokens", "64", "--streams", "2", "--tls", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["verified"] is True and report["tls"] is True
    assert report["spans"] == {"sender": False, "receiver": False}  # the helper would bypass TLS
