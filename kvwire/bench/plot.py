"""``--plot FILE.png``: throughput over time per connection, and the layer timeline
(when each layer was produced against when it was in place on the receiver)."""

from __future__ import annotations


def plot_loopback(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ValueError("--plot: needs matplotlib (pip install 'kvwire[bench]')") from exc

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), constrained_layout=True)
    samples = report.get("samples") or []
    if len(samples) >= 2:
        times = [t for t, _ in samples]
        for c in range(len(samples[0][1])):
            rates = [(b[1][c] - a[1][c]) / (b[0] - a[0]) / 1e6 for a, b in zip(samples, samples[1:]) if b[0] > a[0]]
            top.plot(times[1 : len(rates) + 1], rates, label=f"connection {c}")
        top.legend(loc="upper right", fontsize="small")
    top.set_xlabel("seconds since the first layer")
    top.set_ylabel("MB/s sent")
    top.set_title(f"{report['profile']} / {report['codec']}: throughput per connection")

    timeline = report.get("timeline") or []
    layers = [t["layer"] for t in timeline]
    bottom.plot([t["produced_s"] for t in timeline], layers, "o-", markersize=3, label="produced (send_layer)")
    bottom.plot([t["delivered_s"] for t in timeline], layers, "s-", markersize=3, label="in place on the receiver")
    bottom.set_xlabel("seconds since the first layer")
    bottom.set_ylabel("layer")
    bottom.set_title(f"layer timeline (exposed: {report['exposed_ms']:.1f} ms)")
    bottom.legend(loc="lower right", fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)
