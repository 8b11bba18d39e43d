"""Training state on disk: the resume point (`train_state.safetensors`: weights, optimizer, scheduler, every rank's
RNG states, the EMA weights with `--ema`, written atomically as data only by edgeseg.datatree: tensors plus a JSON
structure, nothing unpickled when a run resumes), the `last/` and
`best/` checkpoints, the `log.jsonl` of losses and validations, the starting weights of `--init`, and the RNG
bookkeeping that makes a resumed run reach the same weights as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgeseg.errors import ArtifactError, UsageError, one_line
from edgeseg.datatree import load_tree, save_tree
from edgeseg.fileio import atomic_path, write_text
from edgeseg.types import ModelSpec

STATE_FILE = "train_state.safetensors"
LEGACY_STATE_FILE = "train_state.pt"  # a torch.save pickle (before edgeseg.datatree); never loaded
LOG_FILE = "log.jsonl"
CLASS_WEIGHTS_FILE = "class_weights.json"
OUR_OUTPUTS = ("last", "best", STATE_FILE, LEGACY_STATE_FILE, LOG_FILE, CLASS_WEIGHTS_FILE)

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank)]).generate_state(1)[0])


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        with contextlib.suppress(Exception):
            torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)


@dataclasses.dataclass
class Run:
    out: Path
    rank: int
    world: int
    is_main: bool

def prepare_out(out: Path, resume: bool, force: bool) -> Path | None:
    """Check that the run may write into `out` and create it. Returns the topmost folder this call created
    (`out` or one of its parents; None when `out` existed), for `drop_unstarted`."""
    present = [p for p in OUR_OUTPUTS if (out / p).exists()]
    nonempty = out.exists() and any(out.iterdir())
    if resume:
        if not (out / STATE_FILE).is_file() and (out / LEGACY_STATE_FILE).is_file():
            raise UsageError(f"--resume: {out / LEGACY_STATE_FILE} is the older resume format (a pickle, which "
                             "edgeseg no longer loads); start the run again from its last/ checkpoint with --init")
        if not (out / STATE_FILE).is_file():
            raise UsageError(f"--resume: {out / STATE_FILE} not found; nothing to resume")
        return
    if nonempty and not force:
        raise UsageError(f"--out {out}: folder is not empty; pass --resume to continue its run or --force to "
                         f"start over")
    if force:
        import shutil

        for p in present:
            q = out / p
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    top = next((p for p in reversed((out, *out.parents)) if not p.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    return top


def drop_unstarted(out: Path, top: Path) -> None:
    """After a run failed before its first save (a bad --init, bad data, Ctrl-C while loading): remove the
    folders `prepare_out` created for it (`out` up to `top`), which hold at most the log's header line and the
    class-weight cache; anything else in them keeps them."""
    if (out / STATE_FILE).exists() or (out / "last").exists():
        return
    with contextlib.suppress(OSError):
        for name in (LOG_FILE, CLASS_WEIGHTS_FILE):  # the header line; the --class-weights cache
            (out / name).unlink(missing_ok=True)
        for p in (out, *out.parents):
            p.rmdir()  # only if nothing else is in it
            if p == top:
                break

class Saver:
    """Writes `last/`, `best/` and `train_state.safetensors`. With `ema` (edgeseg.train.ema.ModelEma) the checkpoints
    hold the averaged weights and the state holds both."""

    def __init__(self, run: Run, core: nn.Module, optimizer, scheduler, config: dict, spec_base: ModelSpec,
                 ema=None):
        self.run, self.core, self.optimizer, self.scheduler = run, core, optimizer, scheduler
        self.config, self.spec_base, self.ema = config, spec_base, ema

    def _spec(self, metrics: dict | None, step: int, holdout: dict | None = None) -> ModelSpec:
        prov = dict(self.spec_base.provenance)
        prov.update(trained_by="edgeseg train", step=int(step), torch=torch.__version__,
                    **{k: v for k, v in self.config.items() if k not in ("model", "model_kwargs", "input_hw")})
        splits = {k: v for k, v in (("val", metrics), ("holdout", holdout)) if v}
        return dataclasses.replace(self.spec_base, metrics=splits, provenance=prov)

    def save_model(self, which: str, metrics: dict | None, step: int, holdout: dict | None = None) -> None:
        from edgeseg.checkpoint import save_checkpoint

        if self.run.is_main:
            model = self.ema.module if self.ema is not None else self.core
            save_checkpoint(self.run.out / which, model, self._spec(metrics, step, holdout), force=True)

    def save_all(self, step: int, epoch: int, best_miou: float, best_metrics, last_metrics,
                 best_holdout: dict | None = None, last_holdout: dict | None = None) -> None:
        """`last/` first, then `train_state.safetensors` (the resume point), each written atomically. Every rank
        contributes its RNG state; rank 0 writes."""
        rng = rng_state()
        if self.run.world > 1:
            gathered = [None] * self.run.world
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        if not self.run.is_main:
            return
        self.save_model("last", last_metrics, step, last_holdout)
        state = {
            "format": "edgeseg-train-state", "version": 1, "step": int(step), "epoch": int(epoch),
            "model": {k: v.detach().cpu() for k, v in self.core.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": _clean_sched(self.scheduler.state_dict()),
            "rng": rng, "config": self.config, "best_miou": float(best_miou),
            "best_metrics": best_metrics, "last_metrics": last_metrics,
            "best_holdout": best_holdout, "last_holdout": last_holdout,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        with atomic_path(self.run.out / STATE_FILE) as tmp:
            save_tree(tmp, state)


def _clean_sched(sd: dict) -> dict:
    # LambdaLR keeps lr_lambdas (functions: not stored by state_dict, but keep only plain values)
    return {k: v for k, v in sd.items() if k != "lr_lambdas"}


def load_state(path: Path) -> dict:
    """The resume point written by `save_all` (ArtifactError in one line for anything else)."""
    state = load_tree(path)
    if not isinstance(state, dict) or state.get("format") != "edgeseg-train-state":
        raise ArtifactError(f"{path}: not an edgeseg training state")
    return state


def append_log(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()


def truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the saved step (they will be written again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    write_text(path, "".join(k + "\n" for k in keep))


def init_weights(net: nn.Module, src: str | Path) -> list[str]:
    """Load starting weights into `net` from an edgeseg checkpoint folder or an official state-dict file.

    Every tensor must exist in both with the same name (a wrong model is refused, naming the keys). Tensors whose
    shape differs only because the class count differs (classifier, class embedding: e.g. an ADE20K checkpoint
    fine-tuned on CamVid) are left freshly initialised and returned, with a warning.
    """
    from edgeseg.checkpoint import WEIGHTS, load_state_dict_file

    p = Path(src)
    wfile = p / WEIGHTS if p.is_dir() else p
    if p.is_dir() and not wfile.is_file():
        raise UsageError(f"--init {src}: no {WEIGHTS} in that folder (expected an edgeseg checkpoint)")
    state = load_state_dict_file(wfile)
    ref = net.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    if missing or unexpected:
        raise UsageError(f"--init {src}: does not match this model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); use `edgeseg import` for other layouts")
    reset = [k for k in ref if tuple(state[k].shape) != tuple(ref[k].shape)]
    with torch.no_grad():
        for k, v in ref.items():
            if k not in reset:
                v.copy_(state[k].to(v.dtype))
    if reset:
        log.warning("--init %s: %d tensor(s) differ in shape (class count?) and start fresh: %s", src, len(reset),
                    ", ".join(reset[:6]) + (" ..." if len(reset) > 6 else ""))
    return reset
