"""Any model, any loss: built-ins, file:function references, the check before a run, and
user-defined models with dropout and a transformer trained by N workers exactly as one process."""

from pathlib import Path

import numpy as np
import pytest

import dptrain as dp
from dptrain.config import BUILTIN_LOSS_NAMES, BUILTIN_MODEL_NAMES, ConfigError
from dptrain.blocks import prepare
from dptrain.models import BUILTIN_LOSSES, BUILTIN_MODELS, layout

HERE = Path(__file__).resolve().parent
USER = "tests/user_models.py"
CNN = dict(dataset="mnist1d", batch_size=50, steps=6, dtype="float64", optimizer="adam", lr=0.01, seed=3)
SORT = dict(dataset="sort", batch_size=30, steps=4, dtype="float64", optimizer="adam", lr=0.01, seed=2)


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-300)) for k in b)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(HERE.parent)  # references are relative to where dptrain runs


def test_builtin_names_agree():
    assert set(BUILTIN_MODEL_NAMES) == set(BUILTIN_MODELS) and set(BUILTIN_LOSS_NAMES) == set(BUILTIN_LOSSES)


@pytest.mark.parametrize("model,dataset,shape", [("cnn1d", "mnist1d", (3, 10)), ("cnn2d", "digits2d", (3, 10)),
                                                 ("transformer", "sort", (3, 16, 11)), ("mlp", "digits2d", (3, 10))])
def test_builtin_models_fit_their_data(model, dataset, shape):
    cfg = dp.TrainConfig(dataset=dataset, model=model)
    ds = dp.data.load_dataset(dataset)
    factory, loss = prepare(cfg, ds)
    net = factory()
    assert net(dp.Tensor(ds.x_train[:3].astype(np.float32))).shape == shape
    again = factory()  # the run's seed fixes the initial parameters (mlp's drew fresh ones before)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(net.parameters(), again.parameters()))


def test_conv_base_is_the_papers():
    net = dp.models.cnn1d((40,), 10)
    assert [(n, tuple(s)) for n, s, _ in layout(net)] == [
        ("conv1.weight", (25, 1, 5)), ("conv1.bias", (25,)), ("conv2.weight", (25, 25, 3)), ("conv2.bias", (25,)),
        ("conv3.weight", (25, 25, 3)), ("conv3.bias", (25,)), ("linear.weight", (10, 125)), ("linear.bias", (10,))]


def test_file_and_module_references(in_repo):
    ds = dp.data.load_dataset("mnist1d")
    factory, _ = prepare(dp.TrainConfig(model=f"{USER}:build"), ds)
    assert isinstance(factory(), dp.nn.Module) and factory.name == f"{USER}:build"
    factory, _ = prepare(dp.TrainConfig(model="dptrain.models:cnn1d"), ds)
    assert [n for n, *_ in layout(factory())][0] == "conv1.weight"
    moons = dp.data.load_dataset("moons")
    prepare(dp.TrainConfig(dataset="moons", model=f"{USER}:build_without_arguments"), moons)


def test_the_factory_gives_the_same_model_every_time(in_repo):
    factory, _ = prepare(dp.TrainConfig(model=f"{USER}:build", dtype="float64", seed=4), dp.data.load_dataset("mnist1d"))
    a, b = factory().state_dict(), factory().state_dict()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float64 for k in a)
    keys = [m.random_key for _, m in factory().named_modules() if isinstance(m, dp.nn.Dropout)]
    assert keys == [dp.nn.random.layer_key("drop")]


@pytest.mark.parametrize("model,loss,message", [
    ("tests/nope.py:build", None, "invalid model: 'tests/nope.py:build': file tests/nope.py not found"),
    (f"{USER}:missing", None, "has no 'missing' \\(it defines .*build"),
    (f"{USER}:raises", None, "raised RuntimeError: this builder is broken"),
    (f"{USER}:returns_list", None, "returned a list, not a dptrain.nn.Module"),
    (f"{USER}:wrong_outputs", None, "output of .*shape \\(1, 13\\), does not fit the labels of shape \\(1,\\)"),
    (None, f"{USER}:mean_loss", "a mean; return the SUM"),
    (None, f"{USER}:vector_loss", "returned shape \\(1,\\) for 1 example\\(s\\); it must return a scalar"),
    ("nosuchpackage.mod:fn", None, "cannot import nosuchpackage.mod"),
])
def test_bad_models_and_losses_are_named(in_repo, model, loss, message):
    cfg = dp.TrainConfig(model=model, loss=loss)
    with pytest.raises(ConfigError, match=message):
        prepare(cfg, dp.data.load_dataset("mnist1d"))


