"""KvwireConnector against vLLM 0.33's real Scheduler, KV cache manager and connector factory.

Two engines (prefill and decode, see tests/vllm_engine.py) in this process, real kvwire
transfers over 127.0.0.1 into caches laid out by vLLM's own allocator. Runs in the CI
step that builds .venv-vllm (.ci/vllm-env); skipped where vLLM cannot be imported.
"""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip(
    "vllm.v1.core.sched.scheduler", reason="vLLM 0.33 is not installed here (CI runs this with .ci/vllm-env's venv)"
)

import torch  # noqa: E402

import kvwire  # noqa: E402
from kvwire.bench import vllm_engines as ve  # noqa: E402
from kvwire.integrations.vllm import decode_params, prefill_params  # noqa: E402
from tests.helpers import TcpRelay  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair(tmp_path):
    """make(**options) -> (prefill, decode) engines sharing a secret; closed afterwards."""
    made = []

    def make(prefill_extra=None, decode_extra=None, **kw):
        base = {"secret": ve.SECRET, "deadline_s": 30.0, "connections": 2}
        decode_kw = {k[7:]: v for k, v in kw.items() if k.startswith("decode_")}
        prefill_kw = {k[8:]: v for k, v in kw.items() if k.startswith("prefill_")}
        common = {k: v for k, v in kw.items() if not k.startswith(("decode_", "prefill_"))}
        d = ve.make_engine(ve.Options("kv_consumer", base | {"listen": "127.0.0.1:0"} | (decode_extra or {}),
                                      **(common | decode_kw)), str(tmp_path))  # fmt: skip
        made.append(d)
        p = ve.make_engine(ve.Options("kv_producer", base | (prefill_extra or {}), **(common | prefill_kw)),
                           str(tmp_path))  # fmt: skip
        made.append(p)
        return p, d

    yield make
    for e in made:
        e.close()


def peer_of(decode: ve.Engine) -> str:
    host, port = decode.worker.worker.receiver.address
    return f"{host}:{port}"


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 900, (n,), generator=g).tolist()


def submit(p, d, tid: str, tokens: list[int], decode_tokens: int = 3, decode_first: bool = True):
    """The router's part: the same prompt to both, with the pairing contract's params."""
    if decode_first:
        d.add(f"d-{tid}", tokens, decode_params(tid), max_tokens=decode_tokens)
    p.add(f"p-{tid}", tokens, prefill_params(tid, peer_of(d)), max_tokens=1)
    if not decode_first:
        d.add(f"d-{tid}", tokens, decode_params(tid), max_tokens=decode_tokens)


def assert_holds_prefill_kv(d: ve.Engine, req_id: str, tokens: list[int]):
    ids = d.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
    for layer, name in enumerate(d.caches):
        got = d.tokens_in_blocks(name, ids, len(tokens))
        want = d.expected(tokens, layer)
        bad = [i for i in range(len(tokens)) if not torch.equal(got[i], want[i])]
        assert not bad, f"layer {layer}: tokens {bad} differ from the prefill's"


def check_on_receive(checked: dict, prompts: dict):
    """Compare the decode's blocks with the prefill's K/V the moment the receive is reported
    (before the decode computes anything itself)."""

    def hook(engine, req_id):
        if req_id not in engine.finished:
            assert_holds_prefill_kv(engine, req_id, prompts[req_id])
            checked[req_id] = True

    return hook


def both_idle(p, d):
    return lambda: p.idle() and d.idle()


