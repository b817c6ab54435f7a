"""The step channel of shared-memory workers (and of server shards on their node): one Unix socket each.

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

Who may connect. On Linux the listening socket is in the abstract namespace:
no file permissions apply and its name is readable by every local user in
/proc/net/unix. So the channel admits only this run's workers: the peer's
credentials (SO_PEERCRED) must be this process's user, and its hello must carry
the secret the server handed that rank, with its `serve` call, for this session
(a fresh one per session, compared in constant time). Anything else is logged,
closed and never counted as a worker. The listener is closed once every worker
it waited for has connected, so between sessions nothing listens at all. A
worker checks the server's credentials the same way before it sends anything.

`serve` is the serving end's loop and `Sessions` the server's end of a set of them: the
shared-memory transport's workers, by rank, and (shards.py) the server shards on its node,
by index, which take their updates over the same kind of channel.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import select
import socket
import struct
import sys
import tempfile
import time
import uuid

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
HELLO_TIMEOUT_S = 2.0  # a connection that says nothing this long is dropped (it cannot stall the server)
HELLO_BYTES = 1024  # and one that announces a longer hello is dropped unread


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process at the other end of a Unix socket; None where the system cannot say."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def _another_user(creds: tuple[int, int] | None) -> bool:
    return creds is not None and creds[1] != os.geteuid()


class Refused(ConnectionError):
    """A connection that is not one of this run's workers (or a server of another user)."""


class ChannelClosed(ConnectionError):
    """The other end went away (its process exited, or it closed the socket)."""


class ChannelTimeout(TimeoutError):
    """No message before the deadline."""


