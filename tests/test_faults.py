"""Fault injection: every recovery ends with the parameters of the run without the fault."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dptrain as dp
from dptrain import checkpoint
from dptrain.distributed import TrainingError

pytestmark = [pytest.mark.ray, pytest.mark.fault]

BASE = dict(dataset="moons", batch_size=60, steps=24, dtype="float64", model=[2, 16, 16, 2], seed=5,
            log_every=4, optimizer="sgd", momentum=0.9, lr=0.1)


def _same(a, b):
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-10, atol=1e-13)


@pytest.fixture(scope="module")
def clean():
    return dp.train_local(dp.TrainConfig(workers=3, **BASE)).params


def test_worker_killed_mid_run_is_replaced(ray_local, clean, tmp_path):
    cfg = dp.TrainConfig(workers=3, out=str(tmp_path), **BASE)
    result = dp.Trainer(cfg, faults=[{"rank": 1, "step": 9, "kind": "exit"}]).fit()
    assert result.summary["failures_survived"] == 1
    assert [r["step"] for r in result.metrics["steps"]] == list(range(24))
    _same(result.params, clean)


def test_an_evaluation_cut_short_by_a_lost_worker_is_run_after_the_recovery(ray_local):
    """A worker dies inside the held-out evaluation after step 9 (--eval-every 5) and another inside
    the one that ends epoch 0 (step 16): the steps were done, their records logged without their
    evaluations; after each recovery the server, holding those steps' parameters, evaluates them:
    every evaluation and epoch record is there, with one process's figures."""
    cfg = dp.TrainConfig(workers=3, eval_every=5, **BASE)
    local = dp.train_local(cfg).metrics
    result = dp.Trainer(cfg, faults=[{"rank": 1, "step": 9, "kind": "evaluation_exit"},
                                     {"rank": 2, "step": 16, "kind": "evaluation_exit"}]).fit()
    assert result.summary["failures_survived"] == 2
    assert [r["step"] for r in result.metrics["steps"]] == list(range(24))
    for kind in ("evaluations", "epochs"):
        assert [e["step"] for e in result.metrics[kind]] == [e["step"] for e in local[kind]], kind
        for got, want in zip(result.metrics[kind], local[kind]):
            assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-10), (kind, got["step"])


def test_server_killed_restarts_from_checkpoint(ray_local, clean, tmp_path):
    cfg = dp.TrainConfig(workers=3, out=str(tmp_path), checkpoint_every=4, **BASE)
    result = dp.Trainer(cfg, faults=[{"role": "server", "step": 14, "kind": "exit"}]).fit()
    assert result.summary["failures_survived"] == 1
    _same(result.params, clean)
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints")[0].name == "ckpt-00000024.json"


def test_server_killed_without_checkpoints_replays_from_the_start(ray_local, clean):
    cfg = dp.TrainConfig(workers=3, **BASE)
    result = dp.Trainer(cfg, faults=[{"role": "server", "step": 6, "kind": "exit"}]).fit()
    assert result.summary["failures_survived"] == 1
    _same(result.params, clean)


def test_dropout_model_replays_the_same_masks_after_faults(ray_local, tmp_path, monkeypatch):
    """A worker and then the server die; the steps run again draw the masks they drew before."""
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    cfg = dp.TrainConfig(dataset="mnist1d", model="tests/user_models.py:build", workers=3, batch_size=50, steps=12,
                         dtype="float64", optimizer="adam", lr=0.01, seed=2, log_every=3, out=str(tmp_path),
                         checkpoint_every=4)
    result = dp.Trainer(cfg, faults=[{"rank": 2, "step": 3, "kind": "exit"},
                                     {"role": "server", "step": 9, "kind": "exit"}]).fit()
    assert result.summary["failures_survived"] == 2
    _same(result.params, dp.train_local(cfg.replace(out=None, checkpoint_every=0)).params)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [{"rank": 1, "step": 9, "kind": "exit"}, {"rank": 0, "step": 5, "kind": "hang"},
                                   {"role": "server", "step": 14, "kind": "exit"}], ids=["worker", "hang", "server"])