@pytest.mark.parametrize(
    "layout,kind,cache_dtype",
    [("LBNHC", "gqa", "auto"), ("LBHNC", "gqa", "auto"), ("LBNHC", "mla", "auto"), ("LBNHC", "gqa", "fp8")],
    ids=["LBNHC", "LBHNC", "MLA", "fp8-cache"],
)
def test_life_cycle_moves_the_prefill_kv_bit_exact(pair, layout, kind, cache_dtype):
    p, d = pair(layout=layout, kind=kind, cache_dtype=cache_dtype)
    tokens = prompt(100, seed=1)
    checked: dict = {}
    d.on_recving = check_on_receive(checked, {"d-t1": tokens})
    submit(p, d, "t1", tokens)
    # The decode parks the request until its KV is in place.
    d.step()
    req = d.scheduler.requests["d-t1"]
    assert req.status.name == "WAITING_FOR_REMOTE_KVS"
    held = d.total_blocks - d.free_blocks
    assert held == -(-100 // ve.BLOCK)
    ve.run([p, d], lambda: "d-t1" in d.finished and p.idle(), what="the request's life cycle")
    assert checked == {"d-t1": True}
    # The decode computed only the last prompt token itself, then decoded.
    assert d.scheduled["d-t1"][0] == 1
    assert len(d.outputs["d-t1"]) == 3
    assert p.sending_done == ["p-t1"] and d.recving_done == ["d-t1"]
    ve.run([p, d], both_idle(p, d), what="every block released")
    assert not d.load_errors
    sent = sum(s.data.get("sent_segments", 0) for s in p.stats)
    assert sent == 1


def test_chunked_prefill_sends_each_segment_in_the_step_that_completes_it(pair):
    # 600 tokens, chunks of at most 128 tokens per step, segments of 128: five steps, one
    # segment per step; the decode expects all five before the prefill starts.
    p, d = pair(prefill_max_batched_tokens=128, prefill_extra={"segment_tokens": 128},
                decode_extra={"segment_tokens": 128})  # fmt: skip
    tokens = prompt(600, seed=2)
    checked: dict = {}
    d.on_recving = check_on_receive(checked, {"d-c": tokens})
    submit(p, d, "c", tokens)
    sends_per_step = []
    orig = p.worker.worker._open_step

    def record():
        meta = p.worker.worker._meta
        if meta is not None and not p.worker.worker._opened:
            sends_per_step.append([s.wire_id for s in meta.sends])
        orig()

    p.worker.worker._open_step = record
    ve.run([p, d], lambda: "d-c" in d.finished and p.idle(), what="a chunked prefill")
    assert p.scheduled["p-c"] == [128, 128, 128, 128, 88]
    assert [w for w in sends_per_step if w] == [["c#0"], ["c#1"], ["c#2"], ["c#3"], ["c#4"]]
    assert checked == {"d-c": True} and not d.load_errors


def test_64_requests_in_flight(pair):
    p, d = pair(num_blocks=1024, max_batched_tokens=4096)
    prompts = {f"d-r{i}": prompt(40 + 7 * i, seed=100 + i) for i in range(64)}
    checked: dict = {}
    d.on_recving = check_on_receive(checked, prompts)
    for i in range(64):
        submit(p, d, f"r{i}", prompts[f"d-r{i}"], decode_tokens=2, decode_first=i % 2 == 0)
    ve.run([p, d], lambda: len(d.finished) == 64, timeout=90, what="64 requests")
    assert len(checked) == 64 and not d.load_errors
    assert all(len(d.outputs[r]) == 2 for r in prompts)
    ve.run([p, d], both_idle(p, d), what="every block released")


# -- faults: each ends within its deadline, blocks released, the load error reported --------
FAST = {"deadline_s": 4.0}


def decode_failed(d: ve.Engine, req_id: str, block_ids: list[int]):
    """The decode reported these blocks as load errors and vLLM failed the request (policy 'fail')."""
    assert set(block_ids) <= set(d.load_errors)
    assert str(d.finished[req_id]).lower().endswith("error")


def test_decode_aborted_before_the_transfer_started(pair):
    p, d = pair()
    tokens = prompt(70, seed=3)
    d.add("d-a", tokens, decode_params("a"), max_tokens=3)
    d.step()  # expects its segment
    d.abort("d-a")
    ve.run([d], lambda: d.idle(), timeout=20, what="the decode releasing the aborted request")
    assert d.recving_done == ["d-a"]
    # The prefill comes later: the decode refuses its segment (cancelled), so the prefill
    # releases its blocks at once instead of waiting for an acknowledgement.
    p.add("p-a", tokens, prefill_params("a", peer_of(d)), max_tokens=1)
    ve.run([p, d], both_idle(p, d), timeout=20, what="the prefill releasing its blocks")
    assert p.sending_done == ["p-a"]
    assert sum(s.data.get("send_failures", 0) for s in p.stats) == 1


def test_decode_aborted_while_queued_for_blocks_declines_its_segments(pair):
    """Aborted before vLLM gave it blocks (nothing expected yet): its segments are declined,
    so the prefill releases its blocks at once instead of at deadline_s."""
    p, d = pair()
    tokens = prompt(70, seed=6)
    d.add("d-q", tokens, decode_params("q"), max_tokens=3)
    d.abort("d-q")  # before any step: still waiting for blocks
    p.add("p-q", tokens, prefill_params("q", peer_of(d)), max_tokens=1)
    ve.run([p, d], both_idle(p, d), timeout=20, what="the prefill releasing its blocks")
    assert p.sending_done == ["p-q"]
    assert sum(s.data.get("send_failures", 0) for s in p.stats) == 1


def test_decode_aborted_after_the_transfer_started(pair):
    p, d = pair()
    tokens = prompt(70, seed=4)
    submit(p, d, "b", tokens)
    d.step()
    p.step()  # every layer of the segment is on its way
    d.abort("d-b")
    ve.run([p, d], both_idle(p, d), timeout=20, what="both sides releasing the request")
    assert d.recving_done == ["d-b"] and p.sending_done == ["p-b"]
    assert "d-b" not in d.outputs or not d.outputs["d-b"]


def test_prefill_aborted_before_the_transfer_started(pair):
    p, d = pair()
    tokens = prompt(70, seed=5)
    submit(p, d, "c", tokens)
    d.step()
    p.abort("p-c")  # before the prefill scheduled it: its segment is cancelled on the wire
    ve.run([p, d], lambda: "d-c" in d.finished, timeout=20, what="the decode giving up on the request")
    decode_failed(d, "d-c", [])
    assert d.load_errors  # every block of the cancelled segment
    ve.run([p, d], both_idle(p, d), timeout=20, what="every block released")
    assert not p.sending_done  # it never held blocks for the transfer


def test_an_abandon_goes_out_in_a_step_without_a_forward_pass(pair):
    """vLLM binds every step's metadata but runs no forward pass (no save hooks) when
    nothing is scheduled: the cancel of an abandoned segment must not wait for one."""
    from kvwire.integrations.vllm.metadata import Abandon, KvwireConnectorMetadata

    p, d = pair()
    host, port = d.worker.worker.receiver.address
    h = d.worker.worker.receiver.expect("lonely#0", [0, 1], 20, deadline=20)
    p.worker.worker.bind(KvwireConnectorMetadata(abandons=[Abandon("p-lonely", (host, port), [("lonely#0", 20)])]))
    with pytest.raises(kvwire.Cancelled, match="the prefill request ended"):
        h.wait(timeout=10)


def test_prefill_aborted_mid_prompt_recomputes_from_the_first_missing_block(pair):
    # Chunks of 64 tokens, segments of 64: the prefill is aborted after its first chunk.
    # With kv_load_failure_policy=recompute the decode keeps segment 0 and computes the rest.
    p, d = pair(prefill_max_batched_tokens=64, prefill_max_num_seqs=16, prefill_extra={"segment_tokens": 64},
                decode_extra={"segment_tokens": 64}, decode_failure_policy="recompute")  # fmt: skip
    tokens = prompt(200, seed=6)
    submit(p, d, "e", tokens)
    d.step()
    p.step()
    p.abort("p-e")
    ve.run([p, d], lambda: "d-e" in d.finished, timeout=30, what="the decode finishing the request itself")
    ids = d.scheduled["d-e"]
    assert ids[0] == 200 - 64  # it computed everything after the segment it received
    assert len(d.outputs["d-e"]) == 3
    ve.run([p, d], both_idle(p, d), timeout=20, what="every block released")
    assert p.sending_done == ["p-e"]


def test_decode_that_never_expects_releases_the_prefill_within_its_deadline(pair):
    p, d = pair(decode_extra=FAST, prefill_extra=FAST)
    tokens = prompt(50, seed=7)
    p.add("p-f", tokens, prefill_params("f", peer_of(d)), max_tokens=1)
    t0 = ve.time.monotonic()
    ve.run([p, d], both_idle(p, d), timeout=20, what="the prefill releasing its blocks")
    assert ve.time.monotonic() - t0 < 4.0 + 5.0
    assert p.sending_done == ["p-f"]
    assert sum(s.data.get("send_failures", 0) for s in p.stats) == 1


def test_a_prefill_engine_with_nothing_scheduled_keeps_stepping_until_its_kv_is_acknowledged(pair):
    """vLLM steps an engine only while ``Scheduler.has_requests()``; its blocks are freed
    by a step's ``get_finished``. A finished prefill whose KV is not yet acknowledged must
    keep it stepping, or the blocks stay held until new traffic comes. vLLM 0.33 counts
    such requests itself (``has_finished_requests``); the connector relies on that."""
    p, d = pair()
    tokens = prompt(40, seed=9)
    p.add("p-g", tokens, prefill_params("g", peer_of(d)), max_tokens=1)
    ve.run([p], lambda: "p-g" in p.finished, timeout=20, what="the prefill finishing")
    assert not p.sending_done and p.scheduler.get_num_unfinished_requests() == 0
    assert p.scheduler.has_requests(), "vLLM would stop stepping an engine that still holds blocks for kvwire"
    checked: dict = {}
    d.on_recving = check_on_receive(checked, {"d-g": tokens})
    d.add("d-g", tokens, decode_params("g"), max_tokens=3)
    ve.run([p, d], lambda: p.sending_done == ["p-g"], timeout=20, what="the acknowledgement")
    ve.run([p, d], both_idle(p, d), timeout=20, what="every block released")
    assert not p.scheduler.has_requests() and checked == {"d-g": True}


@pytest.mark.parametrize("connect_timeout_s,deadline_s", [(2.0, 30.0), (30.0, 2.0)], ids=["connect", "deadline"])
def test_a_decode_that_never_answers_stalls_no_forward_pass(pair, connect_timeout_s, deadline_s):
    """The kernel accepts the connections of a decode that never answers its handshake:
    the prefill connects in a thread of its own, so its steps go on at their pace; the
    segment fails once ``connect_timeout_s`` or its deadline has passed, whichever comes
    first, and its blocks are released."""
    import socket
    import time

    silent = socket.create_server(("127.0.0.1", 0))  # listening, never accepting
    try:
        p, _ = pair(prefill_extra={"connect_timeout_s": connect_timeout_s, "deadline_s": deadline_s})
        host, port = silent.getsockname()
        p.add("p-s", prompt(40, seed=10), prefill_params("s", f"{host}:{port}"), max_tokens=1)
        t0, slowest = time.monotonic(), 0.0
        while not p.idle():
            assert time.monotonic() - t0 < 20, "the prefill did not release its blocks"
            t = time.monotonic()
            p.step()
            slowest = max(slowest, time.monotonic() - t)
            time.sleep(0.003)
        assert slowest < 1.0, f"a step took {slowest:.2f} s: the connection was made in the forward pass"
        assert time.monotonic() - t0 >= 2.0  # it did wait for the connection
        assert p.sending_done == ["p-s"]
        assert sum(s.data.get("send_failures", 0) for s in p.stats) == 1
    finally:
        silent.close()


def test_a_prefill_request_preempted_while_its_decode_is_being_connected(pair):
    """vLLM preempts a prefill request mid-prompt (a request decoding beside it needs a
    block) while its first segments wait for a decode whose handshake is slow: they fail at
    once, reading nothing from blocks vLLM is about to reuse, and the step does not wait;
    once connected, the decode is told, stops waiting for the request's later segments
    too (vLLM would compute them anyway) and fails the request well before its deadline;
    the prefill request, computed again when there is room, ends with every block free."""
    p, d = pair(prefill_num_blocks=21, prefill_max_batched_tokens=64, prefill_max_num_seqs=16,
                prefill_extra={"segment_tokens": 64}, decode_extra={"segment_tokens": 64})  # fmt: skip
    release = threading.Event()
    relay = TcpRelay(d.worker.worker.receiver.address, hold=release)  # the decode's handshake waits for it
    try:
        p.add("local", prompt(100, seed=20), None, max_tokens=150)  # takes a block every 16 tokens
        for _ in range(12):  # (the point where its next block is needed during the prompt below)
            p.step()
        tokens = prompt(16 * p.free_blocks, seed=21)  # just fits when admitted
        d.add("d-x", tokens, decode_params("x"), max_tokens=3)
        p.add("p-x", tokens, prefill_params("x", "{}:{}".format(*relay.address)), max_tokens=1)
        slowest = 0.0
        for _ in range(20):
            t = time.monotonic()
            p.step()
            d.step()
            slowest = max(slowest, time.monotonic() - t)
            if p.preempted:
                break
        assert p.preempted == ["p-x"], "vLLM did not preempt the prefill request mid-prompt"
        assert slowest < 1.0, f"a step took {slowest:.2f} s: the preemption waited for the connection"
        sent = p.worker.worker._outgoing["p-x"]
        assert [s.wire_id for s in sent] == ["x#0", "x#1"]
        assert all(s.done() and "preempted before its decode was connected" in s.error for s in sent)

        release.set()
        t0 = time.monotonic()
        ve.run([p, d], lambda: "d-x" in d.finished, timeout=20, what="the decode giving up")
        assert time.monotonic() - t0 < 10  # its deadline is 30 s
        assert str(d.finished["d-x"]).lower().endswith("error")
        assert len(set(d.load_errors)) == len(tokens) // 16  # every block: none of its segments came
        ve.run([p, d], both_idle(p, d), timeout=60, what="every block released")
        assert p.finished.keys() == {"local", "p-x"} and p.sending_done == ["p-x"]
    finally:
        relay.close()


def test_a_remote_hit_trimmed_by_vllm_loads_what_it_took_and_no_more(pair):
    """vLLM may take fewer remote tokens than offered (a hit trimmed to a replay window):
    it loads tokens [local hit, local hit + taken) and computes the rest. The segments
    inside that range are received; the one it cuts cannot arrive whole, so its blocks
    are reported as failed to load (vLLM computes from there); the segments after it
    are declined, never waited for. The bytes that came are the prefill's."""
    from types import SimpleNamespace

    p, d = pair(decode_extra={"segment_tokens": 64}, prefill_extra={"segment_tokens": 64})
    tokens = prompt(200, seed=30)
    req = d.add("d-o", tokens, decode_params("o"), max_tokens=3)
    side = d.scheduler.connector.scheduler
    assert side.get_num_new_matched_tokens(req, 0) == (200, True)
    blocks = d.scheduler.kv_cache_manager.allocate_slots(req, 180)
    ids = blocks.get_block_ids()[0]
    side.update_state_after_alloc(req, blocks, 180)  # vLLM took 180 of the 200 tokens offered
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}, preempted_req_ids=()))
    assert meta.declines == ["o#2", "o#3"]  # [128, 192) is cut at 180; [192, 200) is vLLM's to compute
    (receive,) = meta.receives
    assert [wire_id for wire_id, _, _ in receive.segments] == ["o#0", "o#1"]
    assert sorted(receive.missing_blocks) == sorted(ids[8:12])  # tokens 128..179

    worker = d.worker.worker
    worker.bind(meta)
    worker.start_load()
    p.add("p-o", tokens, prefill_params("o", peer_of(d)), max_tokens=1)
    done: set = set()
    ve.run([p], lambda: done.update(worker.finished_recving()) or done == {"d-o"}, timeout=20, what="the receive")
    assert worker.take_load_errors() == set(ids[8:12])
    for layer, name in enumerate(d.caches):
        got = d.tokens_in_blocks(name, ids[:8], 128)
        assert torch.equal(got, d.expected(tokens, layer)[:128].reshape(128, -1)), f"layer {layer}"
    ve.run([p], lambda: p.idle(), timeout=20, what="the prefill releasing its blocks")  # o#2, o#3 refused


