"""The measuring scripts of bench/ that the docs' numbers come from: their parsing and
arithmetic here, and each one run once, small, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import perf_split  # noqa: E402  (bench/perf_split.py)

SCRIPT = """\
         python3  4101 ffffffff81a0 _copy_to_iter+0x1f ([kernel.kallsyms])
         python3  4101 7f00000011 _PyEval_EvalFrameDefault+0x3 (/usr/lib/libpython3.11.so.1.0)
         python3  4101 7f00000012 _PyEval_EvalFrameDefault+0x9 (/usr/lib/libpython3.11.so.1.0)
         python3  4200 ffffffff81b0 _copy_from_iter+0x2 ([kernel.kallsyms])
     ksoftirqd/0    14 ffffffff81c0 _raw_spin_unlock_irqrestore+0x5 ([kernel.kallsyms])
         swapper     0 ffffffff81d0 pv_native_safe_halt+0x1 ([kernel.kallsyms])
 kworker/1:0-mm   77 ffffffff81e0 ([kernel.kallsyms])
"""


def test_perf_script_lines_are_counted_by_thread_and_symbol():
    counts = perf_split.parse_script(SCRIPT)
    assert counts[(4101, "python3", "/usr/lib/libpython3.11.so.1.0", "_PyEval_EvalFrameDefault")] == 2
    assert counts[(4101, "python3", "[kernel.kallsyms]", "_copy_to_iter")] == 1
    assert counts[(14, "ksoftirqd/0", "[kernel.kallsyms]", "_raw_spin_unlock_irqrestore")] == 1
    assert counts[(77, "kworker/1:0-mm", "[kernel.kallsyms]", "[unknown]")] == 1
    assert sum(counts.values()) == 7


def test_samples_become_cpu_seconds_per_gb_by_kind_and_category():
    seconds = perf_split.split(perf_split.parse_script(SCRIPT), {4101: "rx kvwire-recv", 4200: "tx kvwire-send"})
    tick = 1 / perf_split.FREQUENCY
    assert seconds["rx kvwire-recv"] == pytest.approx({"copy to user": tick, "python": 2 * tick})
    assert seconds["tx kvwire-send"] == pytest.approx({"copy from user": tick})
    assert seconds["ksoftirqd"] == pytest.approx({"irqs-off": tick})  # named by command, digits dropped
    assert seconds["swapper"] == pytest.approx({"idle": tick})
    text = perf_split.table(seconds, gb=tick)  # one GB: each sample reads as 1.0000 CPU s/GB
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith(("rx", "tx")) else ""): line
            for line in text.splitlines()[1:]}  # fmt: skip
    assert rows["rx kvwire-recv"].split()[-1] == "3.0000"
    assert rows["all"].split()[-1] == "7.0000"
    assert text.splitlines()[0].split()[-1] == "all"


@pytest.mark.parametrize(
    "mode",
    [[], ["--plain"], ["--decode-tp", "2"], ["--local-sndbuf-kib", "0"], ["--plain", "--local-sndbuf-kib", "256"]],
)
def test_thread_cpu_runs_small_transfers_both_ways(mode, tmp_path):
    import json

    from kvwire import scatter

    split = "--decode-tp" in mode  # one prefill rank, two decode ranks: each receiver reported
    checksum = "crc32c" if split else "none"
    out = subprocess.run(
        [sys.executable, str(BENCH / "thread_cpu.py"), "--tokens", "512", "--rounds", "2", "--checksum", checksum,
         "--json", str(tmp_path / "figures.json"), *mode],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads((tmp_path / "figures.json").read_text())  # what the printed lines say, as numbers
    assert f"{figures['gb_per_s']:.2f} GB/s over rounds 2..2 " in out.stdout
    assert f"sender, the whole process: {figures['sender']['cpu_s_per_gb']:.3f} CPU s/GB" in out.stdout
    assert len(figures["receivers"]) == (2 if split else 1)
    assert ("sender_threads" in figures) == ("--plain" not in mode)
    if "--plain" not in mode:  # (a short run may not last a clock tick in every thread)
        assert figures["sender_threads"]["kvwire-send"] >= 0 and "kvwire-encoder" in figures["sender_threads"]
    assert " GB/s over rounds 2..2 " in out.stdout and "sender, the whole process: " in out.stdout
    receivers = ["receiver 0", "receiver 1"] if split else ["receiver"]
    assert all(f"{r}, the whole process: " in out.stdout for r in receivers)
    assert ("receiver, the whole process: " in out.stdout) == (not split)
    assert ("plain sockets, cache to cache" in out.stdout) == ("--plain" in mode)
    shared = [line for line in out.stdout.splitlines() if "chunk CRCs of the decode ranks' heads" in line]
    assert bool(shared) == (split and scatter.available())
    if shared:  # every chunk pair's rows read once
        assert "'computed': 0" not in shared[0] and "'alone': 0" in shared[0]


def test_alternate_runs_both_sides_and_summarises():
    out = subprocess.run(
        [sys.executable, str(BENCH / "alternate.py"), "--pairs", "1", "--common", "--tokens 256 --rounds 1",
         "--b", "--chunk-kib 256"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.split()[0] in ("A1", "B1", "A", "B", "B/A")] == [
        "A1", "B1", "A", "B", "B/A"
    ]  # fmt: skip
    assert lines[-1].split()[0] == "B/A" and float(lines[-1].split()[1]) > 0


def test_alternate_runs_each_side_once_per_pair_and_takes_every_figure_from_that_run(monkeypatch, capsys):
    import alternate  # bench/alternate.py

    calls = []

    def fake_run(options, path, thread_cpu=False):  # the summary's arithmetic, without the benchmark
        calls.append(options[-1])
        n = len(calls)
        return {"effective_gb_per_s": float(n), "cpu_s_per_gb": {"sender": n / 10, "receiver": n / 100},
                "checksum": "none", "baseline_cpu_s_per_gb": {"sender": 1.0, "receiver": 1.0},
                "ratio_to_baseline_by_round": [n / 10, n / 5, n / 20]}  # fmt: skip

    monkeypatch.setattr(alternate, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["alternate.py", "--pairs", "2", "--common", "x", "--a", "a", "--b", "b"])
    alternate.main()
    assert calls == ["a", "b", "a", "b"]
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[3:]}
    columns = list(alternate.FIGURES)
    assert rows["A1"][0] == "1.000" and rows["B1"][0] == "2.000" and rows["B2"][columns.index("send s/GB")] == "0.400"
    assert rows["B2"][columns.index("/plain rnd")] == "0.400"  # the median of the run's rounds: 0.4, 0.8, 0.2
    assert rows["B/A"][0] == "1.667"  # median of 2/1 and 4/3


def test_alternate_alternates_thread_cpu_runs_too():
    """--thread-cpu: bench/thread_cpu.py's figures, per run and summarised, the sender's
    kinds of threads among them."""
    out = subprocess.run(
        [sys.executable, str(BENCH / "alternate.py"), "--thread-cpu", "--pairs", "1", "--common",
         "--tokens 512 --rounds 2 --checksum none"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = lines[2].split()
    assert header[:4] == ["run", "GB/s", "send", "s/GB"] and "writers" in header and "encoder" in header
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert set(rows) == {"A1", "B1", "A", "B", "B/A", "medians,"}
    assert float(rows["A1"][0]) > 0 and float(rows["B1"][4]) >= 0  # GB/s; the writers' CPU per GB (not "-")


def test_alternate_runs_each_side_from_its_own_checkout(tmp_path):
    """--a-path and --b-path run that checkout's code, not the current one's (``python -m``
    puts the working directory ahead of PYTHONPATH). Two stand-in checkouts whose
    ``kvwire.bench.cli`` writes a fixed report tell them apart."""
    for side, rate in (("a", 1.0), ("b", 2.0)):
        cli = tmp_path / side / "kvwire" / "bench"
        cli.mkdir(parents=True)
        (tmp_path / side / "kvwire" / "__init__.py").write_text("")
        (cli / "__init__.py").write_text("")
        report = {"effective_gb_per_s": rate, "cpu_s_per_gb": {"sender": 1, "receiver": 1}}
        (cli / "cli.py").write_text(
            "import json, sys\n"
            "out = sys.argv[sys.argv.index('--json') + 1]\n"
            f"json.dump({report!r}, open(out, 'w'))\n"
        )  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(BENCH / "alternate.py"), "--pairs", "1", "--common", "--rounds 1",
         "--a-path", str(tmp_path / "a"), "--b-path", str(tmp_path / "b")],
        capture_output=True, text=True, timeout=60, cwd=BENCH.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()[3:]}
    assert rows["A1"][0] == "1.000" and rows["B1"][0] == "2.000" and rows["B/A"][0] == "2.000"


def test_four_bit_search_sizes_and_round_trips():
    """bench/four_bit_keys.py's cheaper key metadata and value rows: the sizes the docs quote,
    and round trips that keep every element within half a step of its group's grid."""
    import four_bit_keys as fbk  # bench/four_bit_keys.py
    import torch

    assert fbk.times_smaller("plain", 16, "int4") == pytest.approx(256 / 84)  # int4: 3.05x
    assert fbk.times_smaller("meta7", 16, "z4") == pytest.approx(256 / (32 + 7 + 0.25 + 32 + 1.5))
    assert fbk.times_smaller("meta8", 16, "s4x1") < 3.5 < fbk.times_smaller("meta7", 16, "z4")
    assert fbk.times_smaller("pairs", 16, "int4h") == pytest.approx(256 / (32 + 8 + 36))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 3, 64, generator=gen) * torch.linspace(0.1, 8, 64) + torch.linspace(-20, 20, 64)
    x[0] *= 30  # an attention sink's keys
    request_range = x.amax(0) - x.amin(0)
    for bits in (8, 7, 6):
        y = fbk.round_trip_keys(x, 16, f"meta{bits}")
        for g0 in range(0, 48, 16):
            part, out = x[g0 : g0 + 16], y[g0 : g0 + 16]
            # the coded bounds hold the group, each at most one code step (of the request's
            # range, which the sink sets) outside it: nothing is clipped, the error is half a step
            coded = part.amax(0) - part.amin(0) + 2 * request_range / ((1 << bits) - 1)
            assert ((out - part).abs() <= coded / 30 * 1.01 + 1e-3).all(), bits
    # searched codes try the plain ones too: never more squared error, here less
    plain_err = ((fbk.round_trip_keys(x, 16, "meta7s") - x) ** 2).sum()
    searched_err = ((fbk.round_trip_keys(x, 16, "meta7sx") - x) ** 2).sum()
    assert searched_err < plain_err
    assert ((fbk.round_trip_values(v := torch.randn(40, 3, 64, generator=gen), "z4x") - v) ** 2).sum() <= (
        (fbk.round_trip_values(v, "z4") - v) ** 2
    ).sum() * (1 + 1e-6)
    y = fbk.round_trip_keys(x, 16, "cmeta8a24")  # coarse out where the sink is: bounded by the request's range
    assert ((y - x).abs() <= request_range / 15).all()
    v = torch.randn(40, 3, 64, generator=gen)
    for kind in ("z4", "z8"):
        r = v @ fbk._hadamard(64)
        step = ((r.amax(-1) - r.amin(-1)) / 15) * 2 ** (1 / 16)  # the scale, rounded up one log step at most
        err = (fbk.round_trip_values(v, kind) - v) @ fbk._hadamard(64)  # the error in rotated coordinates
        assert (err.abs() <= step.unsqueeze(-1) / 2 + 1e-5).all(), kind
    partner = fbk.channel_pairs(x, "s")
    assert torch.equal(partner.gather(1, partner), torch.arange(64).expand(3, 64))  # pairs, each channel once


