import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a package; never reach for a hub

from hypothesis import HealthCheck, settings

# Codec property tests run real tensor code; keep them quick on a 2-core CI machine.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-frames",
        type=int,
        default=int(os.environ.get("KVWIRE_FUZZ_FRAMES", "300")),
        help="mutated frames the receiver fuzz test sends (default 300; a large run: 100000)",
    )