def test_wrong_secret_fails_both_sides_within_the_deadline(pair):
    p, d = pair(decode_extra=FAST, prefill_extra=FAST | {"secret": "not-the-decode-secret"})
    tokens = prompt(50, seed=8)
    submit(p, d, "g", tokens)
    t0 = ve.time.monotonic()
    ve.run([p, d], lambda: "d-g" in d.finished, timeout=20, what="the decode's deadline")
    assert ve.time.monotonic() - t0 < 4.0 + 5.0
    decode_failed(d, "d-g", d.load_errors)
    assert d.load_errors
    ve.run([p, d], both_idle(p, d), timeout=20, what="every block released")
    assert p.sending_done == ["p-g"]
    assert d.worker.worker.receiver.stats()["rejected_connections"] >= 1


@pytest.mark.parametrize(
    "prefill_extra,prefill_kw,message",
    [
        ({"segment_tokens": 256}, {}, "segment_tokens differs: the prefill has 256, this decode has 1024"),
        ({}, {"prefill_kind": "mla"}, r"sender has 3 layers \[kv 96\].*receiver has 3 layers \[k/v 2x32\]"),
        ({}, {"prefill_kv_heads": 4}, r"sender has 3 layers \[k/v 4x32\].*receiver has 3 layers \[k/v 2x32\]"),
        ({"codec": "fp8"}, {}, "codec 'fp8' refused by the receiver"),
    ],
    ids=["segment-size", "kv-cache", "kv-heads", "codec"],
)
def test_mismatches_are_refused_at_the_handshake_naming_them(pair, prefill_extra, prefill_kw, message):
    import kvwire

    p, d = pair(prefill_extra=prefill_extra, **prefill_kw)
    peer = d.worker.worker.receiver.address
    p.worker.worker._connect(peer)  # as a segment for a new decode starts it
    with pytest.raises(kvwire.LayoutMismatch, match=message):
        p.worker.worker._connects[peer].result(timeout=10)
    # A request over that pairing fails fast on the prefill and releases its blocks.
    p.add("p-h", prompt(20, seed=9), prefill_params("h", peer_of(d)), max_tokens=1)
    ve.run([p], lambda: p.idle(), timeout=20, what="the prefill releasing its blocks")
    assert sum(s.data.get("send_failures", 0) for s in p.stats) == 1