def test_four_bit_search_bits_per_channel():
    """bench/four_bit_keys.py's ``v`` keys: 4 bits a channel on average, more where the range
    is wider, less squared error than 4 bits each; ``z4sN`` values' first rows as ``int4h``."""
    import four_bit_keys as fbk  # bench/four_bit_keys.py
    import torch

    gen = torch.Generator().manual_seed(6)
    x = torch.randn(64, 2, 64, generator=gen) * torch.logspace(-1, 1, 64)  # ranges 100x apart
    bits = fbk.allocate_bits(x, fbk.group_bounds(64, 16, "plainv"))
    assert (bits.sum(1) == 4 * 64).all() and bits.min() >= 1 and bits.max() <= 8
    assert bits[:, -8:].float().mean() > 6 > 2 > bits[:, :8].float().mean()
    for plain, varied in (("plain", "plainv"), ("meta7s", "meta7sv")):
        err = {m: float(((fbk.round_trip_keys(x, 16, m) - x) ** 2).sum()) for m in (plain, varied)}
        assert err[varied] < 0.5 * err[plain], err
    # per head at 1024 tokens: 4-bit keys, 7-bit bound codes, the request's range, the first
    # group's bounds in fp16 instead of codes, 3 bits per channel; 4-bit values, a 1-byte scale
    # and a 4-bit zero-point per row, the first 32 rows' fp16 scale and zero-point instead
    key_bytes = 32 + 7 + 0.25 + 2.25 * 64 / 1024 + 24 / 1024
    value_bytes = 32 + 1.5 + 2.5 * 32 / 1024
    assert fbk.times_smaller("meta7sv", 16, "z4s32") == pytest.approx(256 / (key_bytes + value_bytes))
    assert fbk.times_smaller("meta7sv", 16, "z4s32") > 3.5
    v = torch.randn(48, 2, 64, generator=gen)
    y = fbk.round_trip_values(v, "z4s32")
    assert torch.equal(y[:32], fbk.round_trip_values(v, "z4s64")[:32])  # int4h's rows either way
    assert not torch.equal(y[32:], fbk.round_trip_values(v, "z4s64")[32:])


