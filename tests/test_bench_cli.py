"""The kvwire-bench command line: real runs on loopback, and clear errors for bad flags."""

import json

import pytest

from kvwire.bench.cli import main


def test_loopback_runs_end_to_end_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["loopback", "--tokens", "100", "--requests", "2", "--streams", "2", "--codec", "int4",
                 "--baseline", "--json", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("wire_gb_per_s", "effective_gb_per_s", "exposed_ms", "verified", "baseline_gb_per_s",
                "baseline_hot_gb_per_s", "cpu_s_per_gb", "staging", "connections"):  # fmt: skip
        assert key in report, key
    assert report["verified"] is True
    assert report["effective_gb_per_s"] > report["wire_gb_per_s"] > 0  # int4 shrinks the bytes
    assert len(report["connections"]) == 2
    assert "kvwire / plain" in capsys.readouterr().out


def test_loopback_with_layer_pacing_reports_both_exposed_latencies(tmp_path):
    out = tmp_path / "r.json"
    assert main(["loopback", "--profile", "kimi-linear-48b", "--tokens", "200", "--layer-ms", "2",
                 "--json", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verified"] is True
    assert report["exposed_ms_after_prefill"] > 0 and report["one_layer_wire_ms"] > 0
    assert [t["layer"] for t in report["timeline"]] == list(range(27))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["loopback", "--codec", "zstd"], "unknown codec"),
        (["loopback", "--tokens", "0"], "--tokens"),
        (["loopback", "--profile", "gpt-9"], "unknown profile"),
        (["loopback", "--streams", "100"], "--streams"),
        (["loopback", "--layer-ms", "-1"], "--layer-ms"),
        (["codec", "--dtype", "int8"], "dtype"),
        (["profiles", "--link-gbit", "0"], "--link-gbit"),
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
