"""Where an artifact's time goes (`edgeseg bench --profile`): profiled runs on the artifact's own runtime, each op's
time rolled up to the part of the model it comes from (backbone stages, each FreqFusion stage, the offset head,
NMF, AFM, ...), so the speed work starts from measured shares rather than guesses.

- ONNX Runtime: its profiler's node events, joined with the module path that the ONNX exporter writes into every
  node (`pkg.torch.onnx.name_scopes`). ORT's fused nodes keep one original node's name (its NCHWc rewrite is
  named after the original output); nodes ORT created itself (layout reorders) have no path and are counted
  under "(runtime-inserted)".
- OpenVINO: per-layer performance counters; an executed layer is attributed through the original ops it fused
  (`originalLayersNames`), whose module paths the OpenVINO exporter stores in the IR's rt_info (`edgeseg_module`).
  Reorders OpenVINO inserts between memory formats have no original op: "(runtime-inserted)".
- ExecuTorch: an ETDump of the same program (XNNPACK logs each of its operators inside a delegate call; portable
  kernels log their instruction), joined with the debug map the ExecuTorch exporter writes beside the .pte
  (instruction -> debug handles -> op and module path). Inside one delegate call the XNNPACK operators are matched
  to the delegated ops in order by kind, so shares within a delegate are approximate (edgeseg.targets.executorch.session).
- Core ML cannot run on Linux: its record says that no per-op profile is available here, and why (the runtime
  module's NO_PROFILE).

Each runtime module that can profile defines `profile_ops(model_path, num_threads, runs, optimize) ->
([(module path | INSERTED | UNKNOWN, op type, total us over the runs)], extra record fields)`; this module rolls
the paths up into parts.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

from edgeseg.artifact import verify_manifest
from edgeseg.errors import ArtifactError, one_line
from edgeseg.runtime.base import INSERTED, RT_INFO_KEY, UNKNOWN  # noqa: F401  (re-exported)


def part_of(path: str) -> str:
    """The model part a module path belongs to: two levels (`backbone.stem`, `decode_head.linear_fuse`), or three
    when the second level is a list of stages (`backbone.network.3`, `decode_head.freqfusions.2`). The export
    wrapper's `model.` prefix is dropped."""
    parts = [p for p in path.split(".") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    if not parts:
        return UNKNOWN
    if len(parts) >= 3 and parts[2].isdigit():
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _roll_up(op_times: list[tuple[str, str, float]], runs: int) -> dict[str, Any]:
    """[(part, op type, total us over `runs`)] -> {total_ms, parts: [{part, ms, share, ops}], op_types: [...]}."""
    parts: dict[str, float] = collections.defaultdict(float)
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    types: dict[str, float] = collections.defaultdict(float)
    for part, op_type, us in op_times:
        parts[part] += us
        ops[part][op_type] += us
        types[op_type] += us
    total = sum(parts.values()) or 1.0
    rows = [{"part": p, "ms": round(us / runs / 1000, 3), "share": round(us / total, 4),
             "top_ops": [f"{t} {100 * v / us:.0f}%" for t, v in ops[p].most_common(3)] if us else []}
            for p, us in sorted(parts.items(), key=lambda kv: -kv[1])]
    type_rows = [{"op": t, "ms": round(us / runs / 1000, 3), "share": round(us / total, 4)}
                 for t, us in sorted(types.items(), key=lambda kv: -kv[1])[:15]]
    return {"total_ms": round(total / runs / 1000, 3), "parts": rows, "op_types": type_rows}


def profile_artifact(artifact_dir: str | Path, num_threads: int = 2, runs: int = 5) -> dict[str, Any]:
    """One artifact's profile: {artifact, target, precision, runtime, status, total_ms, wall_ms, parts, op_types,
    source} or status "not available" with the reason. The sha256 of every file is checked first."""
    from edgeseg.targets import artifact_runtime, session_module

    artifact_dir = Path(artifact_dir)
    m = verify_manifest(artifact_dir)
    run = artifact_runtime(m)
    runtime = run["package"]
    rec: dict[str, Any] = {"artifact": str(artifact_dir), "target": m.target, "precision": m.precision,
                           "model": m.model, "runtime": runtime, "threads": num_threads, "runs": runs}
    model_path = artifact_dir / m.model_file
    profile_ops = getattr(session_module(runtime), "profile_ops", None)
    try:
        if profile_ops is None:
            why = getattr(session_module(runtime), "NO_PROFILE", "")
            rec.update(status="not available", reason=why or f"no per-op profiler for the {runtime} runtime here")
        else:
            optimize = m.precision != "int8" or run.get("int8_runtime_optimize", True)
            op_times, extra = profile_ops(model_path, num_threads, runs, optimize=optimize)
            rec.update(_roll_up([(part_of(p) if p not in (INSERTED, UNKNOWN) else p, t, us)
                                 for p, t, us in op_times], runs), **extra, status="ok")
    except Exception as e:  # noqa: BLE001 - a runtime failure is this artifact's row, not the whole command's
        raise ArtifactError(f"{artifact_dir}: profiling failed: {one_line(e, with_type=True)}") from e
    return rec


def format_profile(rec: dict[str, Any], top: int = 12) -> str:
    """A plain-text table of one profile (parts by time, then the op types)."""
    head = f"{rec['model']} {rec['target']} {rec['precision']} ({rec.get('runtime')}, {rec['threads']} threads)"
    if rec.get("status") != "ok":
        return f"{head}: profile {rec.get('status')}: {rec.get('reason', '')}"
    lines = [f"{head}: {rec['total_ms']:.1f} ms in ops per run ({rec['wall_ms']:.1f} ms wall)",
             f"  {'part':34s} {'ms':>8s} {'share':>6s}  top ops"]
    for row in rec["parts"][:top]:
        lines.append(f"  {row['part'][:34]:34s} {row['ms']:8.2f} {100 * row['share']:5.1f}%  {', '.join(row['top_ops'])}")
    if len(rec["parts"]) > top:
        rest = rec["parts"][top:]
        lines.append(f"  {'(' + str(len(rest)) + ' more parts)':34s} {sum(r['ms'] for r in rest):8.2f} "
                     f"{100 * sum(r['share'] for r in rest):5.1f}%")
    lines.append("  op types: " + ", ".join(f"{r['op']} {100 * r['share']:.0f}%" for r in rec["op_types"][:6]))
    return "\n".join(lines)


__all__ = ["part_of", "profile_artifact", "format_profile", "RT_INFO_KEY", "INSERTED", "UNKNOWN"]
