"""Checkpoints: the server's full state, saved atomically, verified on load, never unpickled.

A checkpoint of step s (s updates applied) is two files in one folder:

    ckpt-00000120.npz   the flat parameters and the optimizer's state arrays
    ckpt-00000120.json  step, the model's layout (every parameter's name, shape and dtype),
                        optimizer scalars, the run's config, and the SHA-256 and size of the .npz

Each is written to a temporary file, flushed, fsynced and renamed; the JSON goes last,
so a checkpoint exists only once both files are whole. The JSON carries a SHA-256 of
its own content too (`meta_sha256`), so an edited step or config is caught like a
corrupted array. Loading checks the JSON's checksum, its step against the file name and
the optimizer's count of updates, the size and checksum of the .npz (np.load with
allow_pickle=False) and the layout; a
damaged checkpoint is skipped in favour of the one before it, a checkpoint of another
model is refused naming the first parameter that differs. (Format 1 recorded an MLP's
widths; it is read as the layout that MLP has.) The sampler needs no state of its own: the batch of step s
is a function of (seed, s).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 2
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, write) -> None:
    """Write `path` whole or not at all: `write(file)` (or bytes) into a temporary file beside it,
    flushed, fsynced and renamed over it. On failure (a full disk) the temporary file is removed
    and the OSError raised; `path` keeps what it held."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk); the message names the file, the step and
    the newest checkpoint still intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(folder, step: int, params: np.ndarray, optimizer_state: dict, layout: list, config: dict,
         keep: int = 3, relaxed: dict | None = None) -> Path:
    """Write the checkpoint of `step` and delete all but the newest `keep`. Returns the JSON path.
    `relaxed`: what a relaxed run had in flight (relaxed.py; a resume computes it again)."""
    folder = Path(folder)
    stem = f"ckpt-{step:08d}"
    npz, meta_path = folder / f"{stem}.npz", folder / f"{stem}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"params": np.asarray(params)}
        for name, arr in optimizer_state["state"].items():
            arrays[f"opt.{name}"] = np.asarray(arr)
        write_atomic(npz, lambda f: np.savez(f, **arrays))
        meta = {"format": FORMAT, "step": step, "layout": layout, "dtype": str(params.dtype),
                "size": int(params.size), "optimizer": {k: v for k, v in optimizer_state.items() if k != "state"},
                "config": config, "npz": npz.name, "npz_bytes": npz.stat().st_size, "npz_sha256": _sha256(npz)}
        if relaxed is not None:
            meta["relaxed"] = relaxed
        meta["meta_sha256"] = _meta_sha256(meta)
        write_atomic(meta_path, (json.dumps(meta, indent=1) + "\n").encode())
        _fsync_dir(folder)
        for old in list_checkpoints(folder)[keep:]:
            for p in (old, old.with_suffix(".npz")):
                p.unlink(missing_ok=True)
    except OSError as e:
        npz.unlink(missing_ok=True)  # without its JSON it is no checkpoint: do not leave it taking space
        kept = list_checkpoints(folder) if folder.is_dir() else []
        last = f"the newest intact one is {kept[0]}" if kept else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"cannot write the checkpoint of step {step} to {folder} "
                                   f"({getattr(e, 'filename', None) or npz}: {e.strerror or e}); {last}") from None
    return meta_path


def _meta_sha256(meta: dict) -> str:
    """SHA-256 of a checkpoint's metadata (all but this checksum), in a canonical JSON form."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def list_checkpoints(folder) -> list:
    """JSON files of the checkpoints in `folder`, newest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def _candidates(folder, max_step: int | None) -> list:
    """Checkpoints in `folder` of at most `max_step` steps (all without it), newest first."""
    return [p for p in list_checkpoints(folder) if max_step is None or int(_NAME.match(p.name).group(1)) <= max_step]


def mlp_layout(dims: list, dtype: str) -> list:
    """The layout of dp.nn.MLP(dims): what a format-1 checkpoint's widths stand for."""
    out = []
    for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
        out += [[f"{2 * i}.weight", [n_out, n_in], dtype], [f"{2 * i}.bias", [n_out], dtype]]
    return out


class ModelMismatch(CheckpointError):
    """The checkpoint is of another model: resuming it would be wrong."""