def test_callables_and_user_losses_train_in_one_process():
    def regressor(input_shape, num_outputs):
        return dp.nn.Sequential(dp.nn.Linear(input_shape[0], 32), dp.nn.GELU(), dp.nn.Linear(32, num_outputs))

    import user_models
    cfg = dp.TrainConfig(dataset="regression", batch_size=100, epochs=15, optimizer="adam", lr=0.01)
    result = dp.train_local(cfg, model=regressor, loss=user_models.smooth_l1_sum)
    first, last = result.metrics["epochs"][0]["test_loss"], result.metrics["epochs"][-1]["test_loss"]
    assert last < 0.5 * first


def test_dropout_is_off_when_evaluating(in_repo):
    cfg = dp.TrainConfig(model=f"{USER}:build", **CNN)
    ds = dp.data.load_dataset("mnist1d")
    replica = dp.loop.Replica(cfg, ds, *prepare(cfg, ds))
    assert replica.evaluation("test") == replica.evaluation("test")  # no random masks
    assert replica.model.training  # and back in train mode after
    a = replica.compute_gradients(np.arange(20), step=0)[0]
    b = replica.compute_gradients(np.arange(20), step=1)[0]  # another step: other masks
    assert a != b and replica.compute_gradients(np.arange(20), step=0)[0] == a


def test_sequence_accuracy_and_loss_are_per_token():
    cfg = dp.TrainConfig(model="transformer", **SORT)
    ds = dp.data.load_dataset("sort")
    replica = dp.loop.Replica(cfg, ds, *prepare(cfg, ds))
    ev = replica.evaluation("test")
    assert 0 <= ev["accuracy"] <= 1 and abs(ev["loss"] - np.log(11)) < 0.7  # about uniform at the start


# --------------------------------------------------------------------------- N workers against one process

@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_user_cnn_with_dropout_n_workers_equal_single_process(ray_local, in_repo, workers):
    # batch 50 over 3 or 4 workers: shards of 17/17/16 and 13/13/12/12
    cfg = dp.TrainConfig(workers=workers, model=f"{USER}:build", **CNN)
    dist, local = dp.Trainer(cfg).fit(), dp.train_local(cfg)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    np.testing.assert_allclose([r["loss"] for r in dist.metrics["steps"]],
                               [r["loss"] for r in local.metrics["steps"]], rtol=1e-10)


@pytest.mark.ray
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_transformer_n_workers_equal_single_process(ray_local, workers):
    import user_models
    cfg = dp.TrainConfig(workers=workers, **SORT)
    dist = dp.Trainer(cfg, model=user_models.small_transformer).fit()
    local = dp.train_local(cfg, model=user_models.small_transformer)
    assert _max_rel_diff(dist.params, local.params) < 1e-10
    assert dist.summary["test_accuracy"] == pytest.approx(local.summary["test_accuracy"], rel=1e-12)


@pytest.mark.ray
@pytest.mark.parametrize("model", [f"{USER}:build", "transformer"])
def test_object_store_transport_with_user_models(ray_local, in_repo, model):
    base = CNN if model.endswith("build") else SORT
    cfg = dp.TrainConfig(workers=3, transport="object_store", model=model, **base)
    trainer = dp.Trainer(cfg)
    dist = trainer.fit()
    assert trainer.shared == []
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10


@pytest.mark.ray
def test_workers_that_build_another_model_are_refused(ray_local, in_repo):
    cfg = dp.TrainConfig(dataset="moons", workers=2, steps=2, batch_size=20, model=f"{USER}:different_on_workers")
    with pytest.raises(ConfigError, match="worker . built another model than the server"):
        dp.Trainer(cfg).fit()


