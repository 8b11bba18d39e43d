"""Time artifact folders side by side, interleaved: every run goes round-robin over all of them (starting one further
along each time), so load from other processes and CPU clock changes hit every artifact alike, and prints each
one's p50 and its ratio to the first. Use it for before/after pairs of one change on a shared machine (`edgeseg bench`
times the artifacts one after another).

    .venv/bin/python bench/interleaved.py runs/old-fp32 runs/new-fp32 runs/old-int8 runs/new-int8 --threads 1

Input: a fixed random float32 batch of the first artifact's input shape (latency does not depend on the values);
every artifact must take the same input. The CPU is named.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    from edgeseg.cpu import host_cpu
    from edgeseg.runtime import open_session

    sessions = {d: open_session(d, num_threads=args.threads) for d in args.artifacts}
    first = sessions[args.artifacts[0]]
    shape = tuple(first.manifest.input["shape"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if first.manifest.input["dtype"] == "uint8":
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    for s in sessions.values():
        for _ in range(args.warmup):
            s.run(x)
    keys = list(sessions)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t = time.perf_counter()
            sessions[k].run(x)
            times[k].append((time.perf_counter() - t) * 1e3)
    print(f"{args.runs} runs interleaved, {args.threads} thread(s), input {shape}; CPU: {host_cpu().model}")
    base = float(np.median(times[keys[0]]))
    for k in keys:
        m = sessions[k].manifest
        p50 = float(np.median(times[k]))
        print(f"{k:48s} {m.target:20s} {m.precision:5s} p50 {p50:8.1f} ms  p90 {np.percentile(times[k], 90):8.1f}"
              f"  x first {p50 / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
