import math

import numpy as np
import pytest

import dptrain as dp
from dptrain.optim import Schedule


def _param(values):
    p = dp.nn.Parameter(np.array(values, dtype=np.float64))
    return p


def _run(opt, p, grads):
    out = []
    for g in grads:
        p.grad[...] = g
        opt.step()
        out.append(p.data.copy())
    return out


GRADS = [np.array([1.0, -2.0]), np.array([0.5, 0.5]), np.array([-1.0, 1.0])]


def test_sgd_plain():
    p = _param([1.0, 2.0])
    got = _run(dp.optim.SGD([p], lr=0.1), p, GRADS)
    np.testing.assert_allclose(got[0], [0.9, 2.2])
    np.testing.assert_allclose(got[2], [0.9 - 0.05 + 0.1, 2.2 - 0.05 - 0.1])


def test_sgd_momentum_and_weight_decay_by_hand():
    p = _param([1.0, 2.0])
    opt = dp.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    got = _run(opt, p, GRADS)
    w, buf = np.array([1.0, 2.0]), None
    for g, w_got in zip(GRADS, got):
        d = g + 0.01 * w
        buf = d if buf is None else 0.9 * buf + d
        w = w - 0.1 * buf
        np.testing.assert_allclose(w_got, w)
    np.testing.assert_allclose(opt.momentum_buffer[:2], buf)


def test_sgd_nesterov_by_hand():
    p = _param([1.0, 2.0])
    got = _run(dp.optim.SGD([p], lr=0.1, momentum=0.5, nesterov=True), p, GRADS)
    w, buf = np.array([1.0, 2.0]), None
    for g, w_got in zip(GRADS, got):
        buf = g if buf is None else 0.5 * buf + g
        w = w - 0.1 * (g + 0.5 * buf)
        np.testing.assert_allclose(w_got, w)


@pytest.mark.parametrize("cls,wd", [(dp.optim.Adam, 0.0), (dp.optim.Adam, 0.1), (dp.optim.AdamW, 0.1)])
def test_adam_by_hand(cls, wd):
    p = _param([1.0, 2.0])
    opt = cls([p], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    got = _run(opt, p, GRADS)
    w, m, v = np.array([1.0, 2.0]), np.zeros(2), np.zeros(2)
    for t, (g, w_got) in enumerate(zip(GRADS, got), start=1):
        if cls is dp.optim.AdamW:
            w = w * (1 - 0.01 * wd)
        else:
            g = g + wd * w
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        w = w - 0.01 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.99 ** t)) + 1e-8)
        np.testing.assert_allclose(w_got, w, rtol=1e-12)
    np.testing.assert_allclose(opt.exp_avg[:2], m)
    np.testing.assert_allclose(opt.exp_avg_sq[:2], v)


def test_optimizer_updates_the_whole_flat_buffer_in_place():
    m = dp.nn.MLP([3, 4, 2], seed=0, dtype="float64")
    opt = dp.optim.SGD(m.parameters(), lr=0.5)
    assert opt.flat is m.flat()
    before = opt.flat.data.copy()
    data_id = id(opt.flat.data)
    opt.flat.grad[...] = 1.0
    opt.step()
    assert id(opt.flat.data) == data_id
    np.testing.assert_allclose(opt.flat.data, before - 0.5)
    np.testing.assert_allclose(m.parameters()[0].data.ravel(), before[:12] - 0.5)
    opt.flat.grad[...] = 0.0
    opt.flat.grad[:12] = 1.0  # gradients only for the first parameter: the others stay put
    opt.step()
    np.testing.assert_allclose(m.parameters()[0].data.ravel(), before[:12] - 1.0)
    np.testing.assert_allclose(m.parameters()[1].data, before[opt.flat.offsets[1]:opt.flat.offsets[1] + 4] - 0.5)
    opt.zero_grad()
    assert not m.parameters()[1].grad.any()


