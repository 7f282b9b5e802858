#!/usr/bin/env python3
"""`kvwire-bench serve` and `kvwire-bench send` as two hosts would run them, each in its own
network namespace, joined by an emulated link (`kvwire/bench/netem.py`; needs root):

    sudo python3 bench/serve_send_link.py --link rtt=10ms,rate=4gbit --codec fp8 --rounds 5

Prints `serve`'s line per round (first byte to last byte of the round, on the wire) and
`send`'s summary. The two processes share this machine's cores, as they would not on two
hosts.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvwire.bench.netem import EmulatedLink, parse_link  # noqa: E402

PORT = 7400


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", required=True, help="e.g. rtt=40ms,rate=1gbit,loss=0.01%%")
    parser.add_argument("--codec", default="raw")
    parser.add_argument("--rounds", default="5")
    parser.add_argument("--tokens", default="4096")
    args = parser.parse_args()
    flags = ["--codec", args.codec, "--tokens", args.tokens, "--rounds", args.rounds]
    env = dict(os.environ, KVWIRE_SECRET=os.environ.get("KVWIRE_SECRET", "serve-send-link"))
    with EmulatedLink(parse_link(args.link)) as link:
        address = f"{link.address_b}:{PORT}"
        serve = link.popen("b", ["kvwire-bench", "serve", "--listen", address, *flags], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        time.sleep(8)  # serve imports torch and allocates its caches before it listens
        send = link.run("a", ["kvwire-bench", "send", "--peer", address, "--quiet", *flags], env=env,
                        capture_output=True, text=True)  # fmt: skip
        served, _ = serve.communicate(timeout=900)
    print(f"serve ({args.link}, {args.codec}):")
    print("\n".join(line for line in served.splitlines() if "round" in line or "verified" in line))
    print("send:")
    print(send.stdout + send.stderr)
    return serve.returncode or send.returncode


if __name__ == "__main__":
    raise SystemExit(main())
