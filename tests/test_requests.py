"""The receiver's request lifecycle, sans I/O: events in, states and actions out, no sockets."""

import pytest

import kvwire
from kvwire.engine.requests import (
    ALLOWED,
    TERMINAL,
    Drain,
    Finish,
    Place,
    Placement,
    Release,
    RequestTable,
    SendAck,
    SendCancel,
    State,
)
from kvwire.errors import Cancelled, PeerLost, ProtocolError, TransferError, TransferTimeout

LAYOUT = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=1, head_dim=8, block_size=4)
S = "session-a"


def table(**kw) -> RequestTable:
    return RequestTable(LAYOUT, capacity_tokens=kw.pop("capacity", 64), max_requests_per_session=kw.pop("limit", 8))


def write_everything(t: RequestTable, request) -> list:
    """Place every chunk of a bound request, one chunk per tensor; the actions of the last."""
    actions = []
    for layer in range(LAYOUT.num_layers):
        for tensor in range(2):
            assert t.start_write(request, S, layer, tensor, 0, request.num_tokens) is True
            actions, _ = t.written(request, layer, None)
    return actions


def test_the_table_names_every_live_state_and_only_terminal_states_have_no_moves():
    assert set(ALLOWED) | TERMINAL == set(State)
    for state, moves in ALLOWED.items():
        assert moves and state not in moves


def test_expect_first_then_begin_binds_and_completes_with_ack_before_finish():
    t = table()
    handle = object()
    request, actions = t.expect("r", handle, 6, deadline=100)
    assert request.state is State.EXPECTED and actions == []
    assert t.begin(S, 1, "r", 6, now=0) == []
    assert request.state is State.BOUND
    actions = write_everything(t, request)
    assert actions == [SendAck(S, 1, True), Finish(handle, None)]  # the ACK first
    assert request.state is State.COMPLETE
    assert t.census() == {"requests": 0, "tags": 0, "expected": 0, "parked_chunks": 0, "cancelled_ids": 0,
                          "ended_ids": 0, "ended_tags": 1}  # fmt: skip


def test_begin_first_parks_chunks_until_expect_places_them():
    t = table()
    assert t.begin(S, 7, "r", 6, now=0) == []
    request = t.lookup(S, 7)
    assert request.state is State.ANNOUNCED
    assert t.arrived(request, "chunk-1") is Placement.PARK
    assert t.arrived(request, "chunk-2") is Placement.PARK
    bound, actions = t.expect("r", "h", 6, deadline=100)
    assert bound is request and request.state is State.BOUND
    assert actions == [Place(request, ["chunk-1", "chunk-2"])]
    assert t.arrived(request, "chunk-3") is Placement.PLACE


def test_token_counts_that_disagree_fail_with_a_failed_ack():
    t = table()
    request, _ = t.expect("r", "h", 6, deadline=100)
    actions = t.begin(S, 1, "r", 5, now=0)
    assert request.state is State.FAILED
    assert isinstance(actions[0], SendAck) and not actions[0].ok and "sends 5 tokens" in actions[0].message
    assert isinstance(actions[1], Finish) and "expects 6" in str(actions[1].error)


@pytest.mark.parametrize("tokens, limit, why", [(65, 8, "do not fit"), (0, 8, "do not fit"), (4, 1, "open requests")])
def test_a_begin_beyond_the_limits_is_refused_without_a_record(tokens, limit, why):
    t = table(limit=limit)
    if limit == 1:
        t.begin(S, 1, "first", 4, now=0)
    actions = t.begin(S, 2, "r", tokens, now=0)
    assert len(actions) == 1 and not actions[0].ok and why in actions[0].message
    assert t.counters["refused_requests"] == 1
    assert t.lookup(S, 2) is None  # remembered as ended: its DATA is dropped, not an error


def test_data_for_a_tag_never_begun_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="before its BEGIN"):
        table().lookup(S, 3)


def test_a_reused_tag_with_another_request_is_a_protocol_error():
    t = table()
    t.begin(S, 1, "a", 4, now=0)
    assert t.begin(S, 1, "a", 4, now=0) == []  # its BEGIN on another connection
    with pytest.raises(ProtocolError, match="changed its request"):
        t.begin(S, 1, "b", 4, now=0)


