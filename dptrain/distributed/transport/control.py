"""The step channel of shared-memory workers: one Unix socket per worker.

Workers on the server's node already read parameters and write gradients in
shared memory (shm.py); what is left of a step's communication is "compute
step k" and a small dict of metrics back. As a Ray actor call that costs about
1.2 ms per step with one worker and 2 ms with two on a 2-core machine (the
`dptrain scale` floors); as a message over a Unix socket, tens of microseconds.

A session: the server listens, calls each worker's `serve` once (an ordinary
Ray call that stays running), the worker connects and says its rank, then
loops over requests until the server says stop or goes away. A worker that
dies closes its socket (the server sees end-of-file at once); one that hangs
misses the deadline of `recv`. Messages are JSON behind a 4-byte length: only
numbers, strings and booleans cross, and nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile
import time
import uuid

_HEADER = struct.Struct("!I")


class ChannelClosed(ConnectionError):
    """The other end went away (its process exited, or it closed the socket)."""


class ChannelTimeout(TimeoutError):
    """No message before the deadline."""


class Channel:
    """A connected socket carrying length-prefixed JSON messages."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, message: dict) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_HEADER.pack(len(payload)) + payload)
        except OSError as e:  # broken pipe, reset: the peer is gone
            raise ChannelClosed(str(e)) from None

    def recv(self, deadline: float | None = None) -> dict:
        """The next message; ChannelClosed at end of file, ChannelTimeout past `deadline`
        (a time.monotonic() value; None waits for ever)."""
        (n,) = _HEADER.unpack(self._read(_HEADER.size, deadline))
        return json.loads(self._read(n, deadline))

    def _read(self, n: int, deadline: float | None) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChannelTimeout("no message before the deadline")
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                k = self.sock.recv_into(view[got:])
            except socket.timeout:
                raise ChannelTimeout("no message before the deadline") from None
            except OSError as e:
                raise ChannelClosed(str(e)) from None
            if k == 0:
                raise ChannelClosed("end of file")
            got += k
        return bytes(buf)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Listener:
    """The server's end: a listening socket whose address workers connect to.

    On Linux the address is in the abstract namespace (no file, nothing to clean up
    after a crash); elsewhere it is a path in the temporary directory.
    """

    def __init__(self, tag: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"dptrain-{tag}-ctl-{uuid.uuid4().hex[:12]}"
        if sys.platform.startswith("linux"):
            self.address, self._path = "\0" + name, None
        else:
            self.address = self._path = os.path.join(tempfile.gettempdir(), name)
        self.sock.bind(self.address)
        self.sock.listen(64)

    def accept(self, timeout: float) -> tuple[Channel, dict]:
        """The next worker to connect and its hello message; ChannelTimeout if none in `timeout` s."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except socket.timeout:
            raise ChannelTimeout("no worker connected") from None
        chan = Channel(conn)
        return chan, chan.recv(time.monotonic() + max(timeout, 1.0))

    def close(self) -> None:
        self.sock.close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass


def connect(address: str) -> Channel:
    """The worker's end: a channel to the server listening at `address`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    return Channel(sock)
