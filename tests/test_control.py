"""The control channel of shared-memory workers (distributed/transport/control.py), without Ray."""

import json
import math
import os
import socket
import threading
import time

import numpy as np
import pytest

import dptrain as dp
from dptrain.distributed import ParameterServer, Worker
from dptrain.distributed.messages import Evaluate, Gradient, Request, SegmentSpec
from dptrain.distributed.transport import control
from dptrain.distributed.transport.shm import SharedArray
from dptrain.distributed.trainer import prepare_dataset
from dptrain.blocks import prepare


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return control.Channel(a), control.Channel(b)


def test_messages_round_trip_exactly():
    a, b = _pair()
    msg = {"op": "step", "step": 7, "loss_sum": 0.1 + 0.2, "finite": False, "nan": float("nan"), "s": "é"}
    a.send(msg)
    got = b.recv(time.monotonic() + 5)
    assert got["loss_sum"] == 0.1 + 0.2 and math.isnan(got["nan"]) and got["s"] == "é" and got["finite"] is False
    big = {"x": "y" * 300_000}  # longer than one socket read
    t = threading.Thread(target=a.send, args=(big,))
    t.start()
    assert b.recv(time.monotonic() + 5) == big
    t.join()


def test_messages_that_share_a_read_or_are_split_across_reads_come_out_one_by_one():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chan = control.Channel(b)
    try:
        frames = [json.dumps({"step": k}).encode() for k in range(3)]
        wire = b"".join(control._HEADER.pack(len(f)) + f for f in frames)
        a.sendall(wire)  # three messages in one read
        assert [chan.recv(time.monotonic() + 5)["step"] for _ in range(3)] == [0, 1, 2]
        got = []
        t = threading.Thread(target=lambda: got.append(chan.recv(time.monotonic() + 5)))
        t.start()
        for piece in (wire[:2], wire[2:7], wire[7:len(frames[0]) + 4]):  # one message, a header split
            a.sendall(piece)
            time.sleep(0.02)
        t.join()
        assert got == [{"step": 0}]
    finally:
        a.close()
        chan.close()


