"""A real S3 API for tests: moto's server on 127.0.0.1, and a fault-injecting HTTP proxy in
front of it (moto keeps buckets in memory, so faults come from the proxy, never from
restarting moto).

The proxy forwards each request to moto unchanged unless a fault is armed for it. Faults are
counted down per matching request, so every request loop is bounded:
    proxy.arm("reset", 3, match="train-")    # the next 3 matching requests: TCP reset
    proxy.arm("503", 2)                      # the next 2: 503 SlowDown
    proxy.arm("stall", 1, seconds=5)         # the next one: no answer for 5 s, then close
    proxy.arm("403", 10**9, match="secret/") # permanent: AccessDenied
"""
from __future__ import annotations

import socket
import struct
import threading
import time

from cluster.bench.http_proxy import ForwardingProxy

BUCKET = "raymoe-test"
KEY_ID, SECRET = "raymoe-test-key", "raymoe-test-secret-5f3a9c"  # fake; the tests grep runs for it

_ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
           "403": (403, "AccessDenied", "Access Denied")}


class FaultProxy(ForwardingProxy):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._faults: list[dict] = []
        self._lock = threading.Lock()
        self.injected: dict[str, int] = {}
        super().__init__(upstream_port, before=self._maybe_fault)

    def _maybe_fault(self, handler) -> bool:
        fault = self._take(handler.command, handler.path)
        if fault is None:
            return False
        _inject(handler, fault)
        return True

    def arm(self, kind: str, count: int, match: str = "", method: str = "", seconds: float = 0.0) -> None:
        with self._lock:
            self._faults.append({"kind": kind, "left": count, "match": match, "method": method, "seconds": seconds})

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
            self.injected.clear()

    def _take(self, method: str, path: str) -> dict | None:
        with self._lock:
            for f in self._faults:
                if f["left"] > 0 and f["match"] in path and (not f["method"] or f["method"] == method):
                    f["left"] -= 1
                    self.injected[f["kind"]] = self.injected.get(f["kind"], 0) + 1
                    return f
        return None


def _inject(handler, fault: dict) -> None:
    kind = fault["kind"]
    if kind == "reset":
        # Part of a response, then RST (SO_LINGER 0): a connection dropped mid-transfer.
        # (A reset before any byte of the answer is retried silently by the SDK on a
        # reused connection, so the client would never see it.)
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nPAR1")
        handler.wfile.flush()
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        handler.connection.close()
        return
    if kind == "stall":
        time.sleep(fault["seconds"])
        handler.close_connection = True
        return
    status, code, message = _ERRORS[kind]
    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}"
           f"</Message></Error>").encode()
    handler.send_response_only(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", "0" if handler.command == "HEAD" else str(len(xml)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(xml)


class S3Server:
    """moto on 127.0.0.1 (an ephemeral port) with one bucket, and a FaultProxy in front."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.moto.start()
        _, self.port = self.moto.get_host_and_port()
        self.proxy = FaultProxy(self.port)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                    "AWS_ENDPOINT_URL": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http", region="us-east-1",
                          allow_bucket_creation=True, access_key=KEY_ID, secret_key=SECRET).create_dir(BUCKET)

    def close(self) -> None:
        self.proxy.close()
        self.moto.stop()
