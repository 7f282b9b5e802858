"""The router (python -m kvwire.integrations.vllm.proxy) against two stand-in HTTP servers
on 127.0.0.1 that record what they are sent (no vLLM needed)."""

import http.client
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvwire.integrations.vllm import proxy


def read_body(handler: BaseHTTPRequestHandler, seen: list) -> dict | None:
    """The request's JSON body; None, recorded in ``seen`` as None, if the router dropped
    the request before its body was whole."""
    length = int(handler.headers["Content-Length"])
    raw = handler.rfile.read(length)
    if len(raw) < length:
        seen.append((handler.path, None))
        return None
    return json.loads(raw)


def backend(name: str, seen: list, stream_chunks: int = 0):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = read_body(self, seen)
            if body is None:
                return
            seen.append((self.path, body))
            if body.get("stream"):
                data = b"".join(b'data: {"n": %d}\n\n' % i for i in range(stream_chunks)) + b"data: [DONE]\n\n"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            data = json.dumps({"from": name, "choices": [{"text": "hi"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def routed():
    pre_seen, dec_seen = [], []
    pre, dec = backend("prefill", pre_seen), backend("decode", dec_seen, stream_chunks=3)
    router = proxy.Router(f"http://127.0.0.1:{pre.server_port}", f"http://127.0.0.1:{dec.server_port}", "10.0.0.2:7600")
    server = proxy.serve(router, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_port, pre_seen, dec_seen
    for s in (server, pre, dec):
        s.shutdown()


def post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def wait_for(seen: list) -> None:
    for _ in range(500):
        if seen:
            return
        threading.Event().wait(0.01)
    raise AssertionError("the prefill was never called")


def test_router_pairs_prefill_and_decode_with_one_transfer_id(routed):
    port, pre_seen, dec_seen = routed
    status, data = post(port, "/v1/completions", {"model": "m", "prompt": "hello", "max_tokens": 20})
    assert status == 200 and json.loads(data)["from"] == "decode"
    wait_for(pre_seen)
    (p_path, p_body), (d_path, d_body) = pre_seen[0], dec_seen[0]
    assert p_path == d_path == "/v1/completions"
    assert p_body["max_tokens"] == 1 and p_body["stream"] is False and d_body["max_tokens"] == 20
    tid = d_body["kv_transfer_params"]["kvwire_transfer_id"]
    assert d_body["kv_transfer_params"] == {"do_remote_prefill": True, "kvwire_transfer_id": tid}
    assert p_body["kv_transfer_params"] == {"do_remote_decode": True, "kvwire_transfer_id": tid,
                                            "kvwire_peer": "10.0.0.2:7600"}  # fmt: skip
    post(port, "/v1/chat/completions", {"model": "m", "messages": [], "max_tokens": 5})
    assert dec_seen[1][1]["kv_transfer_params"]["kvwire_transfer_id"] != tid  # one id per request


def test_router_streams_the_decode_answer(routed):
    port, _, _ = routed
    status, data = post(port, "/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert status == 200 and data.count(b"data:") == 4 and data.endswith(b"data: [DONE]\n\n")


def waiting_decode(seen: list, waits: list[threading.Event]):
    """A decode that, asked with do_remote_prefill, begins its answer and then waits for
    KV that never comes until its client leaves (each wait an event in ``waits``, set when
    it ends); asked without, answers at once. A request cut short is recorded as None."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            body = read_body(self, seen)
            if body is None:
                return
            waiting = bool((body.get("kv_transfer_params") or {}).get("do_remote_prefill"))
            if waiting:
                waits.append(threading.Event())  # before it is seen: a test that sees it finds its wait
            seen.append((self.path, body))
            if waiting:
                self.send_response(200)  # vLLM's streaming answer begins before the KV is in
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                self.connection.settimeout(20)
                if self.rfile.read(1) == b"":  # the router closed the request
                    waits[-1].set()
                self.close_connection = True
                return
            data = json.dumps({"from": "decode", "computed here": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def failing_prefill(seen: list):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            threading.Event().wait(0.2)  # the decode request is on its way meanwhile
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("prefill", ["error status", "unreachable"])
def test_a_failed_prefill_makes_the_decode_compute_the_prompt(prefill):
    """Without the prefill's KV the decode would wait until its deadline: the router drops
    that request and asks again without kv_transfer_params; the client gets one answer."""
    import socket
    import time

    pre_seen, dec_seen, waits = [], [], []
    dec = waiting_decode(dec_seen, waits)
    servers = [dec]
    if prefill == "unreachable":
        with socket.create_server(("127.0.0.1", 0)) as s:
            pre_url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused
    else:
        pre = failing_prefill(pre_seen)
        servers.append(pre)
        pre_url = f"http://127.0.0.1:{pre.server_port}"
    router = proxy.Router(pre_url, f"http://127.0.0.1:{dec.server_port}", "10.0.0.2:7600")
    server = proxy.serve(router, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        status, data = post(server.server_port, "/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 4})
        assert status == 200 and json.loads(data) == {"from": "decode", "computed here": True}
        assert time.monotonic() - t0 < 5
        # The request that would wait for the KV was dropped: while it waited (always, for a
        # prefill that answers late), or before it was whole, or before it was sent at all.
        local = [b for _, b in dec_seen if b is not None and "kv_transfer_params" not in b]
        dropped = [b for _, b in dec_seen if b is None or "kv_transfer_params" in b]
        assert local == [{"model": "m", "prompt": "x", "max_tokens": 4}] and len(dropped) <= 1
        assert len(waits) == sum(b is not None for b in dropped)  # every whole request that waited ...
        assert all(w.wait(5) for w in waits), "a decode request waiting for the KV was not dropped"  # ... was dropped
        if prefill == "error status":
            assert len(waits) == 1  # it fails 0.2 s late: the decode request was waiting by then
        assert len(pre_seen) == (1 if prefill == "error status" else 0)
    finally:
        for s in [server, *servers]:
            s.shutdown()


def test_router_refuses_what_it_cannot_route(routed):
    port, _, dec_seen = routed
    assert post(port, "/v1/embeddings", {})[0] == 404
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", b"not json", {"Content-Length": "8"})
    assert conn.getresponse().status == 400
    assert not dec_seen


def test_router_command_line_checks_its_arguments():
    out = subprocess.run([sys.executable, "-m", "kvwire.integrations.vllm.proxy", "--prefill", "ftp://x",
                          "--decode", "http://d:1", "--decode-kvwire", "d:7600"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--prefill: expected an http(s) URL" in out.stderr