def test_compiled_graph_transport_recovers(ray_local, clean, tmp_path, fault):
    """Every transport reports a lost worker the same way: the compiled graph's recovery too
    (after a server loss its workers are replaced with it: Ray keeps them in the old graph)."""
    cfg = dp.TrainConfig(workers=3, transport="compiled_graph", step_timeout=3, out=str(tmp_path),
                         checkpoint_every=4, **BASE)
    result = dp.Trainer(cfg, faults=[fault]).fit()
    assert result.summary["failures_survived"] == 1
    assert [r["step"] for r in result.metrics["steps"]] == list(range(24))
    _same(result.params, clean)


@pytest.mark.parametrize("transport", ["auto", "object_store", "compiled_graph"])
def test_shrink_renumbers_the_others_on_every_transport(ray_local, clean, transport):
    """The server tells the remaining workers their new ranks (one recovery path): their shards
    cover the same global batch, so the parameters are the fault-free run's."""
    cfg = dp.TrainConfig(workers=3, on_worker_loss="shrink", transport=transport, **BASE)
    trainer = dp.Trainer(cfg, faults=[{"rank": 0, "step": 9, "kind": "exit"}])
    result = trainer.fit()
    assert result.summary["workers"] == 2 and result.summary["failures_survived"] == 1
    assert [p["rank"] for p in trainer.placement] == [0, 1]
    assert result.summary["shared_memory_workers"] == (2 if transport == "auto" else 0)
    _same(result.params, clean)


def test_hung_worker_times_out_and_is_replaced(ray_local, clean):
    cfg = dp.TrainConfig(workers=3, step_timeout=3, **BASE)
    start = time.monotonic()
    result = dp.Trainer(cfg, faults=[{"rank": 2, "step": 5, "kind": "hang"}]).fit()
    assert time.monotonic() - start < 60
    assert result.summary["failures_survived"] == 1
    _same(result.params, clean)


def test_hung_server_is_replaced(ray_local, clean, tmp_path):
    """Declared lost near --step-timeout (its heartbeat shows no progress), whatever the chunk:
    one chunk of 24 steps here, which a bound of 2 x steps x step-timeout would wait 106 s for."""
    cfg = dp.TrainConfig(workers=3, step_timeout=2, out=str(tmp_path), checkpoint_every=4, **{**BASE, "log_every": 24})
    start = time.monotonic()
    result = dp.Trainer(cfg, faults=[{"role": "server", "step": 10, "kind": "hang"}]).fit()
    assert time.monotonic() - start < 60
    assert result.summary["failures_survived"] == 1
    _same(result.params, clean)


def test_failure_budget(ray_local, tmp_path):
    cfg = dp.TrainConfig(workers=2, max_failures=0, out=str(tmp_path), checkpoint_every=4, **BASE)
    with pytest.raises(TrainingError, match=r"worker 0 lost at step 6.*budget \(--max-failures 0\) is spent"):
        dp.Trainer(cfg, faults=[{"rank": 0, "step": 6, "kind": "exit"}]).fit()
    assert checkpoint.load_latest(tmp_path / "checkpoints")["step"] == 4  # the last checkpoint is kept


def test_nan_gradient_stops_naming_step_and_worker(ray_local):
    cfg = dp.TrainConfig(workers=3, **BASE)
    with pytest.raises(TrainingError, match=r"step 7: NaN or Inf in the loss or gradient of worker\(s\) \[2\]"):
        dp.Trainer(cfg, faults=[{"rank": 2, "step": 7, "kind": "nan"}]).fit()