def test_the_origin_of_a_cancel_decides_what_the_sender_is_told():
    t = table()
    request, _ = t.expect("local", "h1", 4, deadline=100)
    t.begin(S, 1, "local", 4, now=0)
    actions = t.cancel(request, "decode went away")
    assert isinstance(actions[0], SendCancel) and actions[0].reason.endswith("decode went away")
    assert isinstance(actions[1].error, Cancelled)

    request, _ = t.expect("peer", "h2", 4, deadline=100)
    t.begin(S, 2, "peer", 4, now=0)
    actions = t.cancel_from_peer(S, 2, "prefill aborted")
    assert actions == [Finish("h2", actions[0].error)] and "by the sender" in str(actions[0].error)


def test_a_cancel_before_the_other_side_comes_is_remembered_for_it():
    t = table()
    request, _ = t.expect("early", "h", 4, deadline=100)
    t.cancel(request, "gave up")
    assert t.begin(S, 1, "early", 4, now=0) == [SendCancel(S, 1, "gave up")]  # the sender learns at once
    t.begin(S, 2, "late", 4, now=0)
    t.cancel_from_peer(S, 2, "aborted")
    request, actions = t.expect("late", "h2", 4, deadline=100)
    assert request.state is State.CANCELLED and isinstance(actions[0].error, Cancelled)


def test_an_error_while_chunks_are_written_waits_for_them_before_the_handle_ends():
    t = table()
    request, _ = t.expect("r", "h", 4, deadline=100)
    t.begin(S, 1, "r", 4, now=0)
    assert t.start_write(request, S, 0, 0, 0, 4) is True  # a write under way
    actions = t.expire(request)
    assert request.state is State.DRAINING
    assert actions[1:] == [Drain(request)]  # the receiver watches its writes; the handle ends later
    assert [type(a) for a in actions] == [SendCancel, Drain]  # the sender is told now
    assert t.start_write(request, S, 0, 1, 0, 4) is None  # nothing new starts
    actions, _ = t.written(request, 0, None)
    assert request.state is State.EXPIRED
    assert actions == [Finish("h", actions[0].error)] and isinstance(actions[0].error, TransferTimeout)


def test_a_failed_write_fails_the_request():
    t = table()
    request, _ = t.expect("r", "h", 4, deadline=100)
    t.begin(S, 1, "r", 4, now=0)
    t.start_write(request, S, 0, 0, 0, 4)
    actions, _ = t.written(request, 0, TransferError("decode failed"))
    assert request.state is State.FAILED and not actions[0].ok and actions[1] == Finish("h", actions[1].error)


def test_exact_repeats_are_duplicates_and_overlaps_are_errors():
    t = table()
    request, _ = t.expect("r", "h", 8, deadline=100)
    t.begin(S, 1, "r", 8, now=0)
    assert t.start_write(request, S, 0, 0, 0, 4) is True
    assert t.start_write(request, S, 0, 0, 0, 4) is False  # a resend after a lost connection
    with pytest.raises(ProtocolError, match="overlap"):
        t.start_write(request, S, 0, 0, 0, 8)


def test_unclaimed_requests_are_refused_and_their_parked_chunks_freed():
    t = table()
    t.begin(S, 1, "nobody", 4, now=0)
    request = t.lookup(S, 1)
    t.arrived(request, "c")
    assert t.refuse_unclaimed(now=5, timeout=10) == []
    actions = t.refuse_unclaimed(now=11, timeout=10)
    assert [type(a) for a in actions] == [SendAck, Release] and actions[1].chunks == ["c"]
    assert request.state is State.FAILED and t.census()["requests"] == 0


def test_a_lost_session_fails_its_requests_without_a_word_to_it():
    t = table()
    request, _ = t.expect("r", "h", 4, deadline=100)
    t.begin(S, 1, "r", 4, now=0)
    actions = t.session_lost(S)
    assert actions == [Finish("h", actions[0].error)] and isinstance(actions[0].error, PeerLost)
    assert t.census()["ended_tags"] == 0  # the session's memory goes with it


def test_deadlines_are_due_by_the_clock_passed_in():
    t = table()
    request, _ = t.expect("r", "h", 4, deadline=10)
    assert t.due(9.9) == [] and t.due(10) == [request]
    actions = t.expire(request)
    assert request.state is State.EXPIRED and isinstance(actions[0].error, TransferTimeout)
    assert t.expire(request) == []  # a request ends once