def test_timeout_and_closed_peer_are_told_apart():
    a, b = _pair()
    t0 = time.monotonic()
    with pytest.raises(control.ChannelTimeout):
        b.recv(time.monotonic() + 0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    a.close()
    with pytest.raises(control.ChannelClosed):
        b.recv(time.monotonic() + 5)
    with pytest.raises(control.ChannelClosed):
        for _ in range(100):  # the first sends may land in the buffer before the reset shows
            b.send({"op": "stop"})


def test_listener_accepts_a_worker_and_reads_its_hello():
    listener = control.Listener("test")
    try:
        with pytest.raises(control.ChannelTimeout):
            listener.accept(0.05)
        chan = control.connect(listener.address, 3, listener.expect(3))
        server_end, rank = listener.accept(5)
        assert rank == 3 and listener.refused == 0
        server_end.send({"op": "stop"})
        assert chan.recv(time.monotonic() + 5) == {"op": "stop"}
    finally:
        listener.close()


def _raw_hello(address, payload: bytes):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    sock.sendall(payload)
    return sock


def test_only_the_sessions_secret_admits_a_worker(monkeypatch, caplog):
    """Same user, but not this session's worker: no secret, a wrong one, another rank's, the right
    one twice, an oversized or a silent hello. Each is refused and logged; the real worker gets in."""
    monkeypatch.setattr(control, "HELLO_TIMEOUT_S", 0.3)
    listener = control.Listener("test")
    try:
        secret = listener.expect(0)
        other = listener.expect(1)
        intruders = [_raw_hello(listener.address, control._HEADER.pack(len(p)) + p) for p in (
            b'{"rank": 0}', b'{"rank": 0, "secret": "00"}', ('{"rank": 0, "secret": "%s"}' % other).encode(),
            b'{"rank": true, "secret": "x"}', b"not json")]
        intruders.append(_raw_hello(listener.address, control._HEADER.pack(1 << 31)))  # never allocated
        intruders.append(_raw_hello(listener.address, b""))  # says nothing
        real = control.connect(listener.address, 0, secret)
        chan, rank = listener.accept(10)
        assert rank == 0 and listener.refused == len(intruders)
        assert caplog.text.count("refused a connection") == len(intruders)
        chan.send({"op": "stop"})
        assert real.recv(time.monotonic() + 5) == {"op": "stop"}
        replay = control.connect(listener.address, 0, secret)  # a secret admits one connection
        with pytest.raises(control.ChannelTimeout):
            listener.accept(1.0)
        assert listener.refused == len(intruders) + 1
        for sock in intruders:
            sock.close()
        replay.close()
    finally:
        listener.close()


def _as_nobody(code: str):
    """A Python child running `code` as user nobody (the tests run as root), with os, socket,
    struct, json and time imported."""
    import pwd
    import subprocess
    import sys
    try:
        nobody = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user nobody")
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process of another user")
    # everything imported before the privileges go: nobody may not read this Python's files
    prologue = f"import os, socket, struct, json, time\nos.setgid({nobody}); os.setuid({nobody})\n"
    return subprocess.Popen([sys.executable, "-c", prologue + code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_another_users_connection_is_refused_before_its_hello_is_read():
    listener = control.Listener("test")
    child = None
    try:
        secret = listener.expect(0)
        # even with the right secret (which such a user cannot know): it is another user
        child = _as_nobody(f"""
import socket, struct, json, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({listener.address!r})
p = json.dumps({{"rank": 0, "secret": {secret!r}}}).encode()
try:
    s.sendall(struct.pack("!I", len(p)) + p)
    print("closed" if s.recv(10) == b"" else "answered")
except (ConnectionResetError, BrokenPipeError):  # closed with our hello unread (or not yet sent)
    print("closed")
""")
        with pytest.raises(control.ChannelTimeout):
            listener.accept(3)
        out, err = child.communicate(timeout=10)
        assert out.strip() == "closed", err
        assert listener.refused == 1
        chan = control.connect(listener.address, 0, secret)  # the real worker still gets in
        assert listener.accept(5)[1] == 0
        chan.close()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        listener.close()


def test_a_worker_refuses_a_control_channel_of_another_user():
    name = f"dptrain-test-ctl-{os.getpid()}"
    child = _as_nobody(f"""
import socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({chr(0)!r} + {name!r}); s.listen(1)
print("listening", flush=True)
c, _ = s.accept()
print("hello" if c.recv(100) else "nothing", flush=True)
""")
    try:
        assert child.stdout.readline().strip() == "listening"
        with pytest.raises(control.Refused, match="held by uid"):
            control.connect("\0" + name, 0, "the secret")
        out, _ = child.communicate(timeout=10)
        assert out.strip() == "nothing"  # the worker sent nothing, its secret included
    finally:
        if child.poll() is None:
            child.kill()


@pytest.fixture
def served_worker():
    """A server and one shared-memory worker talking over a channel, as the trainer sets them up."""
    cfg = dp.TrainConfig(workers=1, dataset="moons", batch_size=50, steps=12, dtype="float64",
                         model=[2, 16, 16, 2], seed=1, momentum=0.9, lr=0.1)
    ds = prepare_dataset(dp.data.load_dataset("moons"), "float64")
    factory, loss = prepare(cfg, ds)
    ps = ParameterServer(cfg.to_dict(), factory, total_steps=12, steps_per_epoch=4, run_key="test")
    worker = Worker(cfg.to_dict(), factory, loss, ds, 0, 1)
    reference = Worker(cfg.to_dict(), factory, loss, ds, 0, 1)  # object-store style: gets the parameters passed
    flat = ps.get_weights()
    params = SharedArray.create(flat.size, flat.dtype, "test-params")  # as the transport sets it up
    ps.update.place(params.array, params.name)
    header = SharedArray.create(2, "int64", "test-pver")  # [sequence, version]
    header.array[:] = (0, 0)
    worker.use_shared_memory(SegmentSpec(params=params.name, header=header.name, size=flat.size, dtype=str(flat.dtype),
                                         tag="test"))
    worker.header = header.array  # the test plays the server's side of the seqlock
    listener = control.Listener("test")
    served = {}

    def start():
        secret = listener.expect(0)
        t = threading.Thread(target=lambda: served.setdefault("n", worker.serve(listener.address, secret)))
        t.start()
        chan, rank = listener.accept(5)
        assert rank == 0
        return chan, t

    yield ps, worker, reference, start, served
    worker.close()
    params.close()
    header.close()
    listener.close()


def _step(chan, ps, reference, step):
    chan.send({"op": "step", "step": step})
    reply = chan.recv(time.monotonic() + 30)
    want, grad = reference.compute(Request(step), ps.get_weights().copy())
    return reply, (grad, want["metrics"])


def test_served_steps_see_every_update_in_place(served_worker):
    """The served model reads the server's segment itself: every update shows in the next step,
    with nothing copied, and the model's parameters are read-only views of that segment."""
    ps, worker, reference, start, served = served_worker
    chan, thread = start()
    for step in range(4):
        reply, (grad, metrics) = _step(chan, ps, reference, step)
        assert reply["metrics"]["loss_sum"] == metrics["loss_sum"]
        np.testing.assert_array_equal(worker.replica.flat.grad, grad)  # the gradient lies in shared memory
        ps.apply(step, [Gradient([worker.replica.flat.grad], reply["meta"], reply["metrics"])])
    assert np.shares_memory(worker.replica.flat.data, worker.link.params.array)  # its mapping of the segment
    assert not worker.replica.model.parameters()[0].data.flags.writeable
    chan.send({"op": "evaluate", "split": "test", "part": 0, "of": 1})
    assert chan.recv(time.monotonic() + 30)["evaluation"] == reference.evaluate(Evaluate("test"), ps.get_weights().copy())
    chan.send({"op": "dance"})
    assert "unknown request 'dance'" in chan.recv(time.monotonic() + 5)["error"]
    chan.send({"op": "stop"})
    thread.join(5)
    assert served["n"] == 6


def test_a_task_computes_on_a_snapshot_and_a_step_in_place_again(served_worker):
    """A relaxed task copies a consistent snapshot (the server may update meanwhile); the next
    step reads the segment in place again, and a closed link leaves the model a copy."""
    ps, worker, reference, start, served = served_worker
    chan, thread = start()
    chan.send({"op": "task", "step": 0, "shard": 0, "of": 1})
    reply = chan.recv(time.monotonic() + 30)
    assert reply["metrics"]["version"] == 0
    assert not np.shares_memory(worker.replica.flat.data, worker.link.params.array)
    ps.apply(0, [Gradient([worker.replica.flat.grad], reply["meta"], reply["metrics"])])
    reply, (grad, metrics) = _step(chan, ps, reference, 1)  # on the updated parameters, in place
    assert reply["metrics"]["loss_sum"] == metrics["loss_sum"]
    assert np.shares_memory(worker.replica.flat.data, worker.link.params.array)
    chan.send({"op": "stop"})
    thread.join(5)
    current, mapped = ps.get_weights().copy(), worker.link.params.array
    worker.close()
    assert not np.shares_memory(worker.replica.flat.data, mapped)
    np.testing.assert_array_equal(worker.replica.flat.data, current)


def test_a_new_session_reads_restored_parameters(served_worker):
    """Parameters restored between sessions (a new server, a checkpoint) must not be read stale."""
    ps, worker, reference, start, served = served_worker
    chan, thread = start()
    reply, _ = _step(chan, ps, reference, 0)
    chan.send({"op": "stop"})
    thread.join(5)
    flat = ps.get_weights()
    flat[:] = np.random.default_rng(0).standard_normal(flat.size) * flat.astype(bool)
    chan, thread = start()  # this session computes on the segment's new values
    reply, (grad, metrics) = _step(chan, ps, reference, 0)
    assert reply["metrics"]["loss_sum"] == metrics["loss_sum"]
    chan.close()  # the server goes away: serve returns
    thread.join(5)
    assert not thread.is_alive()


def test_orphaned_segments_are_swept_and_live_ones_kept():
    """A killed run's segments (mapped by no process, older than a minute) are removed; segments a
    process maps, or that were made a moment ago, are kept."""
    import os
    import time
    from dptrain.distributed.transport import shm
    live = shm.SharedArray.create(10, np.float64, "sweeptest")
    orphan = shm.SharedArray.create(10, np.float64, "sweeptest")
    orphan.array = None
    orphan.shm.close()  # its owner is gone: nobody maps it
    young = shm.SharedArray.create(10, np.float64, "sweeptest")
    young.array = None
    young.shm.close()
    old = time.time() - 120
    for seg in (live, orphan):
        os.utime(f"/dev/shm/{seg.name}", (old, old))
    try:
        assert shm.sweep_orphans("dptrain-sweeptest") == [orphan.name]
        assert os.path.exists(f"/dev/shm/{live.name}") and os.path.exists(f"/dev/shm/{young.name}")
    finally:
        live.close()
        shm.unlink(young.name)
        shm.unlink(orphan.name)


def test_a_task_reads_one_version_even_during_an_update(served_worker):
    """Relaxed steps send tasks while the server may be updating: a worker's copy of the
    parameters waits out an update (odd sequence) and reports the version it got."""
    ps, worker, reference, start, served = served_worker
    chan, t = start()
    try:
        worker.header[0] = 1  # an update under way
        chan.send({"op": "task", "step": 3, "shard": 0, "of": 1})
        with pytest.raises(control.ChannelTimeout):  # it waits for the update to end
            chan.recv(time.monotonic() + 0.3)
        ps.get_weights()[...] *= 0.5  # the update's new parameters
        worker.header[1] = 7
        worker.header[0] = 2  # even: version 7 is whole
        reply = chan.recv(time.monotonic() + 30)
        assert reply["metrics"]["version"] == 7 and reply["metrics"]["step"] == 3
        reply_want, grad = reference.compute(Request(3), ps.get_weights().copy())
        metrics = reply_want["metrics"]
        np.testing.assert_array_equal(worker.link.grad.array, grad)  # computed on the new parameters
        assert metrics["loss_sum"] == reply["metrics"]["loss_sum"]
    finally:
        chan.send({"op": "stop"})
        t.join(10)
