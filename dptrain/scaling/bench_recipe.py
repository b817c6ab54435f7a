"""nanoGPT's Shakespeare character recipe on dptrain (1 and 2 workers) beside the same model in PyTorch.

    dptrain bench --recipe --torch-python VENV/bin/python     # writes benchmarks/recipe.json
    dptrain bench --recipe --steps 200 --runs dptrain:2       # a shorter look at one side
    ../shared/peers/setup.sh                                  # once: a venv with PyTorch (CPU)

The recipe (nanoGPT's README, CPU): 4 layers, 4 heads, 128 wide, 64 characters of context,
batch 12, 2,000 steps of AdamW at 1e-3 (beta2 0.99, weight decay 0.1 on matrices only),
gradients clipped at norm 1, 100 warm-up steps and a cosine to 1e-4, no dropout, no
biases, the head tied to the embedding; 20 batches of each split evaluated every 250 steps.
Both sides train on the same windows of the text (--text, by default
../shared/data/tinyshakespeare.txt beside the checkout) in the same order (dptrain's
sampler) and report the held-out loss of the whole held-out split at the end. The PyTorch
side is written here (torch.nn, eager, 1 and 2 threads), not nanoGPT's file. Each run is
a process of its own with BLAS on one thread (PyTorch sets its own threads); one JSON
line per run, all of them in --out, and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .bench import BLAS_THREADS, write_results

ROOT = Path(__file__).resolve().parents[2]  # the checkout: dptrain/scaling/ is two below it
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WARMUP_STEPS = 20  # left out of each run's median step (the first steps warm caches and allocators)
RECIPE = dict(seq_len=64, batch_size=12, n_layer=4, n_head=4, n_embd=128, lr=1e-3, betas=(0.9, 0.99),
              weight_decay=0.1, clip=1.0, warmup=100, min_lr=1e-4, eval_every=250, eval_batches=20, seed=1337)


def dptrain_run(steps: int, workers: int, text: Path = TEXT) -> dict:
    import dptrain as dp
    r = RECIPE
    cfg = dp.TrainConfig(data=str(text), seq_len=r["seq_len"], model="gpt", n_layer=r["n_layer"], n_head=r["n_head"],
                         n_embd=r["n_embd"], batch_size=r["batch_size"], steps=steps, optimizer="adamw", lr=r["lr"],
                         betas=list(r["betas"]), weight_decay=r["weight_decay"], decay_params="matrices",
                         clip_grad_norm=r["clip"], schedule="cosine", warmup=r["warmup"], min_lr=r["min_lr"],
                         eval_every=r["eval_every"], eval_batches=r["eval_batches"], eval_batch_size=r["batch_size"],
                         seed=r["seed"], workers=workers, log_every=10 ** 9)
    t0 = time.perf_counter()
    if workers == 0:
        result = dp.train_local(cfg)
    else:
        result = dp.Trainer(cfg).fit()
    wall = time.perf_counter() - t0
    s = result.summary
    times = [rec["time_s"] for rec in result.metrics["steps"][WARMUP_STEPS:]]
    return {"bench": "recipe", "impl": "dptrain", "workers": workers, "steps": steps, "wall_s": round(wall, 2),
            "median_step_ms": round(1e3 * statistics.median(times), 2), "eval_s": round(s["eval_s"], 2),
            "test_loss": round(s["test_loss"], 4), "train_loss_estimate": round(s["train_loss"], 4),
            **{k: round(s[k], 2) for k in ("ray_init_s", "startup_s") if s.get(k) is not None}}


def torch_run(steps: int, threads: int, text: Path = TEXT) -> dict:
    import numpy as np
    import torch
    import torch.nn as nn
    from torch.nn import functional as F

    import dptrain as dp
    torch.set_num_threads(threads)
    r = RECIPE
    data = dp.data.load_dataset(path=str(text), seq_len=r["seq_len"])
    vocab = data.num_outputs
    torch.manual_seed(r["seed"])

    class Block(nn.Module):
        def __init__(self, d, h):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
            self.attn, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
            self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
            self.h = h

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.attn(self.ln1(x)).split(d, dim=2)
            q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(b, t, d)
            x = x + self.proj(y)
            return x + self.out(F.gelu(self.fc(self.ln2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            d = r["n_embd"]
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(r["seq_len"], d)
            self.blocks = nn.ModuleList([Block(d, r["n_head"]) for _ in range(r["n_layer"])])
            self.ln = nn.LayerNorm(d, bias=False)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.wte.weight
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * r["n_layer"]) if name.endswith(("proj.weight", "out.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=r["lr"], betas=r["betas"], foreach=False)
    schedule = dp.optim.Schedule("cosine", r["lr"], total_steps=steps, warmup_steps=r["warmup"], min_lr=r["min_lr"])
    sampler = dp.data.BatchSampler(len(data), r["batch_size"], r["seed"])
    x_train, y_train = torch.from_numpy(data.x_train.astype(np.int64)), torch.from_numpy(data.y_train.astype(np.int64))
    x_test, y_test = torch.from_numpy(data.x_test.astype(np.int64)), torch.from_numpy(data.y_test.astype(np.int64))

    def loss_on(x, y):
        return F.cross_entropy(model(x).view(-1, vocab), y.reshape(-1))

    @torch.no_grad()
    def evaluate(x, y, batches=None):
        model.eval()
        n, bs = len(x), r["batch_size"]
        starts = list(range(0, n, bs))
        if batches is not None:
            starts = sorted(np.random.default_rng(0).choice(starts, size=min(batches, len(starts)), replace=False))
        total = sum(float(loss_on(x[a:a + bs], y[a:a + bs])) * len(x[a:a + bs]) for a in starts)
        model.train()
        return total / sum(len(x[a:a + bs]) for a in starts)

    t0 = time.perf_counter()
    times, eval_s = [], 0.0
    for step in range(steps):
        s0 = time.perf_counter()
        idx = torch.from_numpy(sampler.indices(step).astype(np.int64))
        loss = loss_on(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        for g in opt.param_groups:
            g["lr"] = schedule(step)
        opt.step()
        times.append(time.perf_counter() - s0)
        if (step + 1) % r["eval_every"] == 0:
            e0 = time.perf_counter()
            evaluate(x_train, y_train, r["eval_batches"])
            evaluate(x_test, y_test, r["eval_batches"])
            eval_s += time.perf_counter() - e0
    e0 = time.perf_counter()
    test_loss = evaluate(x_test, y_test)
    eval_s += time.perf_counter() - e0
    wall = time.perf_counter() - t0
    return {"bench": "recipe", "impl": "pytorch", "threads": threads, "torch": torch.__version__, "steps": steps,
            "wall_s": round(wall, 2), "median_step_ms": round(1e3 * statistics.median(times[WARMUP_STEPS:]), 2),
            "eval_s": round(eval_s, 2), "test_loss": round(test_loss, 4)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--steps", type=int, default=2000, help="steps of each run (default: the recipe's 2000)")
    ap.add_argument("--text", default=str(TEXT), help="the text to train on (default: %(default)s)")
    ap.add_argument("--torch-python", default=sys.executable,
                    help="the Python with PyTorch for the PyTorch runs (default: this one)")
    ap.add_argument("--runs", default="pytorch:1,pytorch:2,dptrain:1,dptrain:2",
                    help="which runs (IMPL:THREADS_OR_WORKERS, comma-separated); with --out, the file's other "
                         "runs are kept")


def check_arguments(args) -> str | None:
    """What is wrong with the flags, in one line naming the flag; None when nothing is."""
    if args.steps <= WARMUP_STEPS:
        return (f"--steps must be > {WARMUP_STEPS} (the first {WARMUP_STEPS} are left out of the median step), "
                f"got {args.steps}")
    if not Path(args.text).is_file():
        return f"--text {args.text}: no such file (the recipe trains on Tiny Shakespeare: pass its path)"
    for one in args.runs.split(","):
        impl, _, n = one.partition(":")
        if impl not in ("pytorch", "dptrain") or not n.isdigit() or int(n) < 1:
            return f"--runs: {one!r} is not IMPL:N with IMPL pytorch or dptrain and N >= 1"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    ap.add_argument("--out", default=None, help="write the runs here (JSON)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a single run, in a process of its own
    args = ap.parse_args(argv)
    if args.one:
        impl, n = args.one.split(":")
        run = dptrain_run if impl == "dptrain" else torch_run
        print(json.dumps(run(args.steps, int(n), Path(args.text))))
        return 0
    problem = check_arguments(args)
    if problem:
        print(f"dptrain bench --recipe: {problem}", file=sys.stderr)
        return 2
    rows = []
    env = dict(os.environ, **{v: "1" for v in BLAS_THREADS})
    for one in args.runs.split(","):
        python = sys.executable
        if one.startswith("pytorch"):  # torch sets its own threads; dptrain from this checkout
            run_env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            run_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
            python = args.torch_python
        else:
            run_env = env
        out = subprocess.run([python, "-m", "dptrain.scaling.bench_recipe", "--steps", str(args.steps),
                              "--text", args.text, "--one", one],
                             capture_output=True, text=True, env=run_env)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("{")), None)
        if out.returncode != 0 or line is None:
            print(f"FAILED: {one}\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line))
        print(line, flush=True)
    results = {"command": "dptrain bench --recipe" + (f" --steps {args.steps}" if args.steps != 2000 else ""),
               "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in RECIPE.items()}, "runs": rows}
    if args.out:
        if Path(args.out).exists():  # keep the runs not made again
            def key(row):
                return row["impl"], row.get("workers", row.get("threads"))
            made = {key(row) for row in rows}
            kept = [row for row in json.loads(Path(args.out).read_text())["runs"] if key(row) not in made]
            rows = sorted(kept + rows, key=lambda row: (row["impl"] != "pytorch", key(row)))
            results["runs"] = rows
        write_results(args.out, results)
    print(f"{'run':<14}{'wall s':>9}{'step ms':>10}{'eval s':>9}{'test loss':>11}")
    for row in rows:
        name = f"{row['impl']} {row.get('workers', row.get('threads'))}" + (" w" if row["impl"] == "dptrain" else " t")
        print(f"{name:<14}{row['wall_s']:>9.1f}{row['median_step_ms']:>10.1f}{row['eval_s']:>9.1f}{row['test_loss']:>11.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