@pytest.mark.parametrize("cls", [dp.optim.SGD, dp.optim.Adam])
def test_optimizer_state_dict_round_trip(cls):
    kwargs = {"momentum": 0.9} if cls is dp.optim.SGD else {}
    p1, p2 = _param([1.0, 2.0]), _param([1.0, 2.0])
    o1 = cls([p1], lr=0.1, **kwargs)
    _run(o1, p1, GRADS[:2])
    o2 = cls([p2], lr=0.1, **kwargs)
    p2.data[...] = p1.data
    o2.load_state_dict(o1.state_dict())
    np.testing.assert_allclose(_run(o1, p1, GRADS[2:]), _run(o2, p2, GRADS[2:]))
    with pytest.raises(ValueError, match="optimizer"):
        (dp.optim.Adam if cls is dp.optim.SGD else dp.optim.SGD)([_param([0.0, 0.0])], lr=0.1).load_state_dict(
            o1.state_dict())


@pytest.mark.parametrize("make,message", [
    (lambda p: dp.optim.SGD(p, lr=0), "invalid learning rate: 0"),
    (lambda p: dp.optim.SGD(p, lr=-1), "invalid learning rate: -1"),
    (lambda p: dp.optim.SGD(p, lr=float("nan")), "invalid learning rate: nan"),
    (lambda p: dp.optim.SGD(p, lr=0.1, momentum=1.5), "invalid momentum: 1.5"),
    (lambda p: dp.optim.SGD(p, lr=0.1, weight_decay=-0.1), "invalid weight_decay: -0.1"),
    (lambda p: dp.optim.SGD(p, lr=0.1, nesterov=True), "invalid nesterov"),
    (lambda p: dp.optim.Adam(p, betas=(1.0, 0.9)), "invalid beta1: 1.0"),
    (lambda p: dp.optim.Adam(p, eps=0), "invalid eps: 0"),
])
def test_bad_hyperparameters(make, message):
    with pytest.raises(ValueError, match=message):
        make([_param([1.0])])


