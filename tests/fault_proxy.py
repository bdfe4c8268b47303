"""A fault-injecting HTTP proxy for the storage-fault tests (test_store_faults.py).

It listens on 127.0.0.1 in front of a real S3 endpoint (the moto server) and passes requests
through unchanged until the test commands a fault; each fault can wait for `after` more requests
to pass first (to hit the middle of an operation, e.g. the download after a manifest read):

- `drop_after(k)`: k requests pass, every later one is read and then reset (TCP RST);
- `slowdown(after)`: requests are answered `503 Slow Down` with S3's `SlowDown` XML error;
- `stall(after)`: requests are read and never answered, so the client hits its read timeout;
- `blackhole(after)`: connects never complete (see `_BlackHole` for how, on Linux) and open
  connections are closed, as if the path to the store had gone dark;
- `clear()`: back to passing everything.

It counts what reached it so a test can assert the exact number of attempts the client made:
`requests` (request heads read, passed or faulted; `seen` lists them) and `syn_drops`
(connection attempts dropped while black-holed). Stdlib only: a thread per client connection
reads its requests one by one (to count and fault them), and a second thread pipes the
upstream's answers back byte for byte (keep-alive included), so a passed request is exactly
what moto would have seen and answered.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message>'
                 b'<RequestId>fault-proxy</RequestId><HostId>fault-proxy</HostId></Error>')


def _listen_overflows() -> int:
    """The kernel's count of SYNs dropped because a listen queue was full (in this network
    namespace; readable without privileges, unlike a packet capture)."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    return int(rows[1][rows[0].index("ListenOverflows")])


def _close(sock: socket.socket, reset: bool = False) -> None:
    """Close; with `reset`, by a TCP RST instead of a FIN (what a crashed proxy or load
    balancer sends)."""
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)  # also wakes a thread blocked in recv() on it
    except OSError:
        pass
    sock.close()


class _BlackHole:
    """A listening socket on the proxy's port whose connects never complete.

    Why this works on Linux: a listener whose accept queue is full drops incoming SYNs without
    an answer (net/ipv4 tcp_conn_request: `sk_acceptq_is_full` -> drop, counted in the
    ListenOverflows counter of /proc/net/netstat). The client sees no SYN-ACK and no RST, only
    silence until its connect timeout: what a firewall DROP rule or a dead host looks like.
    `listen(0)` leaves room for one queued connection, so one filler connection that is never
    accepted fills it. (A port nobody listens on answers RST at once: "connection refused", not
    a black hole; an iptables DROP rule would need root.) Each dropped SYN bumps the kernel
    counter, which is how attempts are counted; with a client connect timeout under Linux's
    1 s initial SYN retransmission timeout, one connection attempt sends exactly one SYN.
    """

    def __init__(self, port: int):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(0)
        self.filler = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.overflows_at_start = _listen_overflows()

    def dropped(self) -> int:
        return _listen_overflows() - self.overflows_at_start

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