class Channel:
    """A connected socket carrying length-prefixed JSON messages.

    The socket is non-blocking and the channel keeps what it has read past a message: a
    message that has arrived costs one `recv`, and waiting for one a `poll` more (where a
    blocking socket with a timeout would set the timeout, poll and read twice per message).
    """

    _READ = 1 << 16  # bytes asked of each read: a step's messages are a few hundred

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)
        self._buf = bytearray()  # bytes read and not yet returned as a message
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def send(self, message: dict) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode()
        data = memoryview(_HEADER.pack(len(payload)) + payload)
        while data:
            try:
                data = data[self.sock.send(data):]
            except BlockingIOError:  # the peer's buffer is full: wait until it reads
                writable = select.poll()
                writable.register(self.sock, select.POLLOUT)
                writable.poll()
            except OSError as e:  # broken pipe, reset: the peer is gone
                raise ChannelClosed(str(e)) from None

    def recv(self, deadline: float | None = None, limit: int | None = None) -> dict:
        """The next message; ChannelClosed at end of file, ChannelTimeout past `deadline`
        (a time.monotonic() value; None waits for ever), ValueError for one over `limit` bytes."""
        buf = self._buf
        while len(buf) < _HEADER.size:
            self._fill(deadline)
        (n,) = _HEADER.unpack_from(buf)
        if limit is not None and n > limit:
            raise ValueError(f"a message of {n} bytes, more than {limit}")
        end = _HEADER.size + n
        while len(buf) < end:
            self._fill(deadline)
        message = json.loads(buf[_HEADER.size:end])
        del buf[:end]
        return message

    def _fill(self, deadline: float | None) -> None:
        """Add what the socket holds to the buffer, waiting for it until `deadline`."""
        while True:
            try:
                chunk = self.sock.recv(self._READ)
            except BlockingIOError:  # nothing yet: wait for it (a poll that times out ends past the deadline)
                timeout = None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ChannelTimeout("no message before the deadline") from None
                    timeout = math.ceil(left * 1000)
                self._poll.poll(timeout)
                continue
            except OSError as e:
                raise ChannelClosed(str(e)) from None
            if not chunk:
                raise ChannelClosed("end of file")
            self._buf += chunk
            return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Listener:
    """The server's end: a listening socket whose address workers connect to.

    On Linux the address is in the abstract namespace (no file, nothing to clean up
    after a crash); elsewhere it is a path in a folder of the temporary directory
    that only this user can enter. `expect(rank)` gives the secret rank's worker
    must say in its hello; `accept` admits only such workers (the module's docstring).
    """

    def __init__(self, tag: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"dptrain-{tag}-ctl-{uuid.uuid4().hex[:12]}"
        if sys.platform.startswith("linux"):
            self.address, self._path = "\0" + name, None
        else:
            folder = tempfile.mkdtemp(prefix="dptrain-ctl-")  # mode 0700
            self.address = self._path = os.path.join(folder, "sock")
        self.sock.bind(self.address)
        self.sock.listen(64)
        self._secrets: dict = {}  # rank -> the secret its hello must carry (one connection each)
        self.refused = 0

    def expect(self, rank: int) -> str:
        """A new secret for worker `rank`'s next hello (one connection; it replaces an older one)."""
        self._secrets[rank] = secrets.token_hex(16)
        return self._secrets[rank]

    def accept(self, timeout: float) -> tuple[Channel, int]:
        """The next expected worker to connect and its rank; ChannelTimeout if none in `timeout` s.
        Connections that are not an expected worker's are refused (logged, closed) meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout("no worker connected")
            self.sock.settimeout(left)
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                raise ChannelTimeout("no worker connected") from None
            chan = Channel(conn)
            try:
                return chan, self._admit(chan)
            except Refused as e:
                self.refused += 1
                log.warning("control channel: refused a connection (%s)", e)
                chan.close()

    def _admit(self, chan: Channel) -> int:
        creds = peer_credentials(chan.sock)
        who = "" if creds is None else f"pid {creds[0]}, uid {creds[1]}"
        if _another_user(creds):
            raise Refused(f"{who}: another user than this run's")
        try:
            hello = chan.recv(time.monotonic() + HELLO_TIMEOUT_S, limit=HELLO_BYTES)
        except ChannelTimeout:
            raise Refused(f"{who}: no hello within {HELLO_TIMEOUT_S:g} s") from None
        except (ChannelClosed, ValueError, UnicodeDecodeError):
            raise Refused(f"{who}: no valid hello") from None
        rank, secret = (hello.get("rank"), hello.get("secret")) if isinstance(hello, dict) else (None, None)
        expected = self._secrets.get(rank) if isinstance(rank, int) and not isinstance(rank, bool) else None
        if expected is None or not isinstance(secret, str) or not hmac.compare_digest(secret, expected):
            raise Refused(f"{who}: a hello without this session's secret for rank {rank!r}")
        del self._secrets[rank]
        return rank

    def close(self) -> None:
        self.sock.close()
        self._secrets = {}
        if self._path is not None:
            for remove in (os.unlink, os.rmdir):
                try:
                    remove(self._path if remove is os.unlink else os.path.dirname(self._path))
                except OSError:
                    pass


def connect(address: str, rank: int, secret: str) -> Channel:
    """The worker's end: a channel to the server listening at `address`, after its hello
    (`rank` and the session's `secret`). Refused if the listener is another user's process."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    creds = peer_credentials(sock)
    if _another_user(creds):
        sock.close()
        raise Refused(f"the control channel at {address!r} is held by uid {creds[1]} (pid {creds[0]}), "
                      "not by this run's user")
    chan = Channel(sock)
    chan.send({"rank": rank, "secret": secret})
    return chan


def serve(address: str, rank: int, secret: str, handle) -> int:
    """The serving end of a session: connect to `address` as `rank` with the session's `secret`,
    then answer each request with `handle(request)` (a dict; an exception is answered with
    {"error": its message}) until the server says {"op": "stop"} or goes away. How many were
    answered."""
    chan = connect(address, rank, secret)
    served = 0
    try:
        while True:
            request = chan.recv()
            if request.get("op") == "stop":
                return served
            try:
                reply = handle(request)
            except Exception as e:
                reply = {"error": str(e)}
            chan.send(reply)
            served += 1
    except ChannelClosed:  # the server is gone (killed, or replaced)
        return served
    finally:
        chan.close()


class Sessions:
    """The server's ends of sessions with actors, by key (a worker's rank, a shard's index).

    A session is an ordinary Ray call, `start(actor, address, secret)`, that stays running while
    the actor answers requests over its channel (`serve` above); meanwhile the actor takes no
    other Ray call, so `close` ends every session before the server asks anything else of them.
    `open` starts the missing ones over a listener that lives only while they connect. The
    failures are the caller's vocabulary: `lost(key, step, cause)` makes the exception for an
    actor that died, hung (it is killed: it must not come back stale) or closed its channel,
    and `failed(key, step, message)` the one for a serve call that raised."""

    def __init__(self, tag: str, timeout: float, lost, failed):
        self.tag, self.timeout, self.lost, self.failed = tag, timeout, lost, failed
        self.actors: dict = {}  # key -> actor handle, of the sessions opened
        self._open: dict = {}  # key -> (Channel, ObjectRef of its serve call)

    def __contains__(self, key) -> bool:
        return key in self._open

    def keys(self) -> list:
        return sorted(self._open)

    def channel(self, key) -> Channel:
        return self._open[key][0]

    def open(self, actors: dict, start, step: int) -> None:
        """A session with every actor of `actors` (key -> handle) that has none."""
        import ray
        self.actors.update(actors)
        todo = [key for key in actors if key not in self._open]
        if not todo:
            return
        # A listener for this round of sessions only, closed once they are open: between rounds
        # nothing listens, and each round's secrets are new (the module's docstring: who may connect).
        listener = Listener(self.tag)
        try:
            refs = {key: start(actors[key], listener.address, listener.expect(key)) for key in todo}
            deadline = time.monotonic() + self.timeout
            while refs:
                try:  # short waits: an actor that died instead of connecting shows up between them
                    chan, key = listener.accept(min(0.5, max(deadline - time.monotonic(), 0.01)))
                except ChannelTimeout:
                    done, _ = ray.wait(list(refs.values()), num_returns=1, timeout=0)
                    if done:
                        key = next(k for k, ref in refs.items() if ref == done[0])
                        self._open[key] = (None, refs.pop(key))
                        self._closed(key, step)
                    if time.monotonic() > deadline:
                        raise self._hung(sorted(refs), step, "did not connect")
                    continue
                self._open[key] = (chan, refs.pop(key))
        finally:
            listener.close()

    def send(self, key, message: dict, step: int) -> None:
        try:
            self._open[key][0].send(message)
        except ChannelClosed:
            self._closed(key, step)

    def reply(self, key, step: int, deadline: float) -> dict:
        """Actor `key`'s answer (an {"error": ...} one included); `lost` if it dies or misses `deadline`."""
        chan, _ = self._open[key]
        try:
            reply = chan.recv(deadline)
        except ChannelTimeout:
            self.drop(key, stop=False)
            raise self._hung([key], step) from None
        except ChannelClosed:
            self._closed(key, step)
        return reply

    def drop(self, key, stop: bool) -> None:
        """End `key`'s session (telling the actor to stop serving, if `stop`)."""
        chan, _ = self._open.pop(key, (None, None))
        if chan is not None:
            if stop:
                try:
                    chan.send({"op": "stop"})
                except ChannelClosed:
                    pass
            chan.close()

    def close(self) -> None:
        """End every session: the actors take Ray calls again."""
        for key in list(self._open):
            self.drop(key, stop=True)

    def _hung(self, keys: list, step: int, what: str = "no answer") -> BaseException:
        from ..errors import kill_hung
        return kill_hung(self.actors, keys, lambda key, cause: self.lost(key, step, cause),
                         f"{what} within {self.timeout:g} s")

    def _closed(self, key, step: int):
        """A channel closed under us: `failed` if the actor's serve call raised, else `lost`."""
        import ray
        from ..errors import is_timeout, lost_cause, unwrap
        chan, ref = self._open.pop(key)
        if chan is not None:
            chan.close()
        try:
            ray.get(ref, timeout=10)
        except Exception as e:
            if not is_timeout(e):
                cause = lost_cause(e)
                if cause is not None:
                    raise self.lost(key, step, cause) from None
                raise self.failed(key, step, str(unwrap(e))) from None
            ray.kill(self.actors[key])
        raise self.lost(key, step, "its control channel closed")