def test_span_memory_prints_every_pattern():
    from kvwire import scatter

    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    out = subprocess.run([sys.executable, str(BENCH / "span_memory.py"), "--mib", "16", "--repeat", "1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    line = out.stdout.splitlines()[-1]
    names = ("whole rows", "half rows", "halves, one after the other", "halves together", "halves after whole rows")
    for name, after in zip(names, names[1:] + ("",)):
        figure = line.split(f"{name} ", 1)[1].split(after)[0] if after else line.split(f"{name} ", 1)[1]
        assert float(figure) > 0, (name, line)
    small = subprocess.run(
        [sys.executable, str(BENCH / "span_memory.py"), "--mib", "2"], capture_output=True, text=True
    )
    assert small.returncode != 0 and "--mib: at least 4" in small.stderr


def test_thread_cpu_refuses_plain_sockets_to_several_decode_ranks():
    out = subprocess.run([sys.executable, str(BENCH / "thread_cpu.py"), "--plain", "--decode-tp", "2"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--plain: one receiver only" in out.stderr


def test_thread_cpu_refuses_a_send_buffer_that_would_stall():
    out = subprocess.run([sys.executable, str(BENCH / "thread_cpu.py"), "--local-sndbuf-kib", "64"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--local-sndbuf-kib: 0 (the kernel's autotuning) or at least 128" in out.stderr


def test_checksum_speed_times_both_implementations_and_checks_after_receiving():
    from kvwire import scatter

    if not scatter.available():
        pytest.skip("the compiled helper kvwire._scatter is not built in this environment")
    script = str(BENCH / "checksum_speed.py")
    out = subprocess.run([sys.executable, script, "--kib", "256", "--mib", "4", "--passes", "2"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {" ".join(line.split()[:-2]): line.split()[-2:] for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {f"{name} {kind}" for name in ("crc32c package", "kvwire helper", "frames.crc32c")
                         for kind in ("cold", "hot")}  # fmt: skip
    assert all(float(r) > 0 for rates in rows.values() for r in rates)
    out = subprocess.run([sys.executable, script, "--received", "1024", "--passes", "1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    modes = {line.rsplit(None, 1)[0].strip(): float(line.split()[-1]) for line in out.stdout.splitlines()[1:]}
    assert set(modes) == {"after the payload", "piece by piece"} and min(modes.values()) > 0
    bad = subprocess.run([sys.executable, script, "--received", "3000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "must divide 256 KiB" in bad.stderr
    tiny = subprocess.run([sys.executable, script, "--received", "128"], capture_output=True, text=True, timeout=60)
    assert tiny.returncode != 0 and "be 256 or more" in tiny.stderr
