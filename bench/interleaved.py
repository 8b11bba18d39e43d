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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    from edgeseg.cpu import host_cpu
    from edgeseg.runtime import open_session

    from peers import latency_stats, time_interleaved  # the same round-robin timing as bench/peers.py

    keys = list(args.artifacts)
    sessions = {i: open_session(d, num_threads=args.threads) for i, d in enumerate(keys)}
    shape = tuple(sessions[0].manifest.input["shape"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if sessions[0].manifest.input["dtype"] == "uint8":
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    manifests = {i: s.manifest for i, s in sessions.items()}
    rows = [{"artifact": d} for d in keys]
    try:
        times = time_interleaved(rows, sessions, {i: x for i in sessions}, args.warmup, args.runs, progress=False)
    finally:
        for s in sessions.values():
            s.close()
    print(f"{args.runs} runs interleaved, {args.threads} thread(s), input {shape}; CPU: {host_cpu().model}")
    base = None
    for i, d in enumerate(keys):
        m = manifests[i]
        if rows[i].get("status") == "FAILED":
            print(f"{d:48s} {m.target:20s} {m.precision:5s} FAILED: {rows[i]['error']}")
            continue
        st = latency_stats(times[i])
        base = base or st["p50"]
        print(f"{d:48s} {m.target:20s} {m.precision:5s} p50 {st['p50']:8.2f} ms  p90 {st['p90']:8.2f}"
              f"  x first {st['p50'] / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