def test_ended_tags_are_remembered_boundedly():
    t = RequestTable(LAYOUT, capacity_tokens=64, max_requests_per_session=8, remembered_tags=3)
    for tag in range(1, 6):
        t.begin(S, tag, f"r{tag}", 4, now=0)
        t.cancel_from_peer(S, tag, "x")
    assert t.census()["ended_tags"] == 3
    assert t.lookup(S, 5) is None
    with pytest.raises(ProtocolError):
        t.lookup(S, 1)  # forgotten: a frame this late is an error


def test_a_request_keeps_the_codec_its_begin_named_and_a_repeat_may_not_change_it():
    t = table()
    fp8, int4 = object(), object()  # the receiver passes the codec objects of its session
    assert t.begin(S, 1, "r", 8, now=0.0, codec=fp8) == []
    assert t.begin(S, 1, "r", 8, now=0.0, codec=fp8) == []  # its BEGIN on another connection
    assert t.lookup(S, 1).codec_of(S) is fp8
    with pytest.raises(ProtocolError, match="changed its codec"):
        t.begin(S, 1, "r", 8, now=0.0, codec=int4)
    request, _ = t.expect("e", handle="h", num_tokens=8, deadline=10.0)
    t.begin(S, 2, "e", 8, now=0.0, codec=int4)  # expect came first: the BEGIN still names the codec
    assert request.codec_of(S) is int4 and request.state is State.BOUND


def test_the_checksum_limit_tells_the_sender_whose_payloads_failed_and_only_it():
    """A request from two senders (two heads, one each): the one whose payloads kept
    failing their checksum hears why (ChecksumMismatch on its side); the other, whose path
    may be clean, a plain failure with the same message."""
    from kvwire.engine.requests import MAX_CHECKSUM_FAILURES
    from kvwire.errors import ChecksumMismatch
    from kvwire.proto.request import PartSpec

    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
    t = RequestTable(layout, capacity_tokens=64, max_requests_per_session=8)
    handle = object()
    request, _ = t.expect("r", handle, 8, deadline=100)
    assert t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, True)) == []
    assert t.begin("b", 5, "r", 8, now=0, part=PartSpec(1, 1, False)) == []
    for _ in range(MAX_CHECKSUM_FAILURES):
        assert t.checksum_failed(request, "layer 0 tensor 0 rows 0..8, from b", "b") == ([], True)
    actions, again = t.checksum_failed(request, "layer 0 tensor 0 rows 0..8, from b", "b")
    acks = {a.session: a for a in actions if isinstance(a, SendAck)}
    assert not again and acks.keys() == {"a", "b"} and not acks["a"].ok and not acks["b"].ok
    assert acks["b"].checksum and not acks["a"].checksum
    assert acks["a"].message == acks["b"].message and "from b" in acks["a"].message
    (finish,) = [a for a in actions if isinstance(a, Finish)]
    assert isinstance(finish.error, ChecksumMismatch)


def test_one_sender_may_not_send_a_request_under_two_tags():
    """Two BEGINs of one request from one session, with parts that would fit together:
    refused as a protocol error, leaving the table as it was, so losing that sender
    later ends the request once (it used to end it twice and fail an assertion)."""
    from kvwire.proto.request import PartSpec

    layout = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
    t = RequestTable(layout, capacity_tokens=64, max_requests_per_session=8)
    assert t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, False)) == []
    with pytest.raises(ProtocolError, match="already sends it under tag 1"):
        t.begin("a", 2, "r", 8, now=0, part=PartSpec(1, 1, False))
    assert t.begin("b", 5, "r", 8, now=0, part=PartSpec(1, 1, False)) == []  # another sender's part fits
    request, _ = t.expect("r", object(), 8, deadline=100)
    (finish,) = [a for a in t.session_lost("a") if isinstance(a, Finish)]
    assert isinstance(finish.error, PeerLost) and not request.live
    assert t.session_lost("b") == []  # it ended already: told once


def test_requests_announced_before_their_expect_are_bounded_in_tokens_over_every_sender():
    """Each BEGIN nobody expected yet holds a coverage plan sized by its tokens; senders
    together may announce at most twice the receiver's capacity before expects claim
    them. A BEGIN beyond is refused and counted; claimed or ended ones make room."""
    t = table(capacity=64, limit=8)
    assert t.max_announced_tokens == 128
    assert t.begin("a", 1, "r1", 64, now=0) == []
    assert t.begin("b", 1, "r2", 64, now=0) == []
    (refused,) = t.begin("c", 1, "r3", 1, now=0)
    assert isinstance(refused, SendAck) and not refused.ok and "not yet expected" in refused.message
    assert t.counters["refused_requests"] == 1 and t.announced_tokens == 128
    request, _ = t.expect("r1", object(), 64, deadline=100)  # bound: no longer counted
    assert t.announced_tokens == 64
    assert t.begin("c", 2, "r3", 32, now=0) == []
    t.refuse_unclaimed(now=1000, timeout=60)  # r2 and r3 end unclaimed
    assert t.announced_tokens == 0


