"""The Python half of the C ABI tests: a plain kvwire peer that a C program talks to.

    py_peer.py receive            prints the port, expects "from-c", verifies, exits 0/1
    py_peer.py send PORT          sends "from-py" to a C receiver on 127.0.0.1:PORT
    py_peer.py damage PORT        relays to 127.0.0.1:PORT, flipping a bit of every DATA
                                  payload; prints its port, exits 0 once its connections
                                  have ended (1 if it damaged nothing)

Both sides fill and check the caches with the same formula as test_capi.c.
"""

import sys
import time

import torch

import kvwire

SECRET = "kvwire-capi-test-secret"
LAYOUT = kvwire.KVLayout.gqa(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype="fp32")
BLOCKS = 64


def pattern(tensor_index: int, seed: int) -> torch.Tensor:
    n = BLOCKS * 16 * 2 * 64
    i = torch.arange(n, dtype=torch.int64)
    return (((i * 7 + tensor_index * 131 + seed) % 1000).to(torch.float32) * 0.5).view(BLOCKS, 16, 2, 64)


def filled(seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"k": pattern(2 * layer, seed), "v": pattern(2 * layer + 1, seed)} for layer in range(LAYOUT.num_layers)]


def damage(port: int) -> int:
    from tests.helpers import TcpRelay  # the checkout is on PYTHONPATH (CMakeLists.txt)

    relay = TcpRelay(("127.0.0.1", port), corrupt=1 << 30)
    print(relay.address[1], flush=True)
    give_up = time.monotonic() + 120
    while not relay.finished() and time.monotonic() < give_up:
        time.sleep(0.05)
    ended = relay.finished()
    relay.close()
    print(f"py_peer: damaged {relay.corrupted} payloads", file=sys.stderr)
    return 0 if ended and relay.corrupted else 1


def main() -> int:
    if sys.argv[1] == "damage":
        return damage(int(sys.argv[2]))
    if sys.argv[1] == "receive":
        dst = LAYOUT.allocate(BLOCKS)
        with kvwire.Receiver(LAYOUT, ("127.0.0.1", 0), secret=SECRET, kv_caches=dst) as rx:
            print(rx.address[1], flush=True)
            h = rx.expect("from-c", [10, 11, 12], 40, deadline=60)
            h.wait()
        src = filled(seed=1)
        for layer in range(LAYOUT.num_layers):
            for name in ("k", "v"):
                a = src[layer][name][[0, 1, 2]].reshape(-1, 2, 64)[:40]
                b = dst[layer][name][[10, 11, 12]].reshape(-1, 2, 64)[:40]
                if not torch.equal(a, b):
                    print(f"py_peer: layer {layer} {name} differs", file=sys.stderr)
                    return 1
        return 0
    port = int(sys.argv[2])
    with kvwire.Sender(LAYOUT, ("127.0.0.1", port), secret=SECRET, kv_caches=filled(seed=2), streams=2) as tx:
        tx.send("from-py", [5, 6, 7], 33, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
