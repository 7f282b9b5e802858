"""``kvwire-bench calibrate`` and ``kvwire-bench plan``: the link model against reality.

* ``calibrate``: many transfers of assorted sizes, each predicted first
  (``Sender.estimate``) and then run; the report gives the median and p90 relative
  error of the predicted total time, exposed time and first layer in place, on loopback
  and across each ``--link``.
* ``plan``: a scheduling scenario. Requests arrive (Poisson) with prompt lengths from a
  synthetic mix of short and long prompts; the link's rate changes over time
  (``--schedule``). Each request is prefilled either remotely (a prefill server at the
  profile's own rate, its KV streamed layer by layer across the link: real transfers)
  or locally (a decode node that prefills at ``--local-share`` of that rate: simulated,
  no bytes move). Three policies on the same arrivals: never remote, always remote, and
  remote when the link model predicts the request's TTFT meets the target (when neither
  side is predicted to meet it, the one predicted sooner). The report counts the
  requests that met the TTFT target under each.

Both run the receiver in a child process (in the emulated link's far namespace) and the
sender in this one. The data is not checked here (``loopback`` does that): requests
share destination blocks.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass

import torch

import kvwire
from kvwire.bench import netem, profiles
from kvwire.planning import relative_error
from kvwire.tuning import tune_malloc


# -- the two peers --------------------------------------------------------------------------------
def _receiver_main(pipe, profile: str, num_blocks: int, secret: str, netns: str | None, host: str) -> None:
    if netns:
        netem._setns(f"/run/netns/{netns}")
    tune_malloc()
    torch.set_num_threads(1)
    layout = profiles.get(profile).layout()
    states = layout.allocate_states()
    rx = kvwire.Receiver(layout, (host, 0), secret=secret, kv_caches=layout.allocate(num_blocks),
                         staging_bytes=256 << 20)  # fmt: skip
    pipe.send(rx.address)
    handles = {}
    while True:
        cmd = pipe.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "expect":
            _, name, tokens, deadline = cmd
            blocks = list(range(-(-tokens // layout.block_size)))
            handles[name] = rx.expect(name, blocks, tokens, states=states or None, deadline=deadline)
            pipe.send("ok")
        elif cmd[0] == "result":
            h = handles.pop(cmd[1])
            error = None
            try:
                h.wait()
            except kvwire.TransferError as exc:
                error = str(exc)
            pipe.send({"error": error, "first_layer_at": h.layer_done_at.get(0), "done_at": h.t_done})
    rx.close()


class Peers:
    """A receiver process and a sender in this process, on loopback or across an emulated
    link (``spec``); use as a context manager. Both sides share the machine's monotonic
    clock, so the receiver's times compare with the sender's."""

    def __init__(self, profile: str, max_tokens: int, spec: str | None, **sender_kw) -> None:
        self.profile = profiles.get(profile)
        self.layout = self.profile.layout()
        self.blocks = -(-max_tokens // self.layout.block_size)
        self.spec = spec
        self.sender_kw = sender_kw
        self.link: netem.EmulatedLink | None = None
        self._pipe_lock = threading.Lock()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self.tx: kvwire.Sender | None = None

    def __enter__(self) -> Peers:
        secret = os.urandom(16).hex()
        if self.spec:
            self.link = netem.EmulatedLink(netem.parse_link(self.spec))
            self.link.__enter__()
        try:
            ctx = multiprocessing.get_context("spawn")
            self._pipe, child = ctx.Pipe()
            netns = self.link.ns["b"] if self.link else None
            host = self.link.address_b if self.link else "127.0.0.1"
            self._proc = ctx.Process(target=_receiver_main, name="kvwire-bench-receiver",
                                     args=(child, self.profile.name, self.blocks, secret, netns, host))  # fmt: skip
            self._proc.start()
            if not self._pipe.poll(120):
                raise RuntimeError("the receiver process did not start within 120 s")
            address = self._pipe.recv()
            src = self.layout.allocate(self.blocks)
            self.states = self.layout.allocate_states()

            def make() -> kvwire.Sender:
                return kvwire.Sender(self.layout, address, secret=secret, kv_caches=src, **self.sender_kw)

            self.tx = self.link.call("a", make) if self.link else make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.tx is not None:
            self.tx.close()
        if self._proc is not None:
            try:
                self._pipe.send(("quit",))
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        if self.link is not None:
            self.link.__exit__(None, None, None)

    def _ask(self, cmd: tuple, timeout: float):
        with self._pipe_lock:
            self._pipe.send(cmd)
            if not self._pipe.poll(timeout):
                raise RuntimeError(f"the receiver did not answer {cmd[0]!r} within {timeout:g} s")
            return self._pipe.recv()

    def expect(self, name: str, tokens: int, deadline: float = 300.0) -> None:
        self._ask(("expect", name, tokens, deadline), 60)

    def result(self, name: str) -> dict:
        return self._ask(("result", name), 600)

    def block_ids(self, tokens: int) -> list[int]:
        return list(range(-(-tokens // self.layout.block_size)))

    def run_transfer(self, name: str, tokens: int, layers_per_s: float | None, **kw) -> kvwire.SendHandle:
        """Start a transfer and produce its layers at ``layers_per_s`` (all at once if
        None); returns its handle once the last layer is queued."""
        assert self.tx is not None
        handle = self.tx.transfer(name, self.block_ids(tokens), tokens, states=self.states or None, deadline=300,
                                  layers_per_s=layers_per_s, **kw)  # fmt: skip
        start = handle.t_created
        for layer in range(self.layout.num_layers):
            if layers_per_s:
                pause = start + (layer + 1) / layers_per_s - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            handle.send_layer(layer)
        return handle


def layers_per_s(profile: profiles.Profile, tokens: int) -> float:
    """The pace at which the profile's prefill produces the layers of a ``tokens`` prompt."""
    return profile.prefill_tokens_per_s / tokens * profile.layout().num_layers


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- calibrate ------------------------------------------------------------------------------------
def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="llama3-8b", help="model profile (default llama3-8b)")
    p.add_argument("--link", action="append", metavar="SPEC", default=[],
                   help="an emulated link to calibrate on (repeat for several; needs root)")  # fmt: skip
    p.add_argument("--no-loopback", action="store_true", help="only the --link runs")
    p.add_argument("--transfers", type=int, default=20, help="measured transfers per link (default 20)")
    p.add_argument("--min-tokens", type=int, default=128, help="smallest prompt (default 128)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest prompt (default 2048); log-uniform between")
    p.add_argument("--codec", default="raw", help="the sender's codec (default raw; 'auto' chooses per transfer, "
                   "against --max-exposed-ms)")  # fmt: skip
    p.add_argument("--max-exposed-ms", type=float, default=None,
                   help="with --codec auto: the exposed time each transfer aims at (required with auto: without "
                        "a target auto always takes the least lossy codec, raw)")  # fmt: skip
    p.add_argument("--gap-ms", type=float, default=200.0, help="idle time between transfers (default 200)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no line per transfer")


