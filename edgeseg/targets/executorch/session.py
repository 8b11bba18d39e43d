"""ExecuTorch session: runs a `.pte` through the ExecuTorch Python runtime (Runtime -> Program -> Method.execute),
with the XNNPACK delegate built into the installed executorch wheel; and its op profile (`profile_ops`) from an
ETDump of the same program.

The program is loaded from the bytes checked against the manifest's sha256. A malformed program can abort the
ExecuTorch runtime (a C++ `terminate`, not a Python exception), so each program is first loaded and run once in a
child process (`probe_program`, once per program and process): a crash there is one error line, not the end of
the command.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import INSERTED, UNKNOWN, Session, artifact_of

# written beside the .pte by the ExecuTorch exporter: the op (and module path) of each program instruction, and the
# ops of each delegate call in graph order, so that ETDump events can be rolled up to model parts without an ETRecord
DEBUG_MAP = "debug_map.json"

# XNNPACK operator kind (the ETDump event name up to " (" or " #") -> the edge ops it can come from, for matching
# a delegate's runtime operators to its delegated graph in order
_XNN_KINDS: dict[str, tuple[str, ...]] = {
    "Convolution": ("convolution",), "Deconvolution": ("convolution",),
    "Fully Connected": ("linear", "addmm", "mm", "convolution"),  # XNNPACK runs 1x1 convolutions as GEMMs "Batch Matrix Multiply": ("bmm", "matmul"),
    "Multiply": ("mul",), "Add": ("add",), "Subtract": ("sub",), "Divide": ("div",), "Square": ("mul", "pow"),
    "Square Root": ("sqrt",), "Reciprocal Square Root": ("rsqrt",), "Softmax": ("softmax",),
    "Sigmoid": ("sigmoid",), "Clamp": ("hardtanh", "relu", "clamp"), "HardSwish": ("hardswish",),
    "GELU": ("gelu",), "Tanh": ("tanh",), "Exp": ("exp",), "Abs": ("abs",), "Negate": ("neg",),
    "Maximum": ("maximum", "max"), "Minimum": ("minimum", "min"), "Mean": ("mean",),
    "Global Average Pooling": ("mean", "avg_pool"), "Average Pooling": ("avg_pool",), "Max Pooling": ("max_pool",),
    "Constant Pad": ("pad",), "Transpose": ("permute", "transpose"), "Concatenate": ("cat",), "Slice": ("slice",),
    "Copy": ("view", "reshape", "clone", "expand", "squeeze", "unsqueeze", "_to_copy"),
    "Resize Bilinear": ("upsample",), "Leaky ReLU": ("leaky",),
}
_MATCH_WINDOW = 64  # delegated ops looked ahead for a runtime operator's source (fused/elided ops are skipped)


PROBE_TIMEOUT_S = 300
_PROBE_ERROR = 3  # the probe's exit code for a Python-level load error (the in-process load then reports it)
_PROBED: set[str] = set()  # sha256 of the programs that loaded and ran in a probe in this process
# the probe: the program (stdin) loaded, its method loaded and run once on zeros; imports the runtime's extension
# directly (`executorch.runtime` would pull in the exporter, seconds more per probe)
_PROBE = """
import sys
import torch
from executorch.extension.pybindings import _C
data = sys.stdin.buffer.read()
try:
    if int(sys.argv[1]) > 0:
        _C._unsafe_reset_threadpool(int(sys.argv[1]))
    method = _C._load_program_from_buffer(data, program_verification=_C.Verification.InternalConsistency
                                          ).load_method("forward")
    meta = method.method_meta()
    dtypes = {0: torch.uint8, 5: torch.float16, 6: torch.float32}
    metas = [meta.input_tensor_meta(i) for i in range(meta.num_inputs())]
    if all(m.dtype() in dtypes for m in metas):
        method.call([torch.zeros(list(m.sizes()), dtype=dtypes[m.dtype()]) for m in metas])
except Exception as e:
    print(type(e).__name__, e, file=sys.stderr)
    sys.exit(%d)