def test_a_text_file_trains_the_transformer(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("the cat sat on the mat. " * 60)
    cfg = dp.TrainConfig(data=str(path), seq_len=16, model="transformer", batch_size=32, steps=40,
                         optimizer="adam", lr=0.01, log_every=40)
    result = dp.train_local(cfg)
    steps = result.metrics["steps"]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]  # a repeated sentence is soon predictable
    assert result.summary["test_accuracy"] > 0.5


@pytest.mark.ray
def test_a_model_file_and_its_helper_module_reach_the_workers(ray_local, tmp_path):
    """The workers cannot import either file (it is not on their path): both travel by value."""
    (tmp_path / "helper_blocks_for_test.py").write_text(
        "from dptrain import nn\n\n\nclass Block(nn.Module):\n    def __init__(self, n_in, n_out):\n"
        "        super().__init__()\n        self.lin = nn.Linear(n_in, n_out)\n\n"
        "    def forward(self, x):\n        return self.lin(x).tanh()\n")
    (tmp_path / "net.py").write_text(
        "from helper_blocks_for_test import Block\nfrom dptrain import nn\n\n\n"
        "def build(input_shape, num_outputs):\n    return nn.Sequential(Block(input_shape[0], 8), "
        "nn.Linear(8, num_outputs))\n")
    cfg = dp.TrainConfig(dataset="moons", model=f"{tmp_path}/net.py:build", workers=2, steps=3, batch_size=20,
                         dtype="float64", seed=1)
    dist = dp.Trainer(cfg).fit()
    assert _max_rel_diff(dist.params, dp.train_local(cfg).params) < 1e-10
    assert list(dist.params) == ["0.lin.weight", "0.lin.bias", "1.weight", "1.bias"]


@pytest.mark.ray
def test_a_tied_embedding_trains_on_workers_checkpoints_and_resumes(ray_local, in_repo, tmp_path):
    """A head tied to the token embedding (user_models.TiedCharModel) through the Trainer: two
    workers give one process's parameters, the checkpoint stores the parameter once, the
    results list it under both names, and a resume from step 4 ends on the same bits."""
    import shutil
    from dptrain import checkpoint
    text = tmp_path / "t.txt"
    text.write_text("to be, or not to be, that is the question: whether 'tis nobler in the mind. " * 40)
    base = dict(data=str(text), seq_len=8, model="tests/user_models.py:build_tied", batch_size=24, steps=12,
                dtype="float64", optimizer="adamw", lr=0.01, weight_decay=0.1, seed=3, log_every=4)
    local = dp.train_local(dp.TrainConfig(**base))
    cfg = dp.TrainConfig(workers=2, out=str(tmp_path / "run"), checkpoint_every=4, keep_checkpoints=5, **base)
    run = dp.Trainer(cfg).fit()
    assert list(run.params) == ["wte.weight", "norm.weight", "lm_head.weight"]
    assert np.array_equal(run.params["wte.weight"], run.params["lm_head.weight"])
    for k in local.params:
        np.testing.assert_allclose(run.params[k], local.params[k], rtol=1e-10, atol=1e-13)
    saved = checkpoint.read(tmp_path / "run" / "checkpoints" / "ckpt-00000004.json")
    assert [name for name, _, _ in saved["layout"]] == ["wte.weight", "norm.weight"]  # stored once
    with np.load(tmp_path / "run" / "params.npz", allow_pickle=False) as params:
        assert sorted(params.files) == ["lm_head.weight", "norm.weight", "wte.weight"]
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "run", again)
    resumed = dp.Trainer(cfg.replace(out=str(again)), resume=True, resume_at_most=4).fit()
    assert resumed.summary["resumed_from_step"] == 4
    for k in run.params:
        assert np.array_equal(resumed.params[k], run.params[k]), k