def free_port_run(n: int) -> int:
    """A port P with P .. P + n - 1 free on 127.0.0.1 (a decode instance's ranks listen there)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n > 65535:
            continue
        held = []
        try:
            for i in range(n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2), (2, 4)], ids=["2-to-1", "1-to-2", "2-to-4"])
def test_prefill_and_decode_of_different_tensor_parallelism(tmp_path, prefill_tp, decode_tp):
    # Each rank is an engine of its own (see kvwire.bench.vllm_engines); the model has 4
    # KV heads, so TP 4 ranks hold one each. Every decode rank must end up with exactly its
    # heads of the prefill's K/V, whichever prefill ranks held them.
    base = {"secret": ve.SECRET, "deadline_s": 30.0, "connections": 1}
    listen = f"127.0.0.1:{free_port_run(decode_tp)}"
    engines = []
    try:

        def rank(role: str, extra: dict, tp: int, r: int) -> ve.Engine:
            engines.append(ve.make_engine(ve.Options(role, base | extra, kv_heads=4, tp_size=tp, tp_rank=r),
                                          str(tmp_path)))  # fmt: skip
            return engines[-1]

        decode = [rank("kv_consumer", {"listen": listen}, decode_tp, r) for r in range(decode_tp)]
        prefill = [rank("kv_producer", {"decode_tp": decode_tp}, prefill_tp, r) for r in range(prefill_tp)]
        tokens = prompt(90, seed=12)
        checked: dict = {}
        for d in decode:
            d.on_recving = lambda engine, req_id: checked.setdefault(engine.opts.tp_rank, assert_holds_prefill_kv(
                engine, req_id, tokens) or True)  # fmt: skip
            d.add("d-tp", tokens, decode_params("tp"), max_tokens=2)
        for p in prefill:
            p.add("p-tp", tokens, prefill_params("tp", peer_of(decode[0])), max_tokens=1)
        ve.run(engines, lambda: all("d-tp" in d.finished for d in decode) and all(p.idle() for p in prefill),
               what="every rank's part of the request")  # fmt: skip
        assert checked == dict.fromkeys(range(decode_tp), True)
        assert all(not d.load_errors for d in decode)
        # Every prefill rank sent its part (none is idle by accident), to the ranks it serves.
        sent = [sum(s.data.get("sent_segments", 0) for s in p.stats) for p in prefill]
        assert sent == [1] * prefill_tp
    finally:
        for e in engines:
            e.close()


def test_a_decode_unlike_decode_tp_fails_the_segment_not_the_prefill_engine(tmp_path):
    """decode_tp not said (the prefill takes its own TP, 1) while the decode runs TP 2: the
    prefill cannot pair with it, and says so as a failed segment; its engine goes on."""
    base = {"secret": ve.SECRET, "deadline_s": 5.0, "connections": 1}
    listen = f"127.0.0.1:{free_port_run(2)}"
    engines = []
    try:
        for r in range(2):
            engines.append(ve.make_engine(ve.Options("kv_consumer", base | {"listen": listen}, kv_heads=4, tp_size=2,
                                                     tp_rank=r), str(tmp_path)))  # fmt: skip
        prefill = ve.make_engine(ve.Options("kv_producer", base, kv_heads=4), str(tmp_path))
        engines.append(prefill)
        prefill.add("p-x", prompt(40, seed=3), prefill_params("x", peer_of(engines[0])), max_tokens=1)
        ve.run([prefill], prefill.idle, what="the prefill, its segment failed")
        assert sum(s.data.get("send_failures", 0) for s in prefill.stats) == 1
    finally:
        for e in engines:
            e.close()


def test_prefill_killed_mid_transfer(pair, tmp_path):
    import multiprocessing

    p, d = pair()
    p.close()
    tokens = prompt(300, seed=10)
    d.add("d-k", tokens, decode_params("k"), max_tokens=3)
    d.step()
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    extra = {"secret": ve.SECRET, "deadline_s": 30.0, "connections": 2}
    proc = ctx.Process(target=ve.prefill_child, args=(child, str(tmp_path), extra, tokens, "k", peer_of(d), 1.0))
    proc.start()
    try:
        assert parent.poll(90), "the prefill process did not start sending"
        assert parent.recv() == "sending"
        rx = d.worker.worker.receiver
        ve.run([d], lambda: rx.stats().get("frames", 0) > 0, timeout=20, what="the first bytes arriving")
        proc.kill()  # after its first layer arrived, before its last was computed
        t0 = ve.time.monotonic()
        ve.run([d], lambda: "d-k" in d.finished, timeout=20, what="the decode noticing the lost prefill")
        assert ve.time.monotonic() - t0 < 10  # the lost connections end it, not the 30 s deadline
        decode_failed(d, "d-k", d.load_errors)
        ve.run([d], lambda: d.idle(), timeout=20, what="the decode releasing its blocks")
    finally:
        proc.kill()
        proc.join(10)