def _check_common(args) -> None:
    profiles.get(args.profile)
    if args.codec != "auto":
        kvwire.codec.get(args.codec)
    links = [args.link] if isinstance(args.link, str) else args.link
    for spec in links:
        netem.parse_link(spec)
    if links and os.geteuid() != 0:
        raise ValueError("--link: needs root (it creates network namespaces and TUN devices)")


def check_calibrate(args) -> None:
    _check_common(args)
    if args.transfers < 2:
        raise ValueError(f"--transfers: at least 2, got {args.transfers}")
    if not 1 <= args.min_tokens <= args.max_tokens:
        raise ValueError("--min-tokens / --max-tokens: need 1 <= min <= max")
    if args.gap_ms < 0:
        raise ValueError(f"--gap-ms: must be >= 0, got {args.gap_ms}")
    if args.no_loopback and not args.link:
        raise ValueError("--no-loopback: give at least one --link")
    if (args.codec == "auto") != (args.max_exposed_ms is not None):
        raise ValueError("--max-exposed-ms: give it with --codec auto, and only then (auto without a target "
                         "always takes raw)")  # fmt: skip
    if args.max_exposed_ms is not None and not 0 < args.max_exposed_ms < math.inf:
        raise ValueError(f"--max-exposed-ms: a positive number, got {args.max_exposed_ms}")


