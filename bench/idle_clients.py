#!/usr/bin/env python3
"""Idle keep-alive clients for bench/idle.sh (Python standard library only).

Opens COUNT connections to one HTTP/1.1 server, sends one keep-alive
`GET PATH` on each and reads its whole response (Content-Length framing),
which must be `200` with the expected body; then holds every connection open
and idle until its standard input closes (or SIGTERM/SIGINT, or --max-hold
seconds), so that the server's memory can be read meanwhile. At most WINDOW
connections are being opened at once, so the listen backlog is not overrun
and the server opens few connections of its own to its upstream; a refused or
reset connection attempt is retried with a backoff.

What it prints on standard output, one `key: value` a line:

    requested: 10000
    opened: 10000           # answered 200 with the body, now idle
    failed: 0
    failure: REASON: COUNT  # one line per kind of failure, if any
    open_seconds: 3.21
    READY                   # everything is open and idle: measure now
    still_open: 10000       # after the release: not closed by the server
    closed_by_server: 0
    written_to: 0           # sent something while idle (none should)
    held_seconds: 6.05

It exits 0 when every connection was opened and was still open and idle at
the end.
"""

import argparse
import collections
import errno
import heapq
import resource
import selectors
import signal
import socket
import sys
import time

# A connection attempt that failed this way is tried again, after a backoff.
RETRIED = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EAGAIN, errno.ETIMEDOUT, errno.EADDRNOTAVAIL}
ATTEMPTS = 8
FIRST_BACKOFF = 0.05
LAST_BACKOFF = 1.0


class Failed(Exception):
    """A connection that will not become an idle one, with the reason."""


class Retry(Failed):
    """A connection attempt to make again (up to ATTEMPTS in all)."""


def connect_error(err):
    return (Retry if err in RETRIED else Failed)(f"connect: {errno.errorcode.get(err, err)}")