def test_nan_gradient_skipped_by_setting(ray_local):
    cfg = dp.TrainConfig(workers=3, on_nonfinite="skip", **BASE)
    result = dp.Trainer(cfg, faults=[{"rank": 2, "step": 7, "kind": "nan"}]).fit()
    skipped = [r["step"] for r in result.metrics["steps"] if r.get("skipped")]
    assert skipped == [7] and all(np.isfinite(v).all() for v in result.params.values())


def test_driver_killed_and_resumed(tmp_path):
    """SIGKILL of the driver and its embedded Ray, then --resume from the run's storage (--storage
    file://, a shared filesystem) in another folder, as from another machine: the parameters of a
    run without the fault (a CNN with dropout: the replayed steps draw the same masks). The 2-worker
    run resumes with 3 workers and 2 server shards: the flags of where a run runs apply."""
    root = Path(__file__).resolve().parent.parent
    model, workers, resume_flags = f"{root}/tests/user_models.py:build", "2", ["--workers", "3", "--servers", "2"]
    steps = 140  # killed at step 40 or later: the rest after the resume
    out = tmp_path / "run"
    dataset = "mnist1d"
    settings = dict(BASE, dataset=dataset, model=model, steps=steps, log_every=20)
    args = ["--dataset", dataset, "--batch-size", "60", "--steps", str(steps), "--dtype", "float64", "--model",
            model, "--seed", "5", "--log-every", "20", "--momentum", "0.9", "--lr", "0.1", "--workers", workers,
            "--checkpoint-every", "20", "--cpus", "4", "--out", str(out), "--storage", f"file://{tmp_path}/shared"]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            found = checkpoint.list_checkpoints(out / "checkpoints")
            if found and int(found[0].name[5:13]) >= 40:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        proc.wait()
    assert not (out / "params.npz").exists(), "the run ended before it could be killed"
    killed_at = int(checkpoint.list_checkpoints(out / "checkpoints")[0].name[5:13])
    assert killed_at < steps
    elsewhere, stored = tmp_path / "elsewhere", tmp_path / "shared" / "run"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--resume", f"file://{stored}", *resume_flags],
                       capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restored the checkpoint of step" in r.stderr and f"stored: file://{stored}/" in r.stdout
    clean = dp.train_local(dp.TrainConfig(workers=3, **settings)).params
    with np.load(stored / "params.npz", allow_pickle=False) as params:
        _same(dict(params), clean)
    records = [json.loads(line) for line in (stored / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(steps))  # each step once
    summary = json.loads((stored / "summary.json").read_text())
    assert summary["steps"] == steps and 0 < summary["resumed_from_step"] <= killed_at  # the newest the log covers
    assert summary["workers"] == 3 and summary["servers"] == 2
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("dptrain-")]  # the killed run's too
    # a flag that would change the arithmetic is refused, naming it; nothing is touched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--resume", str(out), "--workers", "2",
                        "--lr", "0.1", "--seed", "6"], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"invalid --resume: --seed 6 (5 in {out}/config.json): a resumed run keeps the settings" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


IMPOSTOR = r"""
import os, socket, struct, json, time, sys
nobody = int(sys.argv[1]); os.setgid(nobody); os.setuid(nobody)
tried = set()
end = time.monotonic() + 120  # bounded: the test ends it sooner
while time.monotonic() < end:
    names = [line.split()[-1] for line in open("/proc/net/unix").read().splitlines()[1:]
             if line.split()[-1].startswith("@dptrain-") and "-ctl-" in line]
    for name in names:
        if name in tried:
            continue
        tried.add(name)
        for hello in ({"rank": 0}, {"rank": 0, "secret": "0" * 32}, {"rank": 1, "secret": ""}):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect("\0" + name[1:])
            except OSError as e:  # that listener closed meanwhile
                print("missed", e, flush=True)
                s.close()
                continue
            try:  # connected: the server, checking our uid at accept, may close before our hello is sent
                p = json.dumps(hello).encode()
                s.sendall(struct.pack("!I", len(p)) + p)
                s.settimeout(5)
                got = s.recv(4)
                if got:  # the server took us for a worker: answer its request with an error
                    p = json.dumps({"error": "injected by a local user"}).encode()
                    s.sendall(struct.pack("!I", len(p)) + p)
                print("request" if got else "refused", flush=True)
            except (ConnectionResetError, BrokenPipeError):
                print("refused", flush=True)
            except OSError as e:  # no answer in 5 s: neither a refusal nor a request
                print("unanswered", e, flush=True)
            finally:
                s.close()
    time.sleep(0.002)
"""