def calibrate(args, progress=print) -> dict:
    """Predict, then run, ``--transfers`` transfers on each link; return the report."""
    check_calibrate(args)
    rng = random.Random(args.seed)
    runs = []
    for spec in ([] if args.no_loopback else [None]) + list(args.link):
        progress(f"{spec or 'loopback'}: {args.transfers} transfers of {args.min_tokens}-{args.max_tokens} tokens, "
                 "every other one paced at the profile's prefill rate")  # fmt: skip
        target = {} if args.max_exposed_ms is None else {"max_exposed_ms": args.max_exposed_ms}
        with Peers(args.profile, args.max_tokens, spec, codec=args.codec, **target) as peers:
            rows = []
            for i in range(-2, args.transfers):  # two to warm the model up, not counted
                tokens = int(math.exp(rng.uniform(math.log(args.min_tokens), math.log(args.max_tokens))))
                pace = layers_per_s(peers.profile, tokens) if i % 2 else None
                row = _predict_and_run(peers, f"c{i}", tokens, pace)
                if i >= 0:
                    rows.append(row)
                    if not args.quiet:
                        progress(f"  {tokens:6d} tokens {'paced' if pace else 'at once'}: total "
                                 f"{row['predicted_total_ms']:.0f} ms predicted, {row['total_ms']:.0f} ms taken "
                                 f"({row['codec']})")  # fmt: skip
                time.sleep(args.gap_ms / 1e3)
            link = peers.tx.link().as_dict() if peers.tx else None
        runs.append({"link": spec or "loopback", "transfers": rows, "summary": summarize(rows), "model": link})
    return {"kind": "calibrate", "profile": args.profile, "codec": args.codec, "runs": runs}


def _predict_and_run(peers: Peers, name: str, tokens: int, pace: float | None) -> dict:
    assert peers.tx is not None
    estimate = peers.tx.estimate(tokens, layers_per_s=pace, codec="auto" if peers.tx.auto else None)
    peers.expect(name, tokens)
    handle = peers.run_transfer(name, tokens, pace)
    stats = handle.finish()
    got = peers.result(name)
    if got["error"]:
        raise RuntimeError(f"transfer {name} failed at the receiver: {got['error']}")
    first = None if got["first_layer_at"] is None else (got["first_layer_at"] - handle.t_created) * 1e3

    def ms(seconds):
        return None if seconds is None else seconds * 1e3

    return {
        "tokens": tokens, "paced": pace is not None, "codec": stats["codec"], "wire_bytes": stats["wire_bytes"],
        "basis": estimate.basis, "predicted_wire_bytes": estimate.wire_bytes,
        "predicted_total_ms": ms(estimate.total_s), "total_ms": stats["total_ms"],
        "predicted_exposed_ms": ms(estimate.exposed_s), "exposed_ms": stats["exposed_ms"],
        "predicted_first_layer_ms": ms(estimate.first_layer_s), "first_layer_ms": first,
    }  # fmt: skip


FIGURES = ("total", "exposed", "first_layer")


def summarize(rows: list[dict]) -> dict:
    """Median and p90 relative error of each figure, over all transfers and per kind."""
    out: dict = {}
    for kind, subset in (("all", rows), ("at_once", [r for r in rows if not r["paced"]]),
                         ("paced", [r for r in rows if r["paced"]])):  # fmt: skip
        for fig in FIGURES:
            errors = [relative_error(r[f"predicted_{fig}_ms"], r[f"{fig}_ms"]) for r in subset
                      if r[f"predicted_{fig}_ms"] is not None and r[f"{fig}_ms"]]  # fmt: skip
            signed = [(r[f"predicted_{fig}_ms"] - r[f"{fig}_ms"]) / r[f"{fig}_ms"] for r in subset
                      if r[f"predicted_{fig}_ms"] is not None and r[f"{fig}_ms"]]  # fmt: skip
            out[f"{kind}_{fig}"] = {
                "n": len(errors),
                "median": statistics.median(errors) if errors else None,
                "p90": percentile(errors, 0.9) if errors else None,
                "bias": statistics.median(signed) if signed else None,
            }
    return out


CALIBRATION_HEADERS = ("link", "transfers", "figure", "median err", "p90 err", "median bias")


def calibration_rows(report: dict) -> list[list[object]]:
    rows = []
    for run in report["runs"]:
        for kind in ("at_once", "paced"):
            for fig in FIGURES:
                s = run["summary"][f"{kind}_{fig}"]
                if not s["n"]:
                    continue
                rows.append([run["link"], s["n"], f"{fig.replace('_', ' ')} ({kind.replace('_', ' ')})",
                             _pct(s["median"]), _pct(s["p90"]), _pct(s["bias"], signed=True)])  # fmt: skip
    return rows


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


