"""``kvwire-bench``: the operators' benchmarks. Entry point: :func:`kvwire.bench.cli.main`."""
