"""Text from a trained character model: `dptrain sample RUN_DIR --prompt TEXT` and `sample(...)`.

A run on a text file (`--data book.txt`) keeps its vocabulary in the run folder
(`vocab.json`, written by rundir.py). `sample` rebuilds the run's model from its
config.json, loads the final parameters (params.npz) or the newest checkpoint's, and
continues the prompt one character at a time: the logits of the last position of the
last `--seq-len` characters, divided by the temperature, cut to the `top_k` most likely,
sampled from a generator seeded with `seed` (the same text for the same seed).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np

from .config import ConfigError, TrainConfig

VOCAB = "vocab.json"


def load_run(folder) -> tuple[TrainConfig, str]:
    """(the run's config, its vocabulary); ConfigError naming what is missing."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"invalid run: {path} is not a run folder (no config.json)", field=None)
    try:
        cfg = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid run: {path / 'config.json'} is not a run's config ({e})", field=None) from None
    if not (path / VOCAB).is_file():
        raise ConfigError(f"invalid run: {path} is not a text model's run (no {VOCAB}: it was trained on "
                          f"{cfg.data or cfg.dataset}, not a .txt file)", field=None)
    return cfg, json.loads((path / VOCAB).read_text())["vocab"]


def build_model(folder, checkpoint: bool = False):
    """(model in eval mode with the run's final parameters, or its newest checkpoint's, config, vocab)."""
    from . import checkpoint as ckpt
    from .models import layout, model_factory
    path = Path(folder)
    cfg, vocab = load_run(path)
    shape = types.SimpleNamespace(input_shape=(cfg.seq_len,), num_outputs=len(vocab), num_features=cfg.seq_len,
                                  task="classification", name=str(cfg.data))
    model = model_factory(cfg.replace(device="cpu"), shape)()
    if checkpoint:
        state = ckpt.load_latest(path / "checkpoints", layout(model), cfg.dtype)
        if state is None:
            raise ConfigError(f"invalid run: no intact checkpoint in {path / 'checkpoints'}", field=None)
        model.flat().data[...] = state["params"]
    else:
        if not (path / "params.npz").is_file():
            raise ConfigError(f"invalid run: {path} has no params.npz (not finished? --checkpoint samples the "
                              "newest checkpoint)", field=None)
        with np.load(path / "params.npz", allow_pickle=False) as params:
            model.load_state_dict({k: params[k] for k in params.files})
    model.eval()
    return model, cfg, vocab


def sample(folder, prompt: str = "\n", tokens: int = 500, temperature: float = 1.0, top_k: int | None = None,
           seed: int = 0, checkpoint: bool = False) -> str:
    """`tokens` characters continuing `prompt`, from the run in `folder` (see the module's docstring)."""
    from .tensor import Tensor, no_grad
    if tokens < 1:
        raise ConfigError(f"invalid tokens: {tokens} (must be >= 1)", field="tokens")
    if not temperature > 0:
        raise ConfigError(f"invalid temperature: {temperature} (must be > 0)", field="temperature")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"invalid top_k: {top_k} (must be >= 1)", field="top_k")
    model, cfg, vocab = build_model(folder, checkpoint)
    lookup = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in prompt if c not in lookup})
    if not prompt:
        raise ConfigError("invalid prompt: '' (empty: give at least one character)", field="prompt")
    if unknown:
        raise ConfigError(f"invalid prompt: {prompt!r} (characters outside the run's vocabulary: "
                          f"{', '.join(map(repr, unknown))})", field="prompt")
    ids = [lookup[c] for c in prompt]
    rng = np.random.default_rng(seed)
    out = []
    with no_grad():
        for _ in range(tokens):
            context = np.asarray([ids[-cfg.seq_len:]])
            logits = np.asarray(model(Tensor(context)).data[0, -1], dtype=np.float64) / temperature
            if top_k is not None and top_k < len(logits):
                cut = np.partition(logits, -top_k)[-top_k]
                logits = np.where(logits < cut, -np.inf, logits)
            p = np.exp(logits - logits.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
            ids.append(nxt)
            out.append(vocab[nxt])
    return "".join(out)


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="print text from a trained character model (a run on a .txt file)",
                       description="Continue a prompt with the model of a finished run on a text file: its "
                                   "final parameters (or, with --checkpoint, its newest checkpoint's).")
    p.add_argument("run", metavar="RUN_DIR", help="the run's folder (--out of dptrain train)")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=500, metavar="N", help="characters to generate (default: 500)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default: 1)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely only")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seeds the sampling (default: 0)")
    p.add_argument("--checkpoint", action="store_true", help="use the newest checkpoint, not params.npz")


def run(args) -> int:
    print(args.prompt + sample(args.run, args.prompt, args.tokens, args.temperature, args.top_k, args.seed,
                               args.checkpoint))
    return 0
