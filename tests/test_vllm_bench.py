"""``kvwire-bench vllm`` runs end to end on a small size (a check that it works, not a timing)."""

import argparse

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM 0.33 is not installed here (CI runs this with .ci/vllm-env's venv)"
)

from kvwire.bench import cli, vllm_pd  # noqa: E402


def test_vllm_bench_moves_every_request_and_reports_each(tmp_path, capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["vllm", "--requests", "3", "--tokens", "200", "--layers", "3", "--kv-heads", "2",
                              "--head-dim", "64", "--segment-tokens", "128", "--layer-ms", "1",
                              "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "3/3 requests moved" in out and "load errors 0" in out
    report = __import__("json").loads((tmp_path / "r.json").read_text())
    rows = report["requests"]
    assert [r["segments"] for r in rows] == [2, 2, 2]
    for r in rows:
        assert r["ok"] and 0 <= r["exposed_ms"] <= r["transfer_ms"]
        assert r["wire_bytes"] == 200 * 3 * 2 * 2 * 64 * 2  # raw: tokens x layers x (k, v) x heads x dim x bf16
    # Every block held during the run is released by its end, on both sides.
    assert report["blocks"]["prefill"][-1][1] == 0 and report["blocks"]["decode"][-1][1] == 0
    assert max(n for _, n in report["blocks"]["decode"]) >= 3 * 13


def test_vllm_bench_checks_its_arguments():
    args = argparse.Namespace(requests=0, tokens=1, layers=1, kv_heads=1, head_dim=1, chunk_tokens=1,
                              segment_tokens=1, connections=1, layer_ms=0, link=None)  # fmt: skip
    with pytest.raises(ValueError, match="--requests"):
        vllm_pd.check_arguments(args)