def test_unclaimed_requests_are_refused_oldest_first_and_only_those_past_the_timeout():
    """The reaper's pass looks only at the announced requests past the timeout (oldest
    first), not at every request: a claimed one leaves that order."""
    t = table(capacity=64, limit=16)
    for i in range(10):
        assert t.begin(S, i, f"r{i}", 4, now=float(i)) == []
    t.expect("r2", object(), 4, deadline=100)  # bound: no longer announced
    refused = {a.tag for a in t.refuse_unclaimed(now=14.5, timeout=10) if isinstance(a, SendAck)}
    assert refused == {0, 1, 3, 4}
    assert t.announced_tokens == 5 * 4 and t.refuse_unclaimed(now=14.5, timeout=10) == []


LAYOUT2 = kvwire.KVLayout.gqa(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)


def test_a_sibling_whose_request_ended_before_its_begin_is_told_how_it_ended():
    """Two senders, a head each. Sender a's connections go; sender b's BEGIN comes after.
    b is told at once what ended the request (not taken for a new request nobody will
    complete); a later BEGIN whose heads the request had already (a sender trying again)
    starts anew. Without an expect, the one that comes later still fails at once."""
    from kvwire.proto.request import PartSpec

    t = RequestTable(LAYOUT2, capacity_tokens=64, max_requests_per_session=8)
    request, _ = t.expect("r", "h", 8, deadline=100)
    t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, True))
    (finish,) = t.session_lost("a", who="rank 0")
    assert isinstance(finish.error, PeerLost) and not request.live
    (told,) = t.begin("b", 5, "r", 8, now=0, part=PartSpec(1, 1, False))
    assert told == SendCancel("b", 5, str(finish.error)) and "rank 0" in told.reason
    assert t.census()["requests"] == 0 and t.lookup("b", 5) is None  # its frames are dropped
    assert t.begin("a2", 1, "r", 8, now=1, part=PartSpec(1, 0, True)) == []  # rank 0 again: a new transfer
    assert t.lookup("a2", 1).state is State.ANNOUNCED and t.census()["ended_ids"] == 0

    t = RequestTable(LAYOUT2, capacity_tokens=64, max_requests_per_session=8)
    t.begin("a", 1, "q", 8, now=0, part=PartSpec(1, 0, True))  # no expect yet
    t.session_lost("a", who="rank 0")
    assert isinstance(t.begin("b", 5, "q", 8, now=0, part=PartSpec(1, 1, False))[0], SendCancel)
    request, (finish,) = t.expect("q", "h", 8, deadline=100)
    assert request.state is State.FAILED and isinstance(finish.error, PeerLost) and "rank 0" in str(finish.error)
    request, _ = t.expect("q", "h2", 8, deadline=100)  # the decode tries again: so may every sender
    assert t.begin("b", 6, "q", 8, now=1, part=PartSpec(1, 1, False)) == [] and request.state is State.BOUND


def test_senders_that_disagree_fail_their_request_as_one():
    """A second sender whose heads the request lacks but whose token count (or block grid,
    or whole tensors) disagrees with the first's can never join: the request fails at once
    and every sender is told why. A BEGIN for heads the request has already is another
    transfer under the same id: only it is refused."""
    from kvwire.proto.request import PartSpec

    t = RequestTable(LAYOUT2, capacity_tokens=64, max_requests_per_session=8)
    request, _ = t.expect("r", "h", 8, deadline=100)
    t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, True))
    assert not t.begin("c", 2, "r", 7, now=0, part=PartSpec(1, 0, False))[0].ok  # heads 0 again: another transfer
    assert request.state is State.BOUND
    actions = t.begin("b", 5, "r", 7, now=0, part=PartSpec(1, 1, False))
    acks = {a.session: a for a in actions if isinstance(a, SendAck)}
    assert acks.keys() == {"a", "b"} and not any(a.ok for a in acks.values())
    assert all("senders disagree (this sender sends 7 tokens, another sends 8)" in a.message for a in acks.values())
    (finish,) = [a for a in actions if isinstance(a, Finish)]
    assert request.state is State.FAILED and "senders disagree" in str(finish.error)
    t.begin("d", 1, "w", 8, now=0, part=PartSpec(1, 0, True))
    actions = t.begin("e", 1, "w", 8, now=0, part=PartSpec(1, 1, True), unit=8)  # another block grid
    assert {a.session for a in actions} == {"d", "e"} and "cut on 8 tokens" in actions[0].message


