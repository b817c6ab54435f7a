"""The engine and training on cupy. Skipped without cupy and a CUDA GPU (see conftest.py)."""

import numpy as np
import pytest

import dptrain as dp
from gradcheck import check_op
from test_layers import LAYER_OPS
from test_tensor import OPS

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name,fn,shapes,opts", OPS, ids=[op[0] for op in OPS])
def test_op_gradient_on_gpu(name, fn, shapes, opts):
    if name in ("index_array_repeat", "index_pairs", "index_bool"):
        # the index arrays must live on the GPU too
        import cupy
        idx = {"index_array_repeat": lambda a: a[cupy.array([0, 2, 0, 0])],
               "index_pairs": lambda a: a[cupy.array([0, 1, 1]), cupy.array([3, 0, 0])],
               "index_bool": lambda a: a[cupy.array([True, False, True])]}[name]
        fn = idx
    check_op(fn, *shapes, device="cuda", **opts)


@pytest.mark.parametrize("name,fn,shapes", LAYER_OPS, ids=[op[0] for op in LAYER_OPS])
def test_layer_gradient_on_gpu(name, fn, shapes):
    check_op(fn, *shapes, device="cuda")


@pytest.mark.parametrize("model,dataset", [("tests/user_models.py:build", "mnist1d"), ("transformer", "sort"),
                                           ("cnn2d", "digits2d")])
def test_gpu_training_of_other_models_matches_cpu(model, dataset, monkeypatch):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    cfg = dp.TrainConfig(dataset=dataset, model=model, steps=5, batch_size=40, dtype="float64", optimizer="adam",
                         lr=0.01, seed=1)
    cpu = dp.train_local(cfg)
    gpu = dp.train_local(cfg.replace(device="cuda"))  # dropout masks included: the same on both
    for k in cpu.params:
        np.testing.assert_allclose(gpu.params[k], cpu.params[k], rtol=1e-6, atol=1e-8)


def test_tensor_moves_between_devices():
    x = dp.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    g = x.to("cuda")
    assert g.device == "cuda" and g.to("cuda") is g
    (g * g).sum().backward()
    np.testing.assert_allclose(dp.backend.to_numpy(g.grad), 2 * np.arange(6.0).reshape(2, 3))
    np.testing.assert_allclose(g.to("cpu").numpy(), x.numpy())


def test_flat_buffer_on_gpu():
    m = dp.nn.MLP([3, 5, 2], seed=0).to("cuda")
    buf = m.flat()
    assert dp.backend.device_of(buf.data) == "cuda"
    opt = dp.optim.Adam(m.parameters(), lr=0.01)
    dp.nn.functional.cross_entropy(m(dp.Tensor(dp.backend.xp_for("cuda").ones((4, 3), dtype="float32"))),
                                   dp.backend.xp_for("cuda").array([0, 1, 1, 0])).backward()
    before = buf.data.copy()
    opt.step()
    assert float(abs(buf.data - before).sum()) > 0


def test_gpu_training_matches_cpu_and_learns():
    cfg = dp.TrainConfig(dataset="digits", epochs=20, dtype="float64", seed=0)
    cpu = dp.train_local(cfg)
    gpu = dp.train_local(cfg.replace(device="cuda"))
    assert gpu.summary["test_accuracy"] >= 0.95
    for k in cpu.params:  # same arithmetic up to rounding (cuBLAS sums in another order)
        np.testing.assert_allclose(gpu.params[k], cpu.params[k], rtol=1e-6, atol=1e-8)


@pytest.mark.ray
def test_distributed_gpu_workers(ray_gpu):
    cfg = dp.TrainConfig(dataset="moons", workers=2, gpus_per_worker=0.5, steps=10, batch_size=64,
                         dtype="float64", model=[2, 16, 2], seed=3)
    assert cfg.device == "cuda"
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg.replace(device="cpu", gpus_per_worker=0.0))
    assert all(p["device"] == "cuda" for p in dist.metrics["placement"])
    for k in local.params:
        np.testing.assert_allclose(dist.params[k], local.params[k], rtol=1e-8, atol=1e-10)


@pytest.mark.ray
def test_distributed_gpu_workers_with_a_user_model(ray_gpu, monkeypatch):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    cfg = dp.TrainConfig(dataset="mnist1d", workers=2, gpus_per_worker=0.5, steps=6, batch_size=50, dtype="float64",
                         model="tests/user_models.py:build", optimizer="adam", lr=0.01, seed=3)
    dist = dp.Trainer(cfg).fit()
    local = dp.train_local(cfg.replace(device="cpu", gpus_per_worker=0.0))
    for k in local.params:
        np.testing.assert_allclose(dist.params[k], local.params[k], rtol=1e-7, atol=1e-10)


@pytest.fixture
def ray_gpu():
    ray = pytest.importorskip("ray")
    ray.shutdown()
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()