def test_schedules():
    assert Schedule("constant", 0.1)(1000) == 0.1
    s = Schedule("step", 1.0, step_size=10, gamma=0.5)
    assert [s(0), s(9), s(10), s(25)] == [1.0, 1.0, 0.5, 0.25]
    c = Schedule("cosine", 1.0, total_steps=100, min_lr=0.1)
    assert c(0) == 1.0 and math.isclose(c(50), 0.55) and math.isclose(c(100), 0.1)
    w = Schedule("cosine", 1.0, total_steps=110, warmup_steps=10)
    assert [w(0), w(4), w(9)] == [0.1, 0.5, 1.0] and w(10) == 1.0 and math.isclose(w(60), 0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("linear", 0.1)
    with pytest.raises(ValueError, match="invalid warmup"):
        Schedule("constant", 0.1, warmup_steps=-1)


def test_a_recipes_adam_settings_reach_the_optimizer_and_the_schedule():
    from dptrain.blocks import build_optimizer, build_schedule
    cfg = dp.TrainConfig(optimizer="adamw", betas="0.9,0.99", eps=1e-6, lr=1e-3, weight_decay=0.1,
                         schedule="cosine", warmup=10, min_lr=1e-4)
    assert cfg.betas == [0.9, 0.99] and dp.TrainConfig.from_dict(cfg.to_dict()) == cfg  # JSON round trip
    opt = build_optimizer(cfg, [_param([1.0])])
    assert (type(opt), opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (dp.optim.AdamW, 0.9, 0.99, 1e-6, 0.1)
    s = build_schedule(cfg, 110)  # nanoGPT's get_lr: a warm-up to lr, then a cosine down to min_lr
    assert s(9) == 1e-3 and math.isclose(s(60), 1e-4 + 0.5 * (1e-3 - 1e-4)) and math.isclose(s(110), 1e-4)
    assert build_optimizer(dp.TrainConfig(optimizer="adam"), [_param([1.0])]).beta2 == 0.999  # the default


@pytest.mark.parametrize("ratio", [None, 0.25, 4.0])
def test_clipping_scales_the_mean_gradient_as_torch_does(ratio):
    """--clip-grad-norm MAX: one SGD step from the mean gradient g of the batch is
    p - lr * g * min(1, MAX / (|g| + 1e-6)) (torch.nn.utils.clip_grad_norm_), computed here in
    float64 by hand; every step records |g| (before clipping), clipped or not."""
    from dptrain.blocks import prepare
    from dptrain.data import BatchSampler
    from dptrain.step import Replica
    cfg = dp.TrainConfig(dataset="moons", model=[2, 16, 2], dtype="float64", batch_size=50, steps=1, lr=0.1,
                         optimizer="sgd", seed=1)
    ds = dp.data.load_dataset("moons")
    replica = Replica(cfg, ds, *prepare(cfg, ds))
    start = replica.flat.data.copy()
    _, _, count = replica.compute_gradients(BatchSampler(len(ds), 50, 1).indices(0), 0)
    g = replica.flat.grad / count
    norm = float(np.sqrt((g * g).sum()))
    clip = None if ratio is None else norm * ratio
    run = dp.train_local(cfg.replace(clip_grad_norm=clip))
    assert run.metrics["steps"][0]["grad_norm"] == pytest.approx(norm, rel=1e-12)
    replica.flat.data[...] = start - 0.1 * g * (1.0 if clip is None else min(1.0, clip / (norm + 1e-6)))
    for name, want in replica.model.state_dict().items():
        np.testing.assert_allclose(run.params[name], want, rtol=1e-12, atol=1e-15)


def test_parameter_groups_decay_and_scale_as_a_hand_computation():
    """torch.optim-style groups: each group's weight decay and learning-rate scale, one SGD step
    checked by hand; the model's flat layout is kept (the server's and the workers' agree)."""
    model = dp.nn.MLP([3, 4, 2], seed=0, dtype="float64")
    flat = model.flat()
    offsets = list(flat.offsets)
    weights = [p for p in model.parameters() if p.data.ndim == 2]
    biases = [p for p in model.parameters() if p.data.ndim == 1]
    opt = dp.optim.SGD([{"params": biases, "weight_decay": 0.0, "lr_scale": 0.5}, {"params": weights}],
                       lr=0.1, weight_decay=0.2)
    assert opt.flat is flat and list(opt.flat.offsets) == offsets  # groups reorder nothing
    before = [p.data.copy() for p in model.parameters()]
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.grad[...] = rng.standard_normal(p.data.shape)
    grads = [p.grad.copy() for p in model.parameters()]
    opt.step()
    for p, p0, g in zip(model.parameters(), before, grads):
        want = p0 - 0.1 * (g + 0.2 * p0) if p.data.ndim == 2 else p0 - 0.05 * g
        np.testing.assert_allclose(p.data, want, rtol=1e-14)
    with pytest.raises(ValueError, match="invalid parameter group"):
        dp.optim.SGD([{"params": biases, "momentum": 0.9}], lr=0.1)


def test_the_matrices_rule_and_its_range_on_a_shard():
    """--decay-params matrices: decay on parameters of two or more dimensions only (nanoGPT's rule),
    the per-entry decay kept in the state, so a shard's optimizer over a range adopts its slice."""
    from dptrain.blocks import build_optimizer
    from dptrain.distributed.shards import sliced_state
    from dptrain.nn.module import Parameter
    cfg = dp.TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.1, decay_params="matrices")
    model = dp.nn.MLP([3, 4, 2], seed=0, dtype="float64")
    opt = build_optimizer(cfg, model.parameters())
    decay = opt.state_dict()["state"]["weight_decay_per_entry"]
    for p, (shape, offset) in zip(model.parameters(), zip(opt.flat.shapes, opt.flat.offsets)):
        n = int(np.prod(shape))
        assert set(decay[offset:offset + n]) == ({0.1} if len(shape) >= 2 else {0.0})
    assert "weight_decay_per_entry" not in build_optimizer(cfg.replace(decay_params="all"),
                                                           dp.nn.MLP([3, 4, 2], seed=0).parameters()).state_dict()["state"]
    lo, hi = 8, 24
    shard = build_optimizer(cfg.replace(decay_params="all"), [Parameter(np.zeros(hi - lo))])
    shard.load_state_dict(sliced_state(opt.state_dict(), lo, hi))
    np.testing.assert_array_equal(shard.state_dict()["state"]["weight_decay_per_entry"], decay[lo:hi])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_mean_over_a_power_of_two_count_has_the_divisions_bits(dtype):
    """mean_gradient multiplies by 1 / count where that is exact (a power of two): every entry,
    subnormal, huge, signed zero, infinite and NaN among them, is the division's to the bit;
    other counts divide."""
    from dptrain.step import mean_gradient
    info = np.finfo(dtype)
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, info.tiny, -info.tiny, info.tiny / 3, info.smallest_subnormal, info.max,
                        -info.max, np.inf, -np.inf, np.nan], dtype=dtype)
    for count in (1, 2, 64, 256, 4096, 1 << 20, 3, 255, 1000):
        for n in (1, 3):
            grads = [np.concatenate([special, (rng.standard_normal(5000) * 10.0 ** rng.integers(-40, 30, 5000))
                                     .astype(dtype)]) for _ in range(n)]
            out = np.empty_like(grads[0])
            with np.errstate(all="ignore"):  # the sums of huge entries overflow, as they should
                mean_gradient(grads, count, out)
                expected = grads[0].copy()
                for g in grads[1:]:
                    expected += g
                expected = np.divide(expected, count)
            assert np.array_equal(out.view(f"u{out.itemsize}"), expected.view(f"u{out.itemsize}")), (count, n)