def test_micro_batches_give_the_same_step_with_less_memory(in_repo):
    """--micro-batch M: a shard in micro-batches of M, gradients added. The same run as without
    (float64, 1e-10, the CNN with dropout: each example keeps its mask), and the step's peak
    memory (numpy's allocations, as tracemalloc sees them) well below the one-pass step's."""
    import tracemalloc
    from dptrain.step import Replica
    cfg = dp.TrainConfig(dataset="mnist1d", model="tests/user_models.py:build", batch_size=50, steps=6,
                         dtype="float64", optimizer="adam", lr=0.01, seed=2)
    whole, micro = dp.train_local(cfg), dp.train_local(cfg.replace(micro_batch=7))
    assert _max_rel_diff(micro.params, whole.params) < 1e-10
    np.testing.assert_allclose([r["loss"] for r in micro.metrics["steps"]],
                               [r["loss"] for r in whole.metrics["steps"]], rtol=1e-10)
    # a batch whose activations (2048 x 512 per layer) outweigh the parameters' gradients: what
    # micro-batches are for; the weight-gradient temporaries of each backward stay
    big = dp.TrainConfig(dataset="mnist1d", model=[40, 512, 512, 10], batch_size=2048, dtype="float64")
    ds = dp.data.load_dataset("mnist1d")
    peaks, grads = {}, {}
    for m in (None, 64):
        factory, loss = prepare(big.replace(micro_batch=m), ds)
        replica = Replica(big.replace(micro_batch=m), ds, factory, loss)
        replica.compute_gradients(np.arange(2048))  # warm: buffers made on first use are not the step's
        tracemalloc.start()
        replica.compute_gradients(np.arange(2048))
        peaks[m] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        grads[m] = replica.flat.grad.copy()
    assert np.abs(grads[64] - grads[None]).max() <= 1e-10 * np.abs(grads[None]).max()
    assert peaks[64] < 0.25 * peaks[None], peaks


def test_an_evaluation_plan_is_fixed_seeded_and_bounded():
    """The batches an evaluation runs: the held-out split whole; the training split as many of its
    batches as the held-out one has (not a second pass over it all); --eval-batches K a seeded
    choice of K, the same at every evaluation, another for another seed."""
    from dptrain.step import evaluation_plan
    cfg = dp.TrainConfig(dataset="moons", eval_batch_size=10)
    whole = evaluation_plan(cfg, "test", 95, 95)
    assert whole == [(a, min(a + 10, 95)) for a in range(0, 95, 10)]  # every example once, in order
    train = evaluation_plan(cfg, "train", 1000, 95)
    assert len(train) == 10 and train == sorted(train) and all(b - a == 10 for a, b in train)
    assert train == evaluation_plan(cfg, "train", 1000, 95)
    some = evaluation_plan(cfg.replace(eval_batches=3), "test", 95, 95)
    assert len(some) == 3 and set(some) < set(whole) and some == evaluation_plan(cfg.replace(eval_batches=3), "test", 95, 95)
    assert some != evaluation_plan(cfg.replace(eval_batches=3, seed=1), "test", 95, 95)
    assert evaluation_plan(cfg.replace(eval_batches=30), "test", 95, 95) == whole  # more than there are: all
    assert evaluation_plan(cfg.replace(eval_batches=3), "test", 95, 95, final=True) == whole  # the final figure
    assert len(evaluation_plan(cfg.replace(eval_batches=3), "train", 1000, 95, final=True)) == 3



def test_the_builtin_gpt_is_nanogpts_architecture():
    """--model gpt: no biases, the head tied to the token embedding (one parameter, two names),
    GPT-2's initialisation (0.02; the residual projections 0.02 / sqrt(2 layers))."""
    from dptrain.models import GPT
    dp.manual_seed(0)
    model = GPT(vocab=65, block=64, n_layer=4, n_head=4, n_embd=128)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names) and "head.weight" not in names  # stored once
    assert model.state_dict()["head.weight"] is not None and model.head.weight is model.tok_emb.weight
    assert sum(p.data.size for p in model.parameters()) - 64 * 128 == 795_904  # nanoGPT's 0.80M
    std = {n: float(p.data.std()) for n, p in model.named_parameters()}
    assert std["tok_emb.weight"] == pytest.approx(0.02, rel=0.02)
    assert std["blocks.0.linear2.weight"] == pytest.approx(0.02 / np.sqrt(8), rel=0.05)
    assert std["blocks.3.self_attn.out_proj.weight"] == pytest.approx(0.02 / np.sqrt(8), rel=0.05)
    assert std["blocks.0.linear1.weight"] == pytest.approx(0.02, rel=0.05)
    assert model(np.zeros((2, 10), dtype=np.int64)).shape == (2, 10, 65)
    with pytest.raises(ValueError, match="sequences of 65 tokens, the model was built for 64"):
        model(np.zeros((1, 65), dtype=np.int64))