def _steps_logged(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return 0
    return len({json.loads(line)["step"] for line in metrics.read_text().splitlines()
                if '"kind": "step"' in line and line.endswith("}")})


def _my_processes(title: str) -> list:
    """This test process's descendants titled `title` (the session's Ray instance is its child:
    none of another Ray instance's processes)."""
    import psutil
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith(title):
                found.append(p.pid)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def test_shards_on_the_workers_node_killed_and_frozen_from_outside(ray_local, tmp_path):
    """--servers 2 on one node, where the shards update their ranges of the shared segments in
    place over control channels: kill -9 of a shard's process once the run has logged 60 steps,
    SIGSTOP of a shard (a frozen process: it misses --step-timeout) after 60 more, sent from
    outside the run (a thread of this test) to the process found by its title. The run ends with
    the fault-free parameters, and its shared memory is gone."""
    import threading
    cfg = dp.TrainConfig(dataset="moons", model=[2, 64, 64, 2], batch_size=60, steps=200, dtype="float64", seed=3,
                         log_every=10, workers=2, servers=2, step_timeout=3, checkpoint_every=50,
                         out=str(tmp_path / "run"))
    frozen, sent = [], []

    def operator():
        for n, sig in ((60, signal.SIGKILL), (120, signal.SIGSTOP)):
            deadline = time.monotonic() + 120
            while _steps_logged(tmp_path / "run") < n and time.monotonic() < deadline:
                time.sleep(0.02)
            victims = [pid for pid in _my_processes("ray::ServerShard") if pid not in frozen]
            if victims:
                os.kill(victims[0], sig)
                sent.append(sig)
                if sig == signal.SIGSTOP:
                    frozen.append(victims[0])
    watcher = threading.Thread(target=operator, daemon=True)
    watcher.start()
    try:
        result = dp.Trainer(cfg).fit()
    finally:
        watcher.join(timeout=130)
        for pid in frozen:  # replaced, and ended by the driver, by now (if the run got that far)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert sent == [signal.SIGKILL, signal.SIGSTOP]
    assert result.summary["failures_survived"] == 2 and result.summary["steps"] == 200
    assert result.summary["servers"] == 2 and result.summary["shared_memory_workers"] == 2
    _same(result.params, dp.train_local(cfg).params)
    from dptrain.distributed.trainer import run_key
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dptrain-{run_key(cfg.out)}-")]


def test_another_local_user_cannot_take_over_a_worker(ray_local, clean, tmp_path):
    """An impostor process of user nobody connects to the run's control channel and claims ranks,
    also while worker 0 is replaced after a crash: every attempt is refused, the run ends on the
    fault-free parameters. (Worker 0 joins each session a second late, a window for the race.)"""
    import pwd
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process of another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    prologue = "import os, socket, struct, json, time, sys\n"  # imported before the privileges go
    impostor = subprocess.Popen([sys.executable, "-c", prologue + IMPOSTOR, str(nobody)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        cfg = dp.TrainConfig(workers=3, out=str(tmp_path), **BASE)
        result = dp.Trainer(cfg, faults=[{"rank": 0, "kind": "slow_connect", "seconds": 1.5},
                                         {"rank": 0, "step": 9, "kind": "exit"}]).fit()
    finally:
        impostor.kill()
        out, err = impostor.communicate(timeout=10)
    attempts = out.split()
    assert "request" not in attempts, out
    assert attempts.count("refused") >= 6, (out, err)  # three hellos at the start and three at the recovery
    assert result.summary["failures_survived"] == 1 and result.summary["shared_memory_workers"] == 3
    _same(result.params, clean)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted for the test (root only), unmounted after it whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_keeps_the_run_and_its_checkpoints(small_disk, tmp_path):
    """The disk fills up mid-run: the checkpoint that no longer fits is one warning naming the file,
    the step and the newest intact checkpoint, and training goes on; the run folder's last write
    fails with one line (exit 1), and a resume on the still-full disk too, before Ray starts; no
    temporary file is left. Once there is room again, --resume ends on the fault-free parameters."""
    root = Path(__file__).resolve().parent.parent
    out = small_disk / "run"
    args = ["--dataset", "moons", "--model", "2,256,256,2", "--batch-size", "60", "--steps", "100", "--dtype",
            "float64", "--seed", "5", "--checkpoint-every", "20", "--keep-checkpoints", "2", "--workers", "2",
            "--cpus", "2", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "dptrain.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=root, start_new_session=True)
    filler = small_disk / "filler"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(checkpoint.list_checkpoints(out / "checkpoints")) >= 1:
                break
            time.sleep(0.01)
        # all but 300 KB taken: metrics.jsonl still fits for a while, a 1 MB checkpoint does not
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(free - 300_000, 0))
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert "cannot write the checkpoint of step" in err and "No space left on device" in err, err[-3000:]
    assert "the newest intact one is" in err and "training goes on" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dptrain train: training failed: cannot write") and "No space left" in last, last
    kept = checkpoint.list_checkpoints(out / "checkpoints")
    assert kept and not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    resume = [sys.executable, "-m", "dptrain.cli", "train", "--resume", str(out), "--no-progress"]
    with open(filler, "ab") as f:  # the last bytes too: not even the log's next line fits
        try:
            f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("dptrain train: ") and "No space left" in r.stderr
    assert "restored the checkpoint" not in r.stderr  # refused by the folder's check, before Ray starts
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before  # nothing lost
    filler.unlink()
    r = subprocess.run(resume, capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    clean = dp.train_local(dp.TrainConfig(dataset="moons", model=[2, 256, 256, 2], batch_size=60, steps=100,
                                          dtype="float64", seed=5)).params
    with np.load(out / "params.npz", allow_pickle=False) as params:
        _same(dict(params), clean)


def test_a_frozen_process_is_ended_at_once_and_only_while_it_is_the_same_process():
    """processes.end after ray.kill: SIGKILL of a frozen actor's process on the driver's node (Ray
    waits 5 s for a killed actor to exit first), never of a process given the same pid since."""
    from dptrain.distributed import processes
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        me = processes.identity()
        assert me["pid"] == os.getpid() and me["started"] == processes.start_time(os.getpid()) > 0
        frozen = {"pid": proc.pid, "started": processes.start_time(proc.pid), "node_id": me["node_id"]}
        processes.end({**frozen, "started": frozen["started"] - 1})  # another process that had this pid
        time.sleep(0.2)
        assert proc.poll() is None
        processes.end(frozen)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert processes.start_time(proc.pid) is None and not processes.kill_if_same(proc.pid, frozen["started"])
    finally:
        proc.kill()
        proc.wait()


def test_a_silent_server_is_lost_after_its_step_timeout_within_10_to_30_seconds():
    """No heartbeat at all (a frozen process) is lost after --step-timeout, but never before the
    Watch can have started (10 s) and never later than 30 s, whatever the timeout."""
    from dptrain.distributed.fleet import silence_limit
    assert [silence_limit(t) for t in (2, 10, 17.5, 30, 300)] == [10.0, 10.0, 17.5, 30.0, 30.0]