# -- the scheduling scenario -----------------------------------------------------------------------
DEFAULT_MIX = "short:0.6:256-2048,long:0.4:8192-32768"
DEFAULT_SCHEDULE = "0s:2gbit,10s:200mbit,20s:2gbit"


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="kimi-linear-48b",
                   help="model profile: its KV shape and its prefill rate (default kimi-linear-48b)")  # fmt: skip
    p.add_argument("--link", default="rtt=40ms,rate=2gbit", metavar="SPEC",
                   help="the emulated link (its rate is then set by --schedule; needs root)")  # fmt: skip
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE,
                   help=f"the link's rate over time, 'TIME:RATE,...' (default {DEFAULT_SCHEDULE})")  # fmt: skip
    p.add_argument("--seconds", type=float, default=30.0, help="how long requests arrive (default 30)")
    p.add_argument("--arrivals", type=float, default=1.0, help="requests per second, Poisson (default 1)")
    p.add_argument("--mix", default=DEFAULT_MIX,
                   help="prompt lengths, 'NAME:SHARE:MIN-MAX,...', uniform in each (default %(default)s)")  # fmt: skip
    p.add_argument("--ttft-ms", type=float, default=4000.0, help="the TTFT target (default 4000)")
    p.add_argument("--local-share", type=float, default=0.5,
                   help="a decode node prefills at this share of the profile's rate (default 0.5)")  # fmt: skip
    p.add_argument("--codec", default="raw", help="the sender's codec (default raw; 'auto' chooses per transfer "
                   "against what the TTFT target leaves it once its prefill waited and ran)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no line per request")


@dataclass(frozen=True)
class Arrival:
    index: int
    at: float  # seconds from the start
    tokens: int
    kind: str