def test_a_deadline_names_what_had_not_arrived_and_from_whom():
    """An expired request's error says which senders' parts were still short (the layers)
    and which heads no sender had begun, so a stalled rank of several is found."""
    from kvwire.proto.request import PartSpec

    t = RequestTable(LAYOUT2, capacity_tokens=64, max_requests_per_session=8)
    request, _ = t.expect("r", "h", 8, deadline=10)
    (finish,) = t.expire(request)
    assert str(finish.error).endswith("deadline passed (no sender had begun it)")
    request, _ = t.expect("r", "h", 8, deadline=10)
    t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, True))
    for tensor in range(2):  # layer 0 of a's part arrives, layer 1 does not
        assert t.start_write(request, "a", 0, tensor, 0, 8) is True
        t.written(request, 0, None)
    names = {"a": "the sender at h:1 (tensor-parallel rank 0 of 2)"}
    actions = t.expire(request, names.__getitem__)
    (finish,) = [a for a in actions if isinstance(a, Finish)]
    assert isinstance(finish.error, TransferTimeout)
    assert str(finish.error) == ("request 'r': deadline passed (still missing: layer 1 from the sender at h:1 "
                                 "(tensor-parallel rank 0 of 2); k/v heads 1..2 from no sender yet)")  # fmt: skip


def test_a_sender_trying_again_first_is_refused_once_at_most():
    """A late part of an ended request and a sender trying the id again look alike. The
    part with heads the ended request lacked, from a new session, is refused once; from
    then on that session counts among the request's senders, whatever ends next under the
    id, so trying again cannot be refused for good."""
    from kvwire.proto.request import PartSpec

    t = RequestTable(LAYOUT2, capacity_tokens=64, max_requests_per_session=8)
    request, _ = t.expect("r", "h", 8, deadline=10)
    t.begin("a", 1, "r", 8, now=0, part=PartSpec(1, 0, True))
    t.expire(request)  # b never began
    assert isinstance(t.begin("b", 7, "r", 8, now=1, part=PartSpec(1, 1, False))[0], SendCancel)  # once
    assert t.begin("a", 2, "r", 8, now=1, part=PartSpec(1, 0, True)) == []  # a again: a new request
    again = t.lookup("a", 2)
    t.refuse_unclaimed(now=100, timeout=10)  # it ends too, before b comes back
    assert not again.live
    assert t.begin("b", 8, "r", 8, now=101, part=PartSpec(1, 1, False)) == []  # b again: taken, not refused
    assert t.lookup("b", 8).state is State.ANNOUNCED


def test_a_second_sender_of_the_whole_tensors_alone_is_refused_and_the_first_goes_on():
    """MLA: every part is the latent alone, no heads. A second one under a bound id is
    another transfer of it (a sender restarted, a replica): only it is refused."""
    mla = kvwire.KVLayout.mla(num_layers=2, latent_dim=16, block_size=4)
    t = RequestTable(mla, capacity_tokens=64, max_requests_per_session=8)
    t.begin("a", 1, "r", 8, now=0)
    request, _ = t.expect("r", "h", 8, deadline=100)
    (refused,) = t.begin("b", 1, "r", 8, now=0)
    assert not refused.ok and refused.session == "b" and "another transfer" in refused.message
    assert request.state is State.BOUND


def test_ended_requests_are_remembered_boundedly():
    """Requests that ended before they completed are remembered for their late parts as
    many as cancelled ids (``remembered_cancels``), the oldest forgotten first."""
    t = RequestTable(LAYOUT, capacity_tokens=64, max_requests_per_session=8, remembered_cancels=3)
    for tag in range(1, 6):
        t.begin(S, tag, f"r{tag}", 4, now=0)
        t.cancel_from_peer(S, tag, "x")
    assert t.census()["ended_ids"] == 3
    assert list(t._ended) == ["r3", "r4", "r5"]