@pytest.mark.parametrize("settings", [{"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
                                      {"optimizer": "adamw", "weight_decay": 0.1, "decay_params": "matrices"}])
def test_the_update_on_threads_is_the_one_threads_bit_for_bit(settings):
    """--update-threads T: T threads over disjoint runs of blocks give one thread's parameters, state
    and sum of squares bit for bit."""
    from dptrain.blocks import build_optimizer
    from dptrain.optim.optimizers import CHUNK, MIN_BLOCKS_PER_THREAD
    from dptrain.step import apply_mean_gradient
    rng = np.random.default_rng(0)
    shapes = [(1000, 1100), (700,), (700, 1001), (7,)]  # 27 blocks of CHUNK and a ragged end
    start = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    runs = {}
    for threads in (1, 2, 3):
        cfg = dp.TrainConfig(dataset="moons", lr=0.05, update_threads=threads, **settings)
        opt = build_optimizer(cfg, [dp.nn.Parameter(a.copy()) for a in start])
        assert opt.threads == threads and opt.flat.size > 3 * MIN_BLOCKS_PER_THREAD * CHUNK
        squares = []
        for step in range(3):
            grads = [np.random.default_rng([step, r]).standard_normal(opt.flat.size).astype(np.float32) for r in range(2)]
            squares.append(apply_mean_gradient(opt, grads, 64, 0.05))
        runs[threads] = (opt.flat.data.copy(), opt.state_dict()["state"], squares)
    for threads in (2, 3):
        assert np.array_equal(runs[threads][0], runs[1][0]) and runs[threads][2] == runs[1][2]
        for name, a in runs[1][1].items():
            assert np.array_equal(runs[threads][1][name], a), name


def test_an_update_takes_a_thread_per_eight_blocks_at_most(monkeypatch):
    """Threads hand off work at a cost: a buffer of 2 blocks stays on one thread whatever is asked,
    one of 17 blocks takes 2 of 3."""
    from dptrain.optim import optimizers
    from dptrain.optim.optimizers import CHUNK
    pools = []
    real = optimizers._pool
    monkeypatch.setattr(optimizers, "_pool", lambda size: pools.append(size) or real(size))
    for blocks, used in ((2, []), (17, [1])):
        opt = dp.optim.SGD([dp.nn.Parameter(np.ones(blocks * CHUNK - 5, dtype=np.float32))], lr=0.1)
        opt.threads = 3
        pools.clear()
        opt.update(opt.flat.data, np.ones_like(opt.flat.grad))
        assert pools == used and np.all(opt.flat.data[:blocks * CHUNK - 5] == np.float32(0.9))


KERNEL_SETTINGS = [(dp.optim.SGD, {}), (dp.optim.SGD, {"momentum": 0.9}),
                   (dp.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
                   (dp.optim.SGD, {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.001}),
                   (dp.optim.Adam, {}), (dp.optim.Adam, {"weight_decay": 0.01, "betas": (0.8, 0.99)}),
                   (dp.optim.AdamW, {"weight_decay": 0.1}),
                   (dp.optim.SGD, {"momentum": 0.9, "groups": [0.01, 0.0]}),  # --decay-params matrices: per entry
                   (dp.optim.Adam, {"groups": [0.01, 0.0]}), (dp.optim.AdamW, {"groups": [0.1, 0.0]}),
                   (dp.optim.AdamW, {"groups": [0.1, 0.0], "lr_scale": 0.5})]  # a per-entry rate: numpy's rules


@pytest.mark.parametrize("cls,settings,dtype", [(c, s, np.float32) for c, s in KERNEL_SETTINGS] +
                         [(c, s, np.float64) for c, s in KERNEL_SETTINGS[2:7:2] + KERNEL_SETTINGS[-2:-1]])
def test_the_compiled_update_is_the_numpy_rules_bit_for_bit(cls, settings, dtype, monkeypatch):
    """The server's update through the compiled kernels (optim/kernels.py: the mean of 1 to 3
    workers' gradients, one of them read-only as a shared-memory segment is, over a count that is
    a power of two and one that is not, then the rule) ends on the parameters, state and sums of
    squares of the numpy rules, bit for bit, on 1 and 2 threads, first steps included; with
    parameter groups' weight decays (per entry) as well."""
    pytest.importorskip("numba")
    from dptrain.optim import kernels, optimizers
    from dptrain.optim.optimizers import CHUNK
    from dptrain.step import apply_mean_gradient
    rng = np.random.default_rng(0)
    start = [(rng.standard_normal(shape) * 3).astype(dtype) for shape in [(CHUNK + 3, 17), (11,)]]
    settings = dict(settings)
    decays, lr_scale = settings.pop("groups", None), settings.pop("lr_scale", None)
    steps = None  # (count, gradients) of each step, made once the flat buffer's size is known: the same for each run
    runs = {}
    for compiled, threads in ((False, 1), (True, 1), (True, 2)):
        monkeypatch.setattr(kernels, "ENABLED", compiled)
        params = [dp.nn.Parameter(a.copy()) for a in start]
        if decays:  # the matrix decays, the vector does not
            groups = [{"params": [p], "weight_decay": wd} for p, wd in zip(params, decays)]
            if lr_scale:
                groups[1]["lr_scale"] = lr_scale
        opt = cls(groups if decays else params, lr=0.05, **settings)
        opt.threads = threads
        block = slice(0, CHUNK)
        assert optimizers._compiled(opt._lr(block), opt._option("weight_decay", opt.weight_decay, block),
                                    opt.flat.data[block], opt.flat.grad[block]) == (compiled and not lr_scale)
        if steps is None:
            steps = [(count, [np.random.default_rng([step, r]).standard_normal(opt.flat.size).astype(dtype)
                              for r in range(workers)])
                     for step, (workers, count) in enumerate([(1, 256), (2, 60), (3, 64), (2, 256)])]
            for _, grads in steps:
                grads[-1].flags.writeable = False
        squares = [apply_mean_gradient(opt, grads, count, 0.05 / (step + 1)) for step, (count, grads) in enumerate(steps)]
        runs[compiled, threads] = (opt.flat.data.copy(), opt.state_dict()["state"], squares)
    numpy_rules = runs[False, 1]
    for key in ((True, 1), (True, 2)):
        params, state, squares = runs[key]
        assert np.array_equal(params, numpy_rules[0]) and squares == numpy_rules[2], key
        for name, a in numpy_rules[1].items():
            assert np.array_equal(state[name], a), (key, name)


def test_the_compiled_update_takes_only_arrays_it_can_index_alike():
    """The kernels index their arrays unchecked: a gradient of another size, dtype or layout takes
    numpy's rules (and numpy's error), never a read past an array's end; so does a small block,
    where numpy's few calls cost less than a kernel's."""
    pytest.importorskip("numba")
    from dptrain.optim import kernels
    from dptrain.step import mean_gradient
    n = kernels.MIN_SIZE
    a = np.ones(n, np.float32)
    assert kernels.usable(a, a.copy(), None)
    assert not kernels.usable(a, np.ones(n - 1, np.float32))
    assert not kernels.usable(a, np.ones(n, np.float64))
    assert not kernels.usable(a, np.ones(2 * n, np.float32)[::2])
    assert not kernels.usable(np.ones(n, np.float16), np.ones(n, np.float16))
    assert not kernels.usable(a[:-1], a[1:].copy())
    with pytest.raises(ValueError, match="broadcast"):
        mean_gradient([np.ones(n - 1, np.float32), np.ones(n - 1, np.float32)], 2, a)


def test_updates_while_the_kernels_load_run_numpys_rules_instead_of_waiting(monkeypatch):
    """An optimizer starts loading the kernels in a thread (numba's import, its cache: 0.4 s); an
    update that comes first runs numpy's rules (the same numbers) and the next ones the kernels."""
    pytest.importorskip("numba")
    import threading
    from dptrain.optim import kernels
    real, release, compiled = kernels._compile, threading.Event(), []

    def compile_(cache=True):
        assert release.wait(timeout=60)
        compiled.append(cache)
        return real(cache)
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_compile", compile_)
    p = dp.nn.Parameter(np.ones(kernels.MIN_SIZE, np.float32))
    opt = dp.optim.SGD([p], lr=0.5, momentum=0.9)
    try:
        p.grad[...] = 1.0
        opt.step()  # the load still blocked: numpy's rules
        assert not compiled and kernels._kernels is None
    finally:
        release.set()
        kernels.wait()
    assert compiled == [True] and kernels._kernels is not None
    opt.step()  # the kernels'
    np.testing.assert_array_equal(p.data, np.full(kernels.MIN_SIZE, np.float32(1 - 0.5 - 0.5 * 1.9), np.float32))


@pytest.mark.parametrize("fails", ["cache", "always"])
def test_kernels_that_cannot_compile_are_a_warning_and_the_numpy_rules(fails, monkeypatch, caplog):
    """Kernels that numba can cache nowhere (a read-only install) are compiled for the process
    alone; compiling failing in a process turns them off there with one warning, and the update
    runs numpy's rules. The numbers are the same either way."""
    pytest.importorskip("numba")
    from dptrain.optim import kernels
    real = kernels._compile

    def compile_(cache=True):
        if cache or fails == "always":
            raise RuntimeError("cannot cache function 'mean': no locator available for file 'kernels.py'")
        return real(cache)
    monkeypatch.setattr(kernels, "_kernels", None)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_compile", compile_)
    with caplog.at_level("INFO", logger="dptrain.optim.kernels"):  # the optimizer starts loading them
        p = dp.nn.Parameter(np.ones(kernels.MIN_SIZE, np.float32))
        opt = dp.optim.SGD([p], lr=0.5, momentum=0.9)
        p.grad[...] = 1.0
        opt.step()
        kernels.wait()
    assert "cannot be cached" in caplog.text and "no locator" in caplog.text
    assert kernels.ENABLED == (fails == "cache") and ("compiled kernels are off" in caplog.text) == (fails == "always")
    np.testing.assert_array_equal(p.data, np.full(kernels.MIN_SIZE, 0.5, np.float32))