def parse_mix(text: str) -> list[tuple[str, float, int, int]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"(\w+):([0-9.]+):([0-9]+)-([0-9]+)", item)
        if not m or int(m.group(3)) < 1 or int(m.group(3)) > int(m.group(4)) or float(m.group(2)) <= 0:
            raise ValueError(f"--mix: {item!r} is not NAME:SHARE:MIN-MAX (e.g. short:0.6:256-2048)")
        out.append((m.group(1), float(m.group(2)), int(m.group(3)), int(m.group(4))))
    if not out:
        raise ValueError("--mix: no prompt kinds given")
    return out


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """``0s:2gbit,10s:200mbit`` -> [(0.0, 2e9), (10.0, 2e8)] (seconds, bits per second)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        when, sep, rate = item.partition(":")
        m = re.fullmatch(r"([0-9.]+)s", when.strip())
        if not sep or not m:
            raise ValueError(f"--schedule: {item!r} is not TIME:RATE (e.g. 10s:200mbit)")
        spec = netem.parse_link(f"rtt=1ms,rate={rate.strip()}")
        out.append((float(m.group(1)), spec.rate_bps))
    if not out or out[0][0] != 0:
        raise ValueError("--schedule: the first entry must be at 0s")
    if any(b[0] <= a[0] for a, b in zip(out, out[1:])):
        raise ValueError("--schedule: times must increase")
    return out


def arrivals(args) -> list[Arrival]:
    rng = random.Random(args.seed)
    mix = parse_mix(args.mix)
    total = sum(m[1] for m in mix)
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(args.arrivals)
        if t >= args.seconds:
            return out
        pick, acc, chosen = rng.uniform(0, total), 0.0, mix[-1]
        for kind in mix:
            acc += kind[1]
            if pick <= acc:
                chosen = kind
                break
        out.append(Arrival(len(out), t, rng.randint(chosen[2], chosen[3]), chosen[0]))


def check_plan(args) -> None:
    _check_common(args)
    parse_mix(args.mix)
    parse_schedule(args.schedule)
    netem.parse_link(args.link)
    if os.geteuid() != 0:
        raise ValueError("plan: needs root (the link is emulated between network namespaces)")
    for name in ("seconds", "arrivals", "ttft_ms", "local_share"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')}: must be positive")


POLICIES = ("never remote", "always remote", "remote when predicted to fit")


def plan(args, progress=print) -> dict:
    """Run the scenario under the three policies; return the report."""
    check_plan(args)
    profile = profiles.get(args.profile)
    requests = arrivals(args)
    if not requests:
        raise ValueError("no request arrives: raise --seconds or --arrivals")
    progress(f"{len(requests)} requests over {args.seconds:g} s; link {args.link}, rate {args.schedule}; "
             f"TTFT target {args.ttft_ms:g} ms; remote prefill {profile.prefill_tokens_per_s:g} tokens/s, "
             f"local {profile.prefill_tokens_per_s * args.local_share:g}")  # fmt: skip
    results = {"never remote": _never_remote(args, profile, requests)}
    max_tokens = max(r.tokens for r in requests)
    for policy in POLICIES[1:]:
        progress(f"{policy}:")
        with Peers(args.profile, max_tokens, args.link, codec=args.codec) as peers:
            results[policy] = _run_policy(args, peers, requests, policy, progress)
    summary = {policy: summarize_policy(outcomes, args.ttft_ms / 1e3) for policy, outcomes in results.items()}
    return {
        "kind": "plan", "profile": args.profile, "link": args.link, "schedule": args.schedule,
        "mix": args.mix, "arrivals_per_s": args.arrivals, "seconds": args.seconds, "ttft_ms": args.ttft_ms,
        "local_share": args.local_share, "codec": args.codec, "requests": len(requests), "summary": summary,
        "outcomes": results,
    }  # fmt: skip


def _prefill_s(profile: profiles.Profile, tokens: int, share: float = 1.0) -> float:
    return tokens / (profile.prefill_tokens_per_s * share)


def _never_remote(args, profile, requests: list[Arrival]) -> list[dict]:
    """Every request prefilled by the decode node, one at a time (simulated)."""
    free_at, out = 0.0, []
    for r in requests:
        free_at = max(free_at, r.at) + _prefill_s(profile, r.tokens, args.local_share)
        out.append({"index": r.index, "tokens": r.tokens, "where": "local", "ttft_s": free_at - r.at})
    return out


def _run_policy(args, peers: Peers, requests: list[Arrival], policy: str, progress) -> list[dict]:
    """Replay ``requests`` in real time: remote ones through a FIFO prefill server whose
    KV crosses the link, local ones through the simulated decode node."""
    assert peers.tx is not None and peers.link is not None
    tx, profile, link = peers.tx, peers.profile, peers.link
    schedule = parse_schedule(args.schedule)
    target = args.ttft_ms / 1e3
    outcomes: dict[int, dict] = {}
    lock = threading.Lock()
    remote_queue: list[Arrival] = []
    queue_cond = threading.Condition(lock)
    state = {"remote_free_at": 0.0, "local_free_at": 0.0, "arrived": False}
    finishers: list[threading.Thread] = []
    start = time.monotonic()

    def now() -> float:
        return time.monotonic() - start

    def finish(r: Arrival, handle, began: float) -> None:
        error = None
        try:
            handle.finish()
        except kvwire.TransferError as exc:
            error = str(exc)
        got = peers.result(f"{policy[:1]}{r.index}")
        ttft = (handle.t_acked - start) - r.at if error is None and not got["error"] else None
        with lock:
            outcomes[r.index] = {"index": r.index, "tokens": r.tokens, "where": "remote", "ttft_s": ttft,
                                 "queued_s": began - r.at, "codec": handle.codec.descriptor,
                                 "error": error or got["error"]}  # fmt: skip
        if not args.quiet:
            shown = "failed" if ttft is None else f"TTFT {ttft * 1e3:.0f} ms"
            progress(f"  #{r.index:3d} {r.tokens:6d} tokens remote ({handle.codec.descriptor}): {shown}")

    def exposed_target(waited_s: float, tokens: int) -> dict:
        """With codec="auto": what the request's TTFT target leaves the transfer once its
        prefill waited ``waited_s`` and ran (without a target auto always takes raw)."""
        if not tx.auto:
            return {}
        return {"max_exposed_ms": max(target - waited_s - _prefill_s(profile, tokens), 1e-3) * 1e3}

    def remote_server() -> None:
        while True:
            with lock:
                while not remote_queue and not state["arrived"]:
                    queue_cond.wait(0.5)
                if not remote_queue:
                    return
                r = remote_queue.pop(0)
            began = now()
            name = f"{policy[:1]}{r.index}"
            peers.expect(name, r.tokens)
            handle = peers.run_transfer(name, r.tokens, layers_per_s(profile, r.tokens),
                                        **exposed_target(began - r.at, r.tokens))  # fmt: skip
            t = threading.Thread(target=finish, args=(r, handle, began), daemon=True)
            t.start()
            finishers.append(t)

    stop_schedule = threading.Event()

    def link_schedule() -> None:
        for at, rate in schedule:
            if stop_schedule.wait(max(0.0, at - now())):
                return
            link.change(rate_bps=rate)

    link.change(rate_bps=schedule[0][1])
    server = threading.Thread(target=remote_server, daemon=True)
    scheduler = threading.Thread(target=link_schedule, daemon=True)
    server.start()
    scheduler.start()
    for r in requests:
        pause = r.at - now()
        if pause > 0:
            time.sleep(pause)
        remote = policy == "always remote"
        if policy == "remote when predicted to fit":
            with lock:  # the prefill servers' backlogs: when this request's prefill would start
                wait = max(state["remote_free_at"], r.at) - r.at
                local = max(state["local_free_at"], r.at) - r.at + _prefill_s(profile, r.tokens, args.local_share)
            estimate = tx.estimate(r.tokens, layers_per_s=layers_per_s(profile, r.tokens),
                                   codec="auto" if tx.auto else None, **exposed_target(wait, r.tokens))  # fmt: skip
            predicted = None if estimate.total_s is None else wait + estimate.total_s
            # remote if it fits; else local if that fits; else whichever is predicted sooner
            remote = predicted is None or predicted <= target or (local > target and predicted < local)
        if remote:
            with lock:
                state["remote_free_at"] = max(state["remote_free_at"], r.at) + _prefill_s(profile, r.tokens)
                remote_queue.append(r)
                queue_cond.notify()
        else:
            with lock:
                state["local_free_at"] = max(state["local_free_at"], r.at) + _prefill_s(
                    profile, r.tokens, args.local_share
                )
                outcomes[r.index] = {"index": r.index, "tokens": r.tokens, "where": "local",
                                     "ttft_s": state["local_free_at"] - r.at}  # fmt: skip
            if not args.quiet:
                ttft_ms = outcomes[r.index]["ttft_s"] * 1e3
                progress(f"  #{r.index:3d} {r.tokens:6d} tokens local: TTFT {ttft_ms:.0f} ms")
    with lock:
        state["arrived"] = True
        queue_cond.notify()
    server.join(600)
    for t in finishers:
        t.join(600)
    stop_schedule.set()
    scheduler.join(5)
    # A request whose finisher never reported (a thread still stuck after 600 s) failed: it
    # stays in the share's denominator, not dropped from it.
    return [outcomes.get(r.index, {"index": r.index, "tokens": r.tokens, "where": "unknown", "ttft_s": None,
                                   "error": "no outcome reported"}) for r in requests]  # fmt: skip


def summarize_policy(outcomes: list[dict], target_s: float) -> dict:
    ttfts = [o["ttft_s"] for o in outcomes if o["ttft_s"] is not None]
    met = sum(1 for t in ttfts if t <= target_s)
    return {
        "requests": len(outcomes),
        "met": met,
        "met_share": met / len(outcomes) if outcomes else None,
        "remote": sum(1 for o in outcomes if o["where"] == "remote"),
        "failed": sum(1 for o in outcomes if o["ttft_s"] is None),
        "median_ttft_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "p90_ttft_ms": percentile(ttfts, 0.9) * 1e3 if ttfts else None,
    }


PLAN_HEADERS = ("policy", "requests", "met TTFT", "share", "remote", "median TTFT ms", "p90 TTFT ms")


def plan_rows(report: dict) -> list[list[object]]:
    rows = []
    for policy in POLICIES:
        s = report["summary"][policy]
        rows.append([policy, s["requests"], s["met"], _pct(s["met_share"]), s["remote"],
                     "-" if s["median_ttft_ms"] is None else f"{s['median_ttft_ms']:.0f}",
                     "-" if s["p90_ttft_ms"] is None else f"{s['p90_ttft_ms']:.0f}"])  # fmt: skip
    return rows