""" % _PROBE_ERROR


def _probe_in_child(data: bytes, num_threads: int | None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(num_threads or 1))
    return subprocess.run([sys.executable, "-c", _PROBE, str(num_threads or 0)], input=data, capture_output=True,
                          env=env, timeout=PROBE_TIMEOUT_S)


def probe_program(model_path: Path, data: bytes, num_threads: int | None = None) -> None:
    """Load and run the program `data` once in a child process (skipped for a program already probed here).

    Raises:
        ArtifactError (one line naming the file): the child crashed (the runtime aborted on the program) or did not
        finish in PROBE_TIMEOUT_S. A Python-level load error in the child is left to the in-process load to report.
    """
    import hashlib
    import signal
    import subprocess

    digest = hashlib.sha256(data).hexdigest()
    if digest in _PROBED:
        return
    try:
        p = _probe_in_child(data, num_threads)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{model_path}: ExecuTorch could not load it (a probe process loading it did not "
                            f"finish in {PROBE_TIMEOUT_S} s)") from None
    if p.returncode == _PROBE_ERROR:
        return
    if p.returncode != 0:
        try:
            how = f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit code {p.returncode}"
        except ValueError:
            how = f"signal {-p.returncode}"
        what = [ln.split("what():", 1)[1].strip() for ln in p.stderr.decode("utf-8", "replace").splitlines()
                if "what():" in ln]
        raise ArtifactError(f"{model_path}: ExecuTorch could not load it: the runtime crashed on it in a probe "
                            f"process ({how}{': ' + what[-1][:160] if what else ''}); the program is corrupt or "
                            "not built for this runtime")
    _PROBED.add(digest)


def set_threads(num_threads: int | None) -> int:
    """Pin the XNNPACK threadpool (process-wide in executorch 1.5.1) to `num_threads`; returns the count in use."""
    from executorch.extension.pybindings import portable_lib

    if num_threads and portable_lib._threadpool_get_thread_count() != int(num_threads):
        portable_lib._unsafe_reset_threadpool(int(num_threads))  # "unsafe" only while another thread runs it
    return int(portable_lib._threadpool_get_thread_count())


class ExecutorchSession(Session):
    """Runs `manifest.model_file` (a .pte). `num_threads` pins XNNPACK's threadpool, which executorch 1.5.1 keeps
    process-wide: the last session opened in a process sets it for all."""

    def _load(self) -> None:
        from edgeseg.artifact import read_hashed

        data = read_hashed(self.path, self.manifest, self.manifest.model_file)
        probe_program(self.model_path, data, self.num_threads)
        from executorch.runtime import Runtime

        try:
            self.threads_in_use = set_threads(self.num_threads)
            self._runtime = Runtime.get()
            self._program = self._runtime.load_program(data)
            self._method = self._program.load_method("forward")
        except Exception as e:  # noqa: BLE001 - runtime failures become one line naming the file
            raise ArtifactError(f"{self.model_path}: ExecuTorch could not load it ({type(e).__name__}: "
                                f"{one_line(e)})") from e

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        out = self._method.execute([torch.from_numpy(x)])
        return out[0].numpy().copy()

    def close(self) -> None:
        self._method = self._program = None


def profile_ops(pte_path: Path, num_threads: int, runs: int, optimize: bool = True
                ) -> tuple[list[tuple[str, str, float]], dict[str, Any]]:
    """Op times from an ETDump of `runs` runs (after one untimed run): [(module path | INSERTED | UNKNOWN, op type,
    total us)]. Operators on portable kernels map to their module path through their instruction; inside an XNNPACK
    delegate call, each XNNPACK operator is matched in order to the delegated op it comes from by kind (a
    convolution to the next delegated convolution, ...), and layout copies XNNPACK adds to the next unmatched op,
    so per-part shares inside a delegate are approximate; the delegate call's own overhead is INSERTED.
    Read by edgeseg.eval.profile; `optimize` has no meaning here."""
    import tempfile
    import time

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    from edgeseg.artifact import read_hashed

    pte_path = Path(pte_path)
    root, manifest = artifact_of(pte_path)
    dmap = json.loads(read_hashed(root, manifest, DEBUG_MAP)) if DEBUG_MAP in manifest.sha256 else None
    data = read_hashed(root, manifest, manifest.model_file)
    probe_program(pte_path, data, num_threads)
    threads = set_threads(num_threads)
    module = portable_lib._load_for_executorch_from_buffer(data, enable_etdump=True, debug_buffer_size=0)
    meta = module.method_meta("forward").input_tensor_meta(0)
    x = torch.zeros(list(meta.sizes()), dtype=torch.uint8 if meta.dtype() == 0 else torch.float32)
    module.forward([x])  # untimed: its events are dropped below
    t0 = time.perf_counter()
    for _ in range(runs):
        module.forward([x])
    wall = (time.perf_counter() - t0) / runs
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(etdump))
        inspector = Inspector(etdump_path=str(etdump))
    events = [ev for block in inspector.event_blocks if block.name == "Execute" for ev in block.events]
    op_times = _attribute(events, dmap, runs)
    return op_times, {"wall_ms": round(1000 * wall, 3), "threads_in_use": threads,
                      "source": "ExecuTorch ETDump (XNNPACK operator events, portable kernel calls) + "
                                + (DEBUG_MAP if dmap else f"no {DEBUG_MAP} in the artifact: no module paths "
                                   "(re-export it with this edgeseg)")}


def _us(ev, runs: int) -> float:
    raw = list(ev.perf_data.raw) if ev.perf_data is not None else []
    return 1000.0 * sum(raw[-runs:])  # ms -> us, the untimed first run left out


def _attribute(events, dmap: dict | None, runs: int) -> list[tuple[str, str, float]]:
    """ETDump events (one Execute block) -> [(path, op type, us)] (see profile_ops)."""
    ops, delegates = (dmap or {}).get("ops", {}), (dmap or {}).get("delegates", {})
    inner: dict[int, list] = {}  # delegate instruction -> its XNNPACK operator events, in execution order
    for ev in events:
        if ev.is_delegated_op and ev.perf_data is not None:
            inner.setdefault(ev._instruction_id, []).append(ev)
    out: list[tuple[str, str, float]] = []
    for ev in events:
        if ev.perf_data is None or ev.is_delegated_op:
            continue
        if ev.name == "DELEGATE_CALL":
            rows = _match_delegate(inner.get(ev._instruction_id, []), delegates.get(str(ev._instruction_id), []),
                                   runs)
            out.extend(rows)
            out.append((INSERTED, "delegate call overhead", max(0.0, _us(ev, runs) - sum(t for *_, t in rows))))
        elif ev.name == "OPERATOR_CALL":  # its `native_call_<op>` child event times the kernel alone
            op, path = ops.get(str(ev._instruction_id), ("op", UNKNOWN))
            name = op.removeprefix("aten.").split(".")[0]  # aten.grid_sampler_2d.out -> grid_sampler_2d
            out.append((path or UNKNOWN, "portable " + name, _us(ev, runs)))
    return out


def _match_delegate(xnn_events, ops: list, runs: int) -> list[tuple[str, str, float]]:
    """Attribute a delegate call's XNNPACK operator events to its delegated ops ([op, path] in graph order).
    Events matching no op kind (XNNPACK's layout transposes, int8 converts) go to the next op that has a path."""
    # quantize / dequantize nodes (half of an int8 delegate's nodes) are fused into XNNPACK's int8 operators or run
    # as its "Convert": leaving them out keeps the look-ahead window on the compute ops
    ops = [o for o in ops if "quantize_per" not in o[0]]
    out = []
    p = 0
    for ev in xnn_events:
        name = ev.name.split(" #")[0]
        wanted = _XNN_KINDS.get(name.split(" (")[0], ())
        j = next((i for i in range(p, min(len(ops), p + _MATCH_WINDOW)) if any(w in ops[i][0] for w in wanted)),
                 None)
        if j is not None:
            p = j + 1
        out.append((_path_near(ops, p - 1 if j is not None else p), "xnnpack " + name, _us(ev, runs)))
    return out


def _path_near(ops: list, i: int) -> str:
    """The module path of ops[i], else of the nearest op after it that has one, else before it."""
    after = (o[1] for o in ops[max(i, 0):] if o[1])
    before = (o[1] for o in reversed(ops[:max(i, 0)]) if o[1])
    return next(after, None) or next(before, None) or UNKNOWN


SESSION = ExecutorchSession


# The artifact folder's run script (edgeseg.export.device_kit writes run_executorch.py around it): a `Runner` on
# the ExecuTorch Python runtime. That runtime's extension links libtorch (executorch 1.5.1), so the script needs
# torch besides executorch and numpy; on the phone itself the .pte runs from C++/Java/Swift (see README.md).
RUN_SCRIPT = '''
RUNTIME = "ExecuTorch"
PACKAGES = ["executorch", "torch"]  # pip distributions (pinned to the versions in manifest.json's tool_versions)


class Runner:
    """executorch.runtime: Runtime -> Program -> Method("forward"), XNNPACK's threadpool pinned to `threads`
    (process-wide)."""

    def __init__(self, here, manifest, threads):
        import torch  # the runtime's tensors (its extension links libtorch)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        self.torch = torch
        self.program = Runtime.get().load_program((here / manifest["model_file"]).read_bytes())
        self.method = self.program.load_method("forward")

    def __call__(self, x):
        return self.method.execute([self.torch.from_numpy(x)])[0].numpy().copy()
'''
