"""A TCP proxy on 127.0.0.1 that resets a share of the S3 requests passing through it (transient faults).

Loopback only, bounded (at most `max_faults` resets, then it forwards everything) and it stops by itself
after `ttl_s` or when its context exits. Two kinds of fault, chosen at random per faulted request:
  - "request": the request is never forwarded; the client sees its connection reset;
  - "response": the request reaches the server (and takes effect), the response is replaced by a reset,
    so the client must retry a request that already happened (idempotence).
With `hold` (a regex on the bytes of a request), the first matching request is held, not forwarded, until
`release` is set: `held` is set meanwhile, so a test can act (kill the client, inspect the bucket) at exactly
that point of a run, e.g. after report.json is written and while manifest.json is being written.
"""
from __future__ import annotations

import random
import re
import select
import socket
import struct
import threading
import time
from contextlib import contextmanager
from typing import Iterator


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FlakyProxy:
    def __init__(self, upstream_port: int, rate: float = 0.15, max_faults: int = 40, seed: int = 0,
                 ttl_s: float = 600.0, skip_first: int = 0, hold: bytes | None = None):
        self.hold = re.compile(hold) if hold else None
        self.held, self.release = threading.Event(), threading.Event()
        self.upstream = ("127.0.0.1", upstream_port)
        self.rate, self.max_faults, self.ttl_s, self.skip_first = rate, max_faults, ttl_s, skip_first
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = {"request": 0, "response": 0}
        self.requests = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    @property
    def n_faults(self) -> int:
        return sum(self.faults.values())

    def _decide(self) -> str | None:
        """None (forward) or the kind of fault for the next client chunk (roughly: the next request)."""
        with self.lock:
            self.requests += 1
            if self.requests <= self.skip_first or self.n_faults >= self.max_faults:
                return None
            if self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(("request", "response"))
            self.faults[kind] += 1
            return kind

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        drop_next_response, graceful = False, False
        try:
            while not self.stopped.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:  # a side closed normally (e.g. the server's Connection: close): pass the FIN on,
                        graceful = True  # not a reset, which would discard a response the client has not read yet
                        return
                    if s is client:
                        if self.hold is not None and self.hold.search(data) and not self.release.is_set():
                            self.held.set()
                            while not (self.release.wait(0.1) or self.stopped.is_set()):
                                pass
                        kind = self._decide()
                        if kind == "request":
                            return  # finally: reset both sides, nothing forwarded
                        drop_next_response = drop_next_response or kind == "response"
                        upstream.sendall(data)
                    else:
                        if drop_next_response:
                            return  # the server answered; the client never hears it
                        client.sendall(data)
        except OSError:
            pass
        finally:
            client.close() if graceful else _reset(client)
            upstream.close()

    def _serve(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stopped.is_set() and time.monotonic() - self.t0 < self.ttl_s:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()
        self.listener.close()

    def start(self) -> "FlakyProxy":
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopped.set()


@contextmanager
def flaky_proxy(upstream_url: str, **kw) -> Iterator[FlakyProxy]:
    """A FlakyProxy in front of http://127.0.0.1:PORT; yields it (its URL: f"http://127.0.0.1:{p.port}")."""
    port = int(upstream_url.rsplit(":", 1)[1])
    p = FlakyProxy(port, **kw).start()
    try:
        yield p
    finally:
        p.stop()