def test_sample_is_deterministic_for_a_seed_and_refuses_bad_input(tmp_path):
    """dptrain sample over a run folder made by hand (config.json, vocab.json, params.npz): the
    same seed, the same text; bad input is one line naming it, exit 2."""
    import subprocess
    import sys
    from dptrain.rundir import RunDir
    from dptrain.sample import sample
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    cfg = dp.TrainConfig(data=str(text), seq_len=8, model="gpt", n_layer=1, n_head=2, n_embd=16)
    vocab = "".join(sorted(set(text.read_text())))
    run = RunDir(str(tmp_path / "run"))
    run.open(cfg, vocab=vocab)
    run.close()
    import types
    from dptrain.models import model_factory
    shape = types.SimpleNamespace(input_shape=(8,), num_outputs=len(vocab), num_features=8, task="classification",
                                  name="t")
    model = model_factory(cfg, shape)()
    np.savez(tmp_path / "run" / "params.npz", **model.state_dict())
    a = sample(tmp_path / "run", "the ", tokens=40, seed=1)
    assert len(a) == 40 and set(a) <= set(vocab)
    assert sample(tmp_path / "run", "the ", tokens=40, seed=1) == a
    assert sample(tmp_path / "run", "the ", tokens=40, seed=2) != a
    assert len(sample(tmp_path / "run", "the ", tokens=20, top_k=1, seed=5)) == 20
    other = RunDir(str(tmp_path / "moons"))
    other.open(dp.TrainConfig(dataset="moons"))
    other.close()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dptrain.cli", "sample", *args], capture_output=True, text=True)
    for args, said in [([str(tmp_path)], "is not a run folder (no config.json)"),
                       ([str(tmp_path / "moons")], "is not a text model's run (no vocab.json: it was trained on moons"),
                       ([str(tmp_path / "run"), "--prompt", "THE"], "invalid --prompt: 'THE' (characters outside"),
                       ([str(tmp_path / "run"), "--temperature", "0"], "invalid --temperature: 0.0 (must be > 0)"),
                       ([str(tmp_path / "run"), "--top-k", "0"], "invalid --top-k: 0 (must be >= 1)")]:
        r = cli(*args)
        assert r.returncode == 2 and said in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli(str(tmp_path / "run"), "--prompt", "the ", "--tokens", "40", "--seed", "1")
    assert r.returncode == 0 and r.stdout == "the " + a + "\n"


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_gpt_learns_tiny_shakespeare_well_below_the_unigram_baseline():
    """A short run of the recipe's settings on a smaller gpt (one process): the whole held-out
    split's loss falls well below what the training split's character frequencies give it."""
    cfg = dp.TrainConfig(data=str(SHAKESPEARE), seq_len=32, model="gpt", n_layer=2, n_head=2, n_embd=64,
                         batch_size=16, steps=200, optimizer="adamw", lr=3e-3, betas=[0.9, 0.99],
                         weight_decay=0.1, decay_params="matrices", clip_grad_norm=1.0, schedule="cosine",
                         warmup=20, min_lr=3e-4, eval_batch_size=256, eval_batches=2, seed=1337,
                         log_every=10 ** 9)
    data = dp.data.load_dataset(path=str(SHAKESPEARE), seq_len=32)
    counts = np.bincount(data.y_train.astype(np.int64).ravel(), minlength=data.num_outputs) + 1.0
    unigram = float(-np.log(counts / counts.sum())[data.y_test.astype(np.int64)].mean())
    result = dp.train_local(cfg)
    assert 3.0 < unigram < 3.6  # English letters: about 4.8 bits a character
    assert result.summary["test_loss"] < unigram - 0.6, (result.summary["test_loss"], unigram)