class Connection:
    """One client connection, from the connect to the end of its response."""

    def __init__(self, address, request, timeout, attempt):
        self.request = memoryview(request)
        self.attempt = attempt
        self.deadline = time.monotonic() + timeout
        self.response = bytearray()
        self.head_end = None
        self.length = None
        self.connected = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        err = self.sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            self.sock.close()
            raise connect_error(err)

    def on_writable(self):
        """The connect finished (or failed); sends what is left of the request."""
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise connect_error(err)
            self.connected = True
        try:
            sent = self.sock.send(self.request)
        except BlockingIOError:
            return
        except OSError as e:
            raise Failed(f"send: {errno.errorcode.get(e.errno, e)}") from None
        self.request = self.request[sent:]

    def on_readable(self, expected_body):
        """Reads; True once the whole response is in and is the one expected."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as e:
            raise Failed(f"recv: {errno.errorcode.get(e.errno, e)}") from None
        if not data:
            raise Failed("closed by the server before the whole response")
        self.response += data
        if self.head_end is None:
            end = self.response.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head_end = end + 4
            self.length = self.parse_head(bytes(self.response[:end]))
        received = len(self.response) - self.head_end
        if received < self.length:
            return False
        if received > self.length:
            raise Failed("bytes after the response")
        if self.response[self.head_end:] != expected_body:
            raise Failed("another body than the expected one")
        return True

    def parse_head(self, head):
        """The body's length; fails on anything but a kept-alive 200."""
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[0] != "HTTP/1.1":
            raise Failed(f"not an HTTP/1.1 status line: {lines[0][:40]!r}")
        if status[1] != "200":
            raise Failed(f"status {' '.join(status[1:])}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "close" in headers.get("connection", "").lower():
            raise Failed("Connection: close in the response")
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise Failed(f"no usable Content-Length in the response ({length!r})")
        return int(length)


def open_all(args, request, expected_body):
    """Opens the connections; returns the idle sockets and the failures."""
    address = (args.host, args.port)
    sel = selectors.DefaultSelector()
    idle = []
    failures = collections.Counter()
    retries = []  # (when, attempt): a heap
    to_start = args.count

    def drop(conn, error):
        sel.unregister(conn.sock)
        conn.sock.close()
        settle(conn.attempt, error)

    def settle(attempt, error):
        """A failure, or one more attempt after a backoff."""
        if not isinstance(error, Retry):
            failures[str(error)] += 1
        elif attempt + 1 >= ATTEMPTS:
            failures[f"{error} ({ATTEMPTS} attempts)"] += 1
        else:
            backoff = min(LAST_BACKOFF, FIRST_BACKOFF * 2**attempt)
            heapq.heappush(retries, (time.monotonic() + backoff, attempt + 1))

    while to_start or retries or sel.get_map():
        now = time.monotonic()
        while len(sel.get_map()) < args.window and (to_start or (retries and retries[0][0] <= now)):
            if retries and retries[0][0] <= now:
                attempt = heapq.heappop(retries)[1]
            else:
                attempt = 0
                to_start -= 1
            try:
                conn = Connection(address, request, args.timeout, attempt)
            except Failed as e:
                settle(attempt, e)
                continue
            sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        for key, mask in sel.select(timeout=0.05 if retries else 0.5):
            conn = key.data
            try:
                if mask & selectors.EVENT_WRITE:
                    conn.on_writable()
                    if not conn.request:
                        sel.modify(conn.sock, selectors.EVENT_READ, conn)
                elif conn.on_readable(expected_body):
                    sel.unregister(conn.sock)
                    idle.append(conn.sock)
            except Failed as e:
                drop(conn, e)
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            conn = key.data
            if now < conn.deadline:
                continue
            if conn.connected:
                drop(conn, Failed(f"no whole response within {args.timeout:g} s"))
            else:
                drop(conn, Retry("connect timed out"))
    sel.close()
    return idle, failures


def hold(max_hold):
    """Returns when standard input closes, on SIGTERM/SIGINT, or after max_hold s."""
    released = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: released.append(True))
    sel = selectors.SelectSelector()  # (epoll refuses a file or /dev/null as stdin)
    stdin = sys.stdin.buffer.raw
    sel.register(stdin, selectors.EVENT_READ)
    end = time.monotonic() + max_hold
    while not released and time.monotonic() < end:
        if sel.select(timeout=0.2) and not stdin.read(4096):
            break
    sel.close()


def not_idle(socks):
    """How many of the idle sockets the server has closed (or reset), and how
    many it has written to (which it does not do to an idle client)."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    closed = written = 0
    for key, _ in sel.select(timeout=0):
        try:
            data = key.fileobj.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if data:
            written += 1
        else:
            closed += 1
    sel.close()
    return closed, written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True, help="connections to open and hold")
    parser.add_argument("--window", type=int, default=50, help="connections being opened at once (50)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--expect", default="Hello World!", help="the body of every response")
    parser.add_argument("--timeout", type=float, default=10, help="seconds for a connect and its response (10)")
    parser.add_argument("--max-hold", type=float, default=600, help="seconds held at most (600)")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.count + 64
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            sys.exit(f"idle_clients.py: open-file limit {hard} is too low for {args.count} connections (ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
        "User-Agent: bench-idle-clients\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    started = time.monotonic()
    idle, failures = open_all(args, request, args.expect.encode())
    print(f"requested: {args.count}")
    print(f"opened: {len(idle)}")
    print(f"failed: {sum(failures.values())}")
    for reason, count in failures.most_common():
        print(f"failure: {reason}: {count}")
    print(f"open_seconds: {time.monotonic() - started:.2f}")
    print("READY", flush=True)

    held_from = time.monotonic()
    hold(args.max_hold)
    closed, written = not_idle(idle)
    print(f"still_open: {len(idle) - closed}")
    print(f"closed_by_server: {closed}")
    print(f"written_to: {written}")
    print(f"held_seconds: {time.monotonic() - held_from:.2f}", flush=True)
    for sock in idle:
        sock.close()
    return 0 if not failures and not closed and not written else 1


if __name__ == "__main__":
    sys.exit(main())
