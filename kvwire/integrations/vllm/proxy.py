"""A small router for kvwire's vLLM connector: OpenAI-compatible completions in, forwarded
to one prefill and one decode vLLM server, in the pattern of vLLM's own toy proxy.

For every request it makes a transfer id and sends, concurrently,

* to the prefill: the same body with ``max_tokens: 1``, ``stream: false`` and
  ``kv_transfer_params = {"do_remote_decode": true, "kvwire_transfer_id": ID,
  "kvwire_peer": DECODE_KVWIRE}``;
* to the decode: the client's body with ``kv_transfer_params = {"do_remote_prefill":
  true, "kvwire_transfer_id": ID}``, whose answer (streamed or not) goes back to the client.

The prefill streams the KV to the decode layer by layer while it computes; the decode
waits for it, then generates. Standard library only: it runs where vLLM is not installed.

    python -m kvwire.integrations.vllm.proxy --port 8000 \\
        --prefill http://prefill-host:8100 --decode http://decode-host:8200 \\
        --decode-kvwire decode-host:7600
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
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

    def run_prefill(self, path: str, body: dict, headers: dict) -> None:
        conn = self.prefill.connect()
        try:
            conn.request("POST", path, json.dumps(body), headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                log.warning("prefill answered %d for %s", resp.status, body["kv_transfer_params"]["kvwire_transfer_id"])
        except OSError as exc:
            log.warning("prefill request failed: %s", exc)
        finally:
            conn.close()


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
            threading.Thread(target=router.run_prefill, args=(self.path, pre, headers), daemon=True).start()
            conn = router.decode.connect()
            try:
                conn.request("POST", self.path, json.dumps(dec), headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError as exc:
                log.warning("decode request %s failed: %s", tid, exc)
                self.close_connection = True
            finally:
                conn.close()

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