class FaultProxy:
    def __init__(self, upstream: str):
        """`upstream`: "http://127.0.0.1:PORT" of the real endpoint."""
        host, port = upstream.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.upstream = (host, int(port))
        self._lock = threading.RLock()
        self._mode: str | None = None  # None (pass), "drop", "slowdown", "stall", "blackhole"
        self._passes_left = 0
        self._conns: set[socket.socket] = set()  # open client and upstream sockets
        self._blackhole: _BlackHole | None = None
        self._syn_drops_before = 0  # dropped SYNs of earlier black holes since reset_counts()
        self.requests = 0
        self.seen: list[str] = []  # "seconds action METHOD /path" per request
        self._t0 = time.monotonic()
        self._listener: socket.socket | None = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._acceptor = self._start_acceptor()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- commands ----------------------------------------------------------------------------
    def drop_after(self, k: int) -> None:
        self._arm("drop", k)

    def slowdown(self, after: int = 0) -> None:
        self._arm("slowdown", after)

    def stall(self, after: int = 0) -> None:
        self._arm("stall", after)

    def blackhole(self, after: int = 0) -> None:
        self._arm("blackhole", after)
        if after == 0:
            self._go_dark()

    def clear(self) -> None:
        """Pass everything again; stalled connections are closed (their clients gave up)."""
        with self._lock:
            self._mode = None
            if self._blackhole is not None:
                self._syn_drops_before += self._blackhole.dropped()
                self._blackhole.close()
                self._blackhole = None
                self._listener = self._listen(self.port)
                self._acceptor = self._start_acceptor()
        self._close_connections()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.seen = []
            self._syn_drops_before = 0
            if self._blackhole is not None:
                self._blackhole.overflows_at_start = _listen_overflows()

    @property
    def syn_drops(self) -> int:
        """Connection attempts dropped while black-holed since reset_counts()."""
        with self._lock:
            return self._syn_drops_before + (self._blackhole.dropped() if self._blackhole
                                             else 0)

    def close(self) -> None:
        with self._lock:
            self._mode = None
            if self._blackhole is not None:
                self._blackhole.close()
                self._blackhole = None
            listener, self._listener = self._listener, None
        if listener is not None:
            self._stop(listener)
        self._close_connections()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- machinery ---------------------------------------------------------------------------
    def _arm(self, mode: str, after: int) -> None:
        with self._lock:
            self._mode, self._passes_left = mode, after

    def _go_dark(self) -> None:
        """Swap the listener for a black hole first, then close every open connection, so a
        client that reconnects at once already meets the black hole (not a refused port)."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is None:  # already dark
            return
        self._stop(listener)  # outside the lock: the acceptor may be waiting for it
        with self._lock:
            self._blackhole = _BlackHole(self.port)
        self._close_connections()

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s

    def _stop(self, listener: socket.socket) -> None:
        # shutdown() wakes the accept() blocked in the acceptor thread (on Linux, close()
        # alone does not), so the port is free to bind again once join() returns.
        _close(listener)
        if self._acceptor is not threading.current_thread():
            self._acceptor.join()

    def _start_acceptor(self) -> threading.Thread:
        t = threading.Thread(target=self._accept_loop, args=(self._listener,), daemon=True)
        t.start()
        return t

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # the listener was closed: blackhole(), close()
                return
            with self._lock:
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _track(self, sock: socket.socket, keep: bool) -> None:
        with self._lock:
            (self._conns.add if keep else self._conns.discard)(sock)

    def _close_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, set()
        for s in conns:
            _close(s)

    def _decide(self, head: bytes) -> str:
        """Count one request and say what to do with it: pass, drop, slowdown, stall or
        blackhole."""
        with self._lock:
            self.requests += 1
            action = self._mode or "pass"
            if self._passes_left > 0:
                self._passes_left -= 1
                action = "pass"
            line = head.split(b"\r\n", 1)[0].rsplit(b" HTTP/", 1)[0].decode("latin-1")
            self.seen.append(f"{time.monotonic() - self._t0:.2f} {action} {line}")
            return action

    def _serve(self, client: socket.socket) -> None:
        reader = _Reader(client)
        upstream: socket.socket | None = None
        try:
            while (head := reader.head()) is not None:
                action = self._decide(head)
                if action == "pass":
                    if upstream is None:
                        upstream = socket.create_connection(self.upstream)
                        self._track(upstream, True)
                        threading.Thread(target=_pipe, args=(upstream, client),
                                         daemon=True).start()
                    upstream.sendall(head)
                    for chunk in reader.body(head):
                        upstream.sendall(chunk)
                    continue
                if action == "blackhole":  # the path goes dark under this request
                    self._go_dark()
                    return
                if b"\r\nexpect: 100-continue" not in head.lower():
                    for _ in reader.body(head):  # take the whole request before answering
                        pass
                if action == "drop":
                    _close(client, reset=True)
                    return
                if action == "slowdown":  # S3's answer; a HEAD's answer carries no body
                    body = b"" if head.startswith(b"HEAD ") else SLOWDOWN_BODY
                    client.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                                   % (len(SLOWDOWN_BODY), body))
                    return
                while client.recv(65536):  # stall: never answer, until the client gives up
                    pass
                return
        except OSError:
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    self._track(s, False)
                    s.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy the upstream's answers to the client until either side closes."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class _Reader:
    """Reads HTTP/1.1 requests off a socket: the head, then the body by its framing
    (Content-Length or chunked), so requests on a kept-alive connection are told apart."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the client closed the connection mid-request")
        self.buf += data

    def head(self) -> bytes | None:
        """The next request's head, None when the client closed the connection between
        requests."""
        while b"\r\n\r\n" not in self.buf:
            try:
                self._fill()
            except ConnectionError:
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        return head

    def _take(self, n: int):
        while n > 0:
            if not self.buf:
                self._fill()
            chunk, self.buf = self.buf[:n], self.buf[n:]
            n -= len(chunk)
            yield chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        line, self.buf = self.buf[:end], self.buf[end:]
        return line

    def body(self, head: bytes):
        headers = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                line = self._line()
                yield line
                if int(line.split(b";")[0], 16) == 0:  # last chunk: trailers, empty line
                    while (line := self._line()) != b"\r\n":
                        yield line
                    yield line
                    return
                yield from self._take(int(line.split(b";")[0], 16) + 2)
        else:
            yield from self._take(int(headers.get("content-length") or 0))
