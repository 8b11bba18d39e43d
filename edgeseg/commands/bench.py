"""`edgeseg bench`: latency of artifacts in their own runtimes, threads pinned."""
from __future__ import annotations

HELP = "benchmark artifacts: p50/p90 latency, throughput, peak memory, size; flags int8 not faster than fp32"
EPILOG = """examples:
  edgeseg bench runs/pipeline/artifacts/* --threads 2 --runs 50
  edgeseg bench out/onnx-fp32 out/onnx-int8 --json bench.json
  edgeseg bench out/openvino-int8 --profile --threads 2     # where the time goes, per model part
"""


def add_arguments(p) -> None:
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="artifact folders (with manifest.json)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="CPU threads per runtime (default: 1)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed warm-up runs (default: 3)")
    p.add_argument("--runs", type=int, default=20, metavar="N", help="timed runs (default: 20)")
    p.add_argument("--json", metavar="OUT", help="write the records as JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile each artifact's ops on its runtime and roll them up per model "
                        "part (ONNX Runtime, OpenVINO, ExecuTorch; table + JSON)")


def _fmt(v, f="{:.2f}"):
    return "–" if v is None else f.format(v)


def _profile(args) -> int:
    from edgeseg import vendorlog
    from edgeseg.cpu import cpu_label, host_cpu
    from edgeseg.eval.profile import format_profile, profile_artifact
    from edgeseg.fileio import write_json

    cpu = host_cpu().to_json()
    import torch  # noqa: F401 - first: torch's log handlers keep the sys.stderr of its import

    with vendorlog.quiet(python_too=False):
        records = [profile_artifact(a, num_threads=args.threads, runs=args.runs) for a in args.artifacts]
    print(f"profiled on: {cpu_label(cpu)}; threads {args.threads}, {args.runs} runs")
    for rec in records:
        print(format_profile(rec))
    if args.json:
        write_json(args.json, {"cpu": cpu, "profiles": records})
        print(f"wrote {args.json}")
    return 0


def run(args) -> int:
    from edgeseg import vendorlog
    from edgeseg.cpu import cpu_label, host_cpu
    from edgeseg.eval.bench import bench
    from edgeseg.fileio import write_json
    from edgeseg.outputs import Output, check_outputs

    check_outputs(args.force, [Output("--json", args.json)], [("ARTIFACT_DIR", a) for a in args.artifacts])
    if args.runs < 1:
        from edgeseg.errors import UsageError

        raise UsageError(f"--runs {args.runs}: must be >= 1")
    if args.profile:
        return _profile(args)
    import torch  # noqa: F401 - first: torch's log handlers keep the sys.stderr of its import

    with vendorlog.quiet(python_too=False):  # runtimes' native output to the vendor log; our bar stays
        records = bench(args.artifacts, threads=args.threads, warmup=args.warmup, runs=args.runs,
                        progress=not args.no_progress)
    print(f"measured on: {cpu_label(host_cpu().to_json())}; threads: {args.threads}; warm-up {args.warmup}, "
          f"timed runs {args.runs}")
    head = ("artifact", "target", "prec", "status", "p50 ms", "p90 ms", "mean ms", "inf/s", "peak MB", "size MB",
            "int8 x", "threads via")
    rows = []
    for r in records:
        lat = r["latency_ms"]
        speed = _fmt(r["speedup_vs_fp32"]) + (" NOT FASTER" if r["int8_not_faster"] else "") \
            if r["speedup_vs_fp32"] is not None else "–"
        prec = str(r["precision"]) + (f"/{r['float_compute']}" if r.get("float_compute") not in (None, "fp32") else "")
        rows.append((r["name"], str(r["target"]), prec,
                     "FAILED" if r["status"] == "failed" else r["status"], _fmt(lat["p50"]), _fmt(lat["p90"]),
                     _fmt(lat["mean"]), _fmt(r["throughput_ips"], "{:.1f}"), _fmt(r["peak_rss_mb"], "{:.0f}"),
                     _fmt(None if r["size_bytes"] is None else r["size_bytes"] / 1e6), speed,
                     str(r["thread_control"] or "–")))
    w = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    for line in (head, ["-" * n for n in w], *rows):
        print("  ".join(s.ljust(n) for s, n in zip(line, w)).rstrip())
    sources = sorted({r["peak_rss_source"] for r in records if r.get("peak_rss_source")})
    if sources:
        print(f"peak MB: each artifact's own peak ({'; '.join(sources)})")
    for r in records:
        if r["fallback_ops"]:
            print(f"fallback ops {r['name']}: {', '.join(r['fallback_ops'])}")
        if r["status"] != "ok":
            print(f"{'FAILED' if r['status'] == 'failed' else 'not run'} {r['name']}: {r['error']}")
    if args.json:
        write_json(args.json, records)
        print(f"wrote {args.json}")
    return 1 if any(r["status"] == "failed" for r in records) else 0
