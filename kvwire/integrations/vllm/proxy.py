"""A small router for kvwire's vLLM connector: OpenAI-compatible completions in, forwarded
to one prefill and one decode vLLM server, in the pattern of vLLM's own toy proxy.

For every request it makes a transfer id and sends, concurrently,

* to the prefill: the same body with ``max_tokens: 1``, ``stream: false`` and
  ``kv_transfer_params = {"do_remote_decode": true, "kvwire_transfer_id": ID,
  "kvwire_peer": DECODE_KVWIRE}``;
* to the decode: the client's body with ``kv_transfer_params = {"do_remote_prefill":
  true, "kvwire_transfer_id": ID}``, whose answer (streamed or not) goes back to the client.

The prefill streams the KV to the decode layer by layer while it computes; the decode
waits for it, then generates. When the prefill fails (an error status, or no answer) the
decode would wait for KV that never comes, until its ``deadline_s``: the router drops
that decode request (vLLM aborts a request whose client disconnects, and the connector
releases its blocks) and asks the decode again without ``kv_transfer_params``, so that
it computes the prompt itself; the client sees one answer. Once the decode's answer has
begun to reach the client, a prefill failure changes nothing. Standard library only: it
runs where vLLM is not installed.

    python -m kvwire.integrations.vllm.proxy --port 8000 \\
        --prefill http://prefill-host:8100 --decode http://decode-host:8200 \\
        --decode-kvwire decode-host:7600
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import socket
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvwire.integrations.vllm.config import decode_params, parse_host_port, prefill_params

log = logging.getLogger("kvwire.vllm.proxy")

ROUTES = ("/v1/completions", "/v1/chat/completions")
TIMEOUT_S = 600.0  # a long generation may take minutes; the decode's own deadlines end a stuck transfer


class Backend:
    def __init__(self, url: str, argument: str) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{argument}: expected an http(s) URL, got {url!r}")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.url = url

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=TIMEOUT_S)


class Router:
    def __init__(self, prefill: str, decode: str, decode_kvwire: str) -> None:
        self.prefill = Backend(prefill, "--prefill")
        self.decode = Backend(decode, "--decode")
        parse_host_port(decode_kvwire, "--decode-kvwire")
        self.decode_kvwire = decode_kvwire

    def bodies(self, body: dict) -> tuple[str, dict, dict]:
        """(transfer id, prefill body, decode body) for a client's request body."""
        tid = f"kvw-{uuid.uuid4().hex}"
        pre = dict(body, max_tokens=1, stream=False, kv_transfer_params=prefill_params(tid, self.decode_kvwire))
        pre.pop("stream_options", None)
        if "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        dec = dict(body, kv_transfer_params=decode_params(tid))
        return tid, pre, dec

    def run_prefill(self, path: str, body: dict, headers: dict, exchange: _Exchange | None = None) -> None:
        """Send the prefill its request; a failure ends ``exchange``'s wait for the KV."""
        tid = body["kv_transfer_params"]["kvwire_transfer_id"]
        conn = self.prefill.connect()
        failure = None
        try:
            conn.request("POST", path, json.dumps(body), headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failure = f"the prefill answered {resp.status}"
        except (OSError, http.client.HTTPException) as exc:
            failure = f"the prefill request failed: {exc}"
        finally:
            conn.close()
        if failure is not None:
            redone = exchange is not None and exchange.prefill_failed()
            log.warning("%s for %s%s", failure, tid, "; the decode computes the prompt itself" if redone else "")


class _Exchange:
    """One client request's decode side, as far as a failed prefill concerns it: the
    decode connection that waits for the KV can be dropped until its answer has begun to
    reach the client (``commit``), and not after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._committed = False
        self.failed = False  # the prefill failed: the decode must compute the prompt itself

    def waiting_on(self, conn: http.client.HTTPConnection) -> bool:
        """The decode request on ``conn`` waits for the prefill's KV; False if the prefill
        already failed (then ask without it)."""
        with self._lock:
            self._conn = conn
            return not self.failed

    def commit(self) -> bool:
        """The decode's answer begins: from now on it is the client's. False if the prefill
        failed first (the connection was dropped: ask again without the KV)."""
        with self._lock:
            self._committed = not self.failed
            return self._committed

    def prefill_failed(self) -> bool:
        """Drop the decode request that waits for the KV; False once it is too late."""
        with self._lock:
            if self._committed:
                return False
            self.failed = True
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the reader blocked on the decode's answer wakes
            except OSError:
                pass
        return True


def _handler(router: Router):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args) -> None:
            log.debug(fmt, *args)

        def _reply(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, {"status": "ok"})
                return
            conn = router.decode.connect()  # /v1/models and the like: the decode answers
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                data = resp.read()
            except OSError as exc:
                self._reply(502, {"error": f"decode unreachable: {exc}"})
                return
            finally:
                conn.close()
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            if self.path not in ROUTES:
                self._reply(404, {"error": f"{self.path}: this router serves {', '.join(ROUTES)}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as exc:
                self._reply(400, {"error": f"bad request body: {exc}"})
                return
            headers = {"Content-Type": "application/json"}
            if self.headers.get("Authorization"):
                headers["Authorization"] = self.headers["Authorization"]
            tid, pre, dec = router.bodies(body)
            exchange = _Exchange()
            threading.Thread(target=router.run_prefill, args=(self.path, pre, headers, exchange), daemon=True).start()
            if self._forward(dec, headers, exchange) is None:
                return
            # The prefill failed while the decode waited for its KV: the same request, computed there.
            local = dict(body)
            local.pop("kv_transfer_params", None)
            self._forward(local, headers, None)

        def _forward(self, body: dict, headers: dict, exchange: _Exchange | None) -> bool | None:
            """Pass the decode's answer to ``body`` on to the client; None once it has been
            (or failed), False if ``exchange`` saw the prefill fail before it began."""
            tid = (body.get("kv_transfer_params") or {}).get("kvwire_transfer_id", "(computed by the decode)")
            conn = router.decode.connect()
            answered = False
            try:
                if exchange is not None:
                    conn.connect()  # a socket for prefill_failed to shut down from now on
                    if not exchange.waiting_on(conn):
                        return False
                conn.request("POST", self.path, json.dumps(body), headers)
                resp = conn.getresponse()
                chunk = resp.read1(65536)  # the answer's first bytes: after the KV, for a decode waiting on it
                if exchange is not None and not exchange.commit():
                    return False
                answered = True
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    chunk = resp.read1(65536)
                self.wfile.write(b"0\r\n\r\n")
            except (OSError, http.client.HTTPException) as exc:
                if exchange is not None and not exchange.commit():
                    return False  # dropped for the failed prefill
                log.warning("decode request %s failed: %s", tid, exc)
                if not answered:
                    try:
                        self._reply(502, {"error": f"the decode request failed: {exc}"})
                    except OSError:
                        pass  # the client left too
                self.close_connection = True
            finally:
                conn.close()
            return None

    return Handler


def serve(router: Router, host: str, port: int) -> ThreadingHTTPServer:
    """Start the router's HTTP server (call ``serve_forever`` on it, or ``shutdown``)."""
    server = ThreadingHTTPServer((host, port), _handler(router))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvwire.integrations.vllm.proxy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (8000)")
    parser.add_argument("--prefill", required=True, help="the prefill vLLM server, e.g. http://prefill-host:8100")
    parser.add_argument("--decode", required=True, help="the decode vLLM server, e.g. http://decode-host:8200")
    parser.add_argument("--decode-kvwire", required=True, metavar="HOST:PORT",
                        help="the decode's kvwire address (its kv_connector_extra_config 'listen', as the prefill "
                        "reaches it)")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        router = Router(args.prefill, args.decode, args.decode_kvwire)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    server = serve(router, args.host, args.port)
    log.info("routing %s on %s:%d: prefill %s, decode %s (kvwire %s)", ", ".join(ROUTES), args.host, args.port,
             args.prefill, args.decode, args.decode_kvwire)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