def _read_meta(meta_path: Path) -> tuple[dict, list]:
    """A checkpoint's verified metadata and the model layout it records: CheckpointError if the JSON
    is unreadable, of an unknown format, edited (its own checksum), or inconsistent (its step
    against its file name and the optimizer's count of updates)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{meta_path}: not a dptrain checkpoint of format 1 or {FORMAT}")
    if meta["format"] == FORMAT and meta.get("meta_sha256") != _meta_sha256(meta):
        raise CheckpointError(f"{meta_path}: metadata checksum mismatch (the file was edited or corrupted)")
    m = _NAME.match(meta_path.name)
    if m and int(m.group(1)) != meta.get("step"):
        raise CheckpointError(f"{meta_path}: says step {meta.get('step')}, its name says {int(m.group(1))}")
    updates = meta.get("optimizer", {}).get("steps")
    if isinstance(updates, int) and updates > meta.get("step", -1):
        raise CheckpointError(f"{meta_path}: the optimizer applied {updates} updates, more than the {meta['step']} "
                              "steps the checkpoint claims")
    try:
        saved = meta["layout"] if meta["format"] == FORMAT else mlp_layout(meta["dims"], meta["dtype"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: no model layout ({type(e).__name__}: {e})") from None
    return meta, saved


def _check_layout(meta_path: Path, saved: list, layout: list) -> None:
    from .models import first_difference
    diff = first_difference(saved, layout)
    if diff is not None:
        raise ModelMismatch(f"{meta_path}: a checkpoint of another model than this run's: {diff} "
                            "(checkpoint first, this run second)")


def read(meta_path, layout: list | None = None, dtype: str | None = None) -> dict:
    """A verified checkpoint: {"step", "params", "optimizer" (state_dict form), "config", "layout", ...}.

    With `layout` (see dptrain.models.layout) a checkpoint of another model raises ModelMismatch."""
    meta_path = Path(meta_path)
    meta, saved = _read_meta(meta_path)
    if layout is not None:
        _check_layout(meta_path, saved, layout)
    if dtype is not None and meta["dtype"] != dtype:
        raise ModelMismatch(f"{meta_path}: a {meta['dtype']} checkpoint, this run is {dtype}")
    npz = meta_path.with_name(meta["npz"])
    if not npz.is_file():
        raise CheckpointError(f"{npz}: missing (the checkpoint is incomplete)")
    if npz.stat().st_size != meta["npz_bytes"]:
        raise CheckpointError(f"{npz}: {npz.stat().st_size} bytes, {meta['npz_bytes']} expected (truncated?)")
    if _sha256(npz) != meta["npz_sha256"]:
        raise CheckpointError(f"{npz}: checksum mismatch (the file is corrupted)")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise CheckpointError(f"{npz}: unreadable ({type(e).__name__}: {e})") from None
    params = arrays.pop("params", None)
    if params is None or params.shape != (meta["size"],):
        raise CheckpointError(f"{npz}: no parameters of size {meta['size']}")
    optimizer = dict(meta["optimizer"], state={k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
    return {"step": int(meta["step"]), "params": params, "optimizer": optimizer, "config": meta["config"],
            "layout": saved, "path": str(meta_path)}


# what makes a run's arithmetic (workers and placement do not)
RUN_FIELDS = ("dataset", "data", "label", "features", "seq_len", "token_dtype", "vocab_size", "model", "loss", "activation", "n_layer", "n_head", "n_embd",
              "dropout", "batch_size", "epochs", "steps",
              "lr", "optimizer", "momentum", "nesterov", "weight_decay", "decay_params", "betas", "eps", "schedule",
              "warmup", "step_size", "gamma", "min_lr", "clip_grad_norm", "seed", "dtype", "staleness",
              "backup_workers", "compress")


class RunMismatch(CheckpointError):
    """The checkpoint was written by another run than the one resuming it."""


def check_run(folder, config: dict, layout: list, total_steps: int, max_step: int | None = None) -> None:
    """Raise ModelMismatch or RunMismatch unless the checkpoint a resume would restore (the newest
    intact one in `folder`, of at most `max_step` steps) belongs to this run: the same model layout,
    the same settings (RUN_FIELDS), a step within its total. Reads the JSON only (cheap enough for
    the driver to ask before any actor starts)."""
    for meta_path in _candidates(folder, max_step):
        try:
            meta, saved = _read_meta(meta_path)
        except CheckpointError:
            continue  # damaged or edited: load_latest reports it and falls back
        _check_layout(meta_path, saved, layout)
        theirs = meta.get("config", {})
        for key in RUN_FIELDS:
            if key in theirs and theirs[key] != config.get(key):
                raise RunMismatch(f"{meta_path}: written by another run ({key} {theirs[key]!r} there, "
                                  f"{config.get(key)!r} here)")
        if meta["step"] > total_steps:
            raise RunMismatch(f"{meta_path}: a checkpoint of step {meta['step']}, beyond this run's {total_steps} steps")
        return


def load_latest(folder, layout: list | None = None, dtype: str | None = None,
                max_step: int | None = None) -> dict | None:
    """The newest intact checkpoint in `folder`, of at most `max_step` steps (None if there is none).

    Damaged ones (truncated, corrupted, incomplete) are reported and skipped; one of
    another model or dtype raises ModelMismatch: resuming it would be wrong.
    """
    for meta_path in _candidates(folder, max_step):
        try:
            return read(meta_path, layout, dtype)
        except ModelMismatch:
            raise
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None
