"""Our models vs. torchvision's mobile segmentation peers, side by side in one run: same input size, same
threads, every runtime, fp32 and int8.

Each model (ours: `offseg_t`, `segnext_t_offset` from the shipped CamVid checkpoints; peers:
`lraspp_mobilenet_v3_large`, `deeplabv3_mobilenet_v3_large` from bench/peer_models.py with seeded random weights,
which do not change latency) is saved as an edgeseg checkpoint and exported through edgeseg's own exporters
(`edgeseg.export.export_checkpoint`, each export in its own process so that a converter crash fails only its
row), int8 calibrated on the embedded CamVid frames. Every artifact is then opened in its edgeseg runtime session
and all of them are timed interleaved: each run goes round-robin over every artifact, starting one further along
each time, so CPU frequency, heat and other load hit every model alike. Printed and written: p50/p90 per
model x runtime x precision, GMACs (edgeseg.models.flops), and the ratio of each of ours to the best peer (lowest
p50) on the same runtime and precision (< 1: ours is faster). A step that fails for one model records its
one-line error in the table and JSON, and the run goes on (exit code 1 at the end).

Output contract: by default every artifact ends in a uint8 class map at the input size (`--output argmax`: the
logits are bilinearly upsampled in-graph, then argmax), the same deliverable for every model whatever its own
logits stride (4, 8, 8, 16) and what torchvision's models return; `--output logits` times each model's native
stride logits instead.

    .venv/bin/python bench/peers.py --out runs/peers                      # 384x480, 2 threads, everything
    .venv/bin/python bench/peers.py --input-size 128x160 --runs 3 --targets onnx,openvino \\
        --models lraspp_mobilenet_v3_large,offseg_t --out runs/peers_small --force

Writes DIR/peers.json, DIR/peers.png (latency vs GMAC, one panel per runtime), DIR/table.txt and the export logs
DIR/logs/; the artifacts too with --keep-artifacts. Threads: every runtime is pinned to --threads (ExecuTorch by
resetting XNNPACK's process-wide threadpool), recorded per row.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # peer_models beside this file, also when loaded by path (tests, export children)
    sys.path.insert(0, str(BENCH))

import peer_models  # registers the peers with edgeseg's model registry

log = logging.getLogger("peers")

OURS = ("offseg_t", "segnext_t_offset")
PEERS = peer_models.PEERS
SHIPPED = {"offseg_t": "offseg_t_camvid", "segnext_t_offset": "segnext_t_offset_camvid"}
DEFAULT_SITE = BENCH.parent / ".bench-site"
DEFAULT_TARGETS = ("onnx", "openvino", "executorch-xnnpack", "litert")
DEFAULT_PRECISIONS = ("fp32", "int8")
SEED = 0


from edgeseg.errors import describe as one_line  # noqa: E402  (an error as one table line)


def _csv(values: Sequence[str] | None) -> list[str]:
    """`--x a,b c` -> ["a", "b", "c"] (comma- or space-separated)."""
    return [v for item in values or () for v in item.split(",") if v]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def make_checkpoint(name: str, folder: Path, input_hw: tuple[int, int], weights: str,
                    num_classes: int | None = None) -> tuple[Path, str]:
    """The checkpoint of model `name`: the shipped one (ours, weights="shipped", CamVid's 11 classes) or a seeded
    random one saved in `folder` (CamVid's classes, or `num_classes` generic ones, e.g. 150 as ADE20K's official
    checkpoints). Returns (checkpoint folder, description of its weights)."""
    import torch

    from edgeseg.checkpoint import save_checkpoint
    from edgeseg.data.datasets import CAMVID_INFO
    from edgeseg.data.embedded import assets_dir
    from edgeseg.models import create_model
    from edgeseg.types import ModelSpec

    camvid = num_classes in (None, CAMVID_INFO.num_classes)
    if weights == "shipped" and name in SHIPPED and camvid:
        ckpt = assets_dir() / "checkpoints" / SHIPPED[name]
        if (ckpt / "model.safetensors").is_file() and (ckpt / "model.json").is_file():
            return ckpt, f"shipped {SHIPPED[name]}"
    torch.manual_seed(SEED)
    n = CAMVID_INFO.num_classes if camvid else int(num_classes)
    names = CAMVID_INFO.class_names if camvid else tuple(f"class_{i}" for i in range(n))
    palette = CAMVID_INFO.palette if camvid else tuple(((37 * i) % 256, (91 * i) % 256, (173 * i) % 256)
                                                       for i in range(n))
    model = create_model(name, num_classes=n).eval()
    spec = ModelSpec(model=name, num_classes=n, class_names=names,
                     palette=palette, ignore_index=CAMVID_INFO.ignore_index, input_hw=tuple(input_hw),
                     provenance={"weights": f"random (torch.manual_seed({SEED}))", "by": "bench/peers.py"})
    return save_checkpoint(folder / name, model, spec), f"random (seed {SEED})"


def model_cost(checkpoint: Path, input_hw: tuple[int, int]) -> dict[str, Any]:
    """{params, gmac_total, gmac_conv, gmac_matmul} of the checkpoint's model at `input_hw` (edgeseg.models.flops,
    on the meta device where the model allows it)."""
    from edgeseg.checkpoint import load_spec
    from edgeseg.models.flops import count_registered

    spec = load_spec(checkpoint)
    c = count_registered(spec.model, spec.num_classes, [input_hw], **spec.model_kwargs)[0]
    return {k: c[k] for k in ("params", "gmac_total", "gmac_conv", "gmac_matmul")}


# ----------------------------------------------------------------------------------------------------------------
# Exports, each in its own process
# ----------------------------------------------------------------------------------------------------------------
def _export_child(request: str) -> None:
    """Child process of `export_isolated`: one export_checkpoint call; the result (artifact folder or the one-line
    error) goes to the request's result file."""
    req = json.loads(Path(request).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(int(req["threads"]))
    try:
        from edgeseg.export import export_checkpoint

        out = export_checkpoint(req["checkpoint"], req["target"], req["precision"], input_hw=tuple(req["input_hw"]),
                                out=req["out"], force=True, progress=False, **req["options"])
        msg = {"artifact": str(out)}
    except BaseException as e:  # everything goes back to the parent as one line
        log.exception("export failed")
        msg = {"error": one_line(e)}
    Path(req["result"]).write_text(json.dumps(msg))


def export_isolated(checkpoint: Path, target: str, precision: str, input_hw: tuple[int, int], out: Path,
                    log_file: Path, threads: int, options: dict[str, Any], timeout: float | None) -> Path:
    """Export in a fresh Python process (which imports this file, so the peers are registered there too).
    Its log goes to `log_file`. Raises ArtifactError with the child's one-line error, or naming the signal that
    killed it or the timeout."""
    from edgeseg.errors import ArtifactError

    with tempfile.TemporaryDirectory(prefix="peers-export-") as d:
        req, res = Path(d) / "request.json", Path(d) / "result.json"
        req.write_text(json.dumps({"checkpoint": str(checkpoint), "target": target, "precision": precision,
                                   "input_hw": list(input_hw), "out": str(out), "threads": threads,
                                   "options": options, "result": str(res)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import peers; peers._export_child(sys.argv[2])")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as logf:
            try:
                proc = subprocess.run([sys.executable, "-c", code, str(BENCH), str(req)], stdin=subprocess.DEVNULL,
                                      check=False, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ArtifactError(f"export timed out after {timeout:.0f} s (--export-timeout)") from None
        msg = json.loads(res.read_text()) if res.is_file() else None
    if msg is None:
        rc = proc.returncode
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        raise ArtifactError(f"the export process crashed ({how}) without an error message; log: {log_file}")
    if "error" in msg:
        raise ArtifactError(msg["error"])
    return Path(msg["artifact"])


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def bench_input(session, image_rgb: np.ndarray) -> np.ndarray:
    """One real frame at the artifact's input size in its input contract (normalised on the host, or uint8)."""
    import cv2

    h, w = session.input_hw
    img = cv2.resize(image_rgb, (w, h), interpolation=cv2.INTER_LINEAR) if image_rgb.shape[:2] != (h, w) \
        else image_rgb
    mean = np.asarray(session.manifest.mean, np.float32)
    std = np.asarray(session.manifest.std, np.float32)
    x = ((img.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None]
    return session.to_input(x)


def time_interleaved(rows: list[dict[str, Any]], sessions: dict[int, Any], inputs: dict[int, np.ndarray],
                     warmup: int, runs: int, progress: bool) -> dict[int, list[float]]:
    """Round-robin `Session.run` over every open session per run, starting one further along each run; returns
    latencies (ms) per row index. A session that raises is closed, its row marked FAILED, and the rest go on."""
    from tqdm import tqdm

    live = list(sessions)
    times: dict[int, list[float]] = {i: [] for i in live}
    for r in tqdm(range(warmup + runs), desc="timing (interleaved)", unit="run", disable=not progress):
        if not live:
            break
        k = r % len(live)
        for i in live[k:] + live[:k]:
            try:
                t0 = time.perf_counter()
                sessions[i].run(inputs[i])
                dt = (time.perf_counter() - t0) * 1e3
            except Exception as e:  # noqa: BLE001 - this row fails, the others keep running
                rows[i].update(status="FAILED", stage="run", error=one_line(e))
                sessions.pop(i).close()
                continue
            if r >= warmup:
                times[i].append(dt)
        live = [i for i in live if i in sessions]
    return times


def latency_stats(times_ms: Sequence[float]) -> dict[str, float | int | None]:
    from edgeseg.eval.validate import latency_stats as stats

    return stats(times_ms)


# ----------------------------------------------------------------------------------------------------------------
# Ratios, table, plot
# ----------------------------------------------------------------------------------------------------------------
def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set on each of our rows the ratio to the best peer (lowest p50) and to every peer on the same target and
    precision; return the ratio records."""
    ratios = []
    for r in rows:
        if r["role"] != "ours":
            continue
        peers = [p for p in rows if p["role"] == "peer" and p["status"] == "ok" and p["target"] == r["target"]
                 and p["precision"] == r["precision"]]
        best = min(peers, key=lambda p: p["p50_ms"]) if peers else None
        rec = {"model": r["model"], "target": r["target"], "precision": r["precision"],
               "best_peer": best["model"] if best else None, "ratio_p50_vs_best_peer": None,
               "ratio_p90_vs_best_peer": None, "ratio_p50_vs_peer": {}, "gmac_ratio_vs_best_peer": None}
        if r["status"] == "ok" and best:
            rec["ratio_p50_vs_best_peer"] = r["p50_ms"] / best["p50_ms"]
            rec["ratio_p90_vs_best_peer"] = r["p90_ms"] / best["p90_ms"]
            rec["ratio_p50_vs_peer"] = {p["model"]: r["p50_ms"] / p["p50_ms"] for p in peers}
            if r.get("gmac") and best.get("gmac"):
                rec["gmac_ratio_vs_best_peer"] = r["gmac"] / best["gmac"]
        elif r["status"] != "ok":
            rec["why_none"] = f"{r['model']} did not run on {r['target']} {r['precision']}"
        else:
            rec["why_none"] = f"no peer ran on {r['target']} {r['precision']}"
        r.update({k: rec[k] for k in ("best_peer", "ratio_p50_vs_best_peer", "ratio_p90_vs_best_peer")})
        ratios.append(rec)
    return ratios


def _fmt(v: float | None, spec: str = "8.2f") -> str:
    return format(v, spec) if v is not None else format("-", ">" + spec.split(".")[0])


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    w = max([len(r["model"]) for r in rows] + [5])
    lines = [f"CPU: {result['cpu_summary']}",
             (f"input {result['input_hw'][0]}x{result['input_hw'][1]}, {result.get('num_classes', 11)} classes, "
              f"output {result['output']}, threads "
              f"{result['threads']}, {result['runs']} runs after {result['warmup']} warm-up, interleaved "
              "round-robin over every artifact"),
             (f"{'model':<{w}}  {'role':<4}  {'GMAC':>6}  {'target':<18}  {'prec':<4}  {'p50 ms':>8}  "
              f"{'p90 ms':>8}  ours/best peer p50 (p90)")]
    for r in rows:
        head = f"{r['model']:<{w}}  {r['role']:<4}  {_fmt(r.get('gmac'), '6.2f')}  {r['target']:<18}  " \
               f"{r['precision']:<4}  "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']} ({r.get('stage', '')}): {r.get('error', '')}")
            continue
        tail = ""
        if r["role"] == "ours":
            if r.get("ratio_p50_vs_best_peer") is not None:
                tail = (f"{r['ratio_p50_vs_best_peer']:.2f} ({r['ratio_p90_vs_best_peer']:.2f}) vs "
                        f"{r['best_peer']}")
            else:
                tail = "- (no peer ran here)"
        lines.append(head + f"{_fmt(r['p50_ms'])}  {_fmt(r['p90_ms'])}  {tail}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Latency (p50, bar to p90) vs GMAC, one panel per target; colour per model, marker per precision."""
    ok = [r for r in result["rows"] if r["status"] == "ok" and r.get("gmac")]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from edgeseg.fileio import atomic_file

    targets = list(dict.fromkeys(r["target"] for r in ok))
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 4.4), squeeze=False)
    for ax, t in zip(axes[0], targets):
        for r in (r for r in ok if r["target"] == t):
            ax.errorbar(r["gmac"], r["p50_ms"], yerr=[[0], [max(r["p90_ms"] - r["p50_ms"], 0)]],
                        fmt=markers.get(r["precision"], "o"), color=colours[r["model"]], capsize=3,
                        markerfacecolor="none" if r["role"] == "peer" else colours[r["model"]],
                        label=f"{r['model']} {r['precision']}")
        ax.set_title(t)
        ax.set_xlabel(f"GMAC at {result['input_hw'][0]}x{result['input_hw'][1]}")
        ax.set_ylabel(f"latency ms (p50, bar to p90; {result['threads']} threads)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"ours (filled) vs peers (hollow), {result['cpu_summary']}", fontsize=9)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", default="384x480", metavar="HxW", help="static input size (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="runtime threads (default %(default)s)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per artifact (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default %(default)s)")
    ap.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="T",
                    help=f"targets, comma- or space-separated (default {','.join(DEFAULT_TARGETS)})")
    ap.add_argument("--precisions", nargs="+", default=list(DEFAULT_PRECISIONS), metavar="P",
                    help=f"precisions (default {','.join(DEFAULT_PRECISIONS)}); each target runs those its profile "
                         "supports")
    ap.add_argument("--models", nargs="+", default=None, metavar="M",
                    help=f"registered model names (default {','.join(OURS + PEERS)}, yolo26n_sem only where "
                         f"ultralytics imports); the peers are {', '.join(PEERS)}, any other model counts as ours")
    ap.add_argument("--ultralytics-site", default=str(DEFAULT_SITE), metavar="DIR",
                    help="folder holding ultralytics for the yolo26n_sem peer, installed there for the benchmark "
                         f"only: {peer_models.ULTRALYTICS_INSTALL} (default %(default)s, used if it exists)")
    ap.add_argument("--weights", choices=("shipped", "random"), default="shipped",
                    help="our models' weights: the shipped CamVid checkpoints, or seeded random (peers: always "
                         "random)")
    ap.add_argument("--num-classes", type=int, default=None, metavar="K",
                    help="classes of every model (default: CamVid's 11; another count, e.g. 150 as the official "
                         "ADE20K checkpoints, gives every model seeded random weights)")
    ap.add_argument("--output", choices=("argmax", "logits"), default="argmax",
                    help="artifact output: uint8 class map at input size (same for every model; default) or each "
                         "model's native-stride logits")
    ap.add_argument("--calib-count", type=int, default=8, help="int8 calibration images (embedded CamVid frames; "
                                                               "default %(default)s)")
    ap.add_argument("--export-timeout", type=float, default=1800, metavar="S",
                    help="seconds one export may take (default %(default)s)")
    ap.add_argument("--out", required=True, metavar="DIR", help="output folder")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out")
    ap.add_argument("--keep-artifacts", action="store_true", help="keep the exported artifacts in DIR/artifacts")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _check_args(args) -> tuple[tuple[int, int], list[str], list[str], list[str]]:
    from edgeseg.cli_args import parse_hw
    from edgeseg.errors import UsageError
    from edgeseg.export import TARGETS
    from edgeseg.models import list_models

    hw = parse_hw(args.input_size, "--input-size", multiple_of=32)
    use_ultralytics_site(args.ultralytics_site, required=args.ultralytics_site != str(DEFAULT_SITE))
    if args.models is None:
        args.models = [m for m in OURS + PEERS if m != "yolo26n_sem" or peer_models.ultralytics_available()]
        if "yolo26n_sem" not in args.models:
            log.warning("yolo26n_sem left out: ultralytics is not importable (%s)", peer_models.ULTRALYTICS_INSTALL)
    if args.num_classes is not None and args.num_classes < 2:
        raise UsageError("--num-classes: must be at least 2")
    for flag in ("threads", "runs", "calib_count"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be at least 1")
    if args.warmup < 0:
        raise UsageError("--warmup: must be at least 0")
    targets, precisions, models = _csv(args.targets), _csv(args.precisions), _csv(args.models)
    for t in targets:
        if t not in TARGETS:
            raise UsageError(f"--targets: unknown target {t!r}; known: {', '.join(sorted(TARGETS))}")
    for p in precisions:
        if p not in ("fp32", "fp16", "int8"):
            raise UsageError(f"--precisions: unknown precision {p!r} (fp32, fp16, int8)")
    for m in models:
        if m not in list_models():
            raise UsageError(f"--models: unknown model {m!r}; known: {', '.join(list_models())}")
    if not (targets and precisions and models):
        raise UsageError("--targets, --precisions and --models: at least one each")
    return hw, list(dict.fromkeys(targets)), list(dict.fromkeys(precisions)), list(dict.fromkeys(models))


def use_ultralytics_site(site: str | None, required: bool = False) -> None:
    """Put `site` (a `pip install --target` folder with ultralytics) on this process's path and on the export
    children's PYTHONPATH. A folder named on the command line must exist; the default one is used if it does."""
    from edgeseg.errors import UsageError

    if not site:
        return
    path = Path(site).resolve()
    if not path.is_dir():
        if required:
            raise UsageError(f"--ultralytics-site: {site} is not a folder")
        return
    if str(path) not in sys.path:
        sys.path.append(str(path))  # after the venv's own packages: the site only adds what they lack
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(path) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + [str(path)])


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("edgeseg", "torch", "onnxruntime", "openvino", "nncf", "executorch", "ultralytics"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run(args) -> dict[str, Any]:
    """The whole benchmark; writes args.out and returns the result record."""
    import torch
    from tqdm import tqdm

    from edgeseg.cpu import host_cpu
    from edgeseg.export.profiles import load_profile
    from edgeseg.fileio import atomic_dir, write_json, write_text
    from edgeseg.quant.calibration import default_images
    from edgeseg.runtime import open_session

    t_start = time.perf_counter()
    hw, targets, precisions, models = _check_args(args)
    progress = not args.no_progress
    torch.set_num_threads(args.threads)
    cpu = host_cpu()
    out = Path(args.out)
    with atomic_dir(out, force=args.force) as tmp, tempfile.TemporaryDirectory(prefix="peers-work-") as work:
        work = Path(work)
        art_root = tmp / "artifacts" if args.keep_artifacts else work / "artifacts"

        # 1. checkpoints and their cost
        ckpts, info = {}, {}
        for m in models:
            role = "peer" if m in PEERS else "ours"
            try:
                ckpts[m], weights = make_checkpoint(m, work / "checkpoints", hw, args.weights, args.num_classes)
                info[m] = {"role": role, "weights": weights,
                           "checkpoint": str(ckpts[m]) if weights.startswith("shipped") else None}
            except Exception as e:  # noqa: BLE001 - the model's rows all fail with this line
                info[m] = {"role": role, "error": one_line(e)}
                continue
            try:
                info[m].update(model_cost(ckpts[m], hw))
            except Exception as e:  # noqa: BLE001 - latency still runs; GMAC stays unknown
                info[m]["gmac_error"] = one_line(e)

        # 2. exports (one process each), rows in model x target x precision order
        rows: list[dict[str, Any]] = []
        jobs = []
        for m in models:
            for t in targets:
                prof_precisions = load_profile(t).precisions
                for p in precisions:
                    row = {"model": m, "role": info[m]["role"], "target": t, "precision": p,
                           "gmac": info[m].get("gmac_total"), "params": info[m].get("params"),
                           "thread_control": load_profile(t).thread_control, "status": "ok"}
                    if p not in prof_precisions:
                        row.update(status="skipped", stage="export",
                                   error=f"the {t} profile supports only {', '.join(prof_precisions)}")
                    elif m not in ckpts:
                        row.update(status="FAILED", stage="checkpoint", error=info[m]["error"])
                    else:
                        jobs.append(len(rows))
                    rows.append(row)
        options = {"calib_count": args.calib_count, "output": args.output, "num_threads": args.threads}
        artifacts: dict[int, Path] = {}
        bar = tqdm(jobs, desc="exporting", unit="artifact", disable=not progress)
        for i in bar:
            r = rows[i]
            name = f"{r['model']}-{r['target']}-{r['precision']}"
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            try:
                artifacts[i] = export_isolated(ckpts[r["model"]], r["target"], r["precision"], hw, art_root / name,
                                               tmp / "logs" / f"{name}.log", args.threads, options,
                                               args.export_timeout)
            except Exception as e:  # noqa: BLE001 - this row fails, the rest go on
                r.update(status="FAILED", stage="export", error=one_line(e))
            r["export_seconds"] = round(time.perf_counter() - t0, 1)
            if r["status"] != "ok":
                tqdm.write(f"{name}: export FAILED: {r['error']}")

        # 3. open every artifact, one real frame each in its input contract
        frames, _, frame_source = default_images(1)
        sessions, inputs = {}, {}
        for i, path in artifacts.items():
            r = rows[i]
            try:
                s = open_session(path, num_threads=args.threads)
                if not s.executes_here:
                    s.close()
                    r.update(status="not run", stage="open", error="the runtime cannot execute here")
                    continue
                sessions[i], inputs[i] = s, bench_input(s, frames[0])
                r["notes"] = list(s.notes)
                r["quantization"] = getattr(s.manifest, "quantization", None)
                if args.keep_artifacts:
                    r["artifact"] = str(out / path.relative_to(tmp))
            except Exception as e:  # noqa: BLE001
                r.update(status="FAILED", stage="open", error=one_line(e))

        # 4. time them interleaved
        try:
            times = time_interleaved(rows, sessions, inputs, args.warmup, args.runs, progress)
        finally:
            for s in sessions.values():
                s.close()
        for i, t in times.items():
            if rows[i]["status"] == "ok":
                st = latency_stats(t)
                rows[i].update(latency_ms=st, p50_ms=st["p50"], p90_ms=st["p90"])

        ratios = add_ratios(rows)
        result = {
            "benchmark": "bench/peers.py", "cpu": cpu.to_json(), "cpu_summary": cpu.summary(),
            "input_hw": list(hw), "num_classes": args.num_classes or 11, "threads": args.threads, "runs": args.runs,
            "warmup": args.warmup, "output": args.output, "timing": "interleaved: every run goes round-robin over every open artifact, "
                                              "starting one further along each run",
            "input": f"one real frame ({frame_source}) resized to the input size",
            "calibration": f"{args.calib_count} embedded CamVid frames (edgeseg default calibration images)",
            "models": info, "targets": targets, "precisions": precisions, "rows": rows, "ratios": ratios,
            "tool_versions": _tool_versions(), "seconds": None,
        }
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        table = format_table(result)
        print(table, flush=True)
        write_text(tmp / "table.txt", table + "\n")
        try:
            png = plot(result, tmp / "peers.png")
            result["plot"] = str(out / png.name) if png else None
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            result["plot"] = None
            result["plot_error"] = one_line(e)
        write_json(tmp / "peers.json", result)
    print(f"wrote {out}/peers.json, table.txt" + (", peers.png" if result.get("plot") else ""))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from edgeseg.errors import EdgesegError

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except EdgesegError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if any(r["status"] == "FAILED" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
