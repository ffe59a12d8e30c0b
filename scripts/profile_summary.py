#!/usr/bin/env python3
"""Where a profiled step's time goes: reads the Chrome trace that `sparse-train
--profile-steps A..B` writes (RUN/trace.json) and prints, per trainer region, the wall time
on the host and the GPU kernel time launched inside it, the GPU time by kernel kind, then the
(launching libtorch op, kernel) pairs that cost most.

    python3 scripts/profile_summary.py runs/x/trace.json [--steps N] [--top 15]

A kernel belongs to the innermost region whose host interval holds its launch (the
`cudaLaunchKernel` event with the same correlation id); backward kernels fall in
`micro_batch.backward` (autograd runs them on its own thread while the main thread waits).
Times are totals over the profiled steps, divided by --steps (default: the number of
`optimizer` regions) to give per-step figures.
"""
import argparse
import bisect
import collections
import json

# Inner regions first: a launch inside `ffn` is not also counted in `micro_batch.forward`.
REGIONS = ["attention", "ffn", "lm_head", "micro_batch.forward", "micro_batch.backward",
           "grad_reduce", "optimizer"]


# Kernel kinds by name, first match wins.
KINDS = [("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma")),
         ("attention (SDPA)", ("sdpa", "flash", "fmha")),
         ("sparse FFN (ours)", ("twell", "hyb_")),
         ("copies and casts", ("copy", "Memcpy", "CatArray", "roll_cuda")),
         ("softmax / cross-entropy", ("SoftMax", "nll_loss", "log_softmax")),
         ("RMSNorm (fused)", ("layer_norm", "GammaBeta")),
         ("reductions", ("reduce_kernel",)),
         ("other elementwise", ("elementwise", "Memset", "Functor"))]


def kind_of(name):
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def gpu_span(kernels):
    """From the first kernel's start to the last one's end (the step's GPU timeline)."""
    if not kernels:
        return 0
    return max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X"]
    # Host ranges only (Kineto also mirrors each range on the GPU timeline).
    regions = {r: sorted((e["ts"], e["ts"] + e["dur"]) for e in spans
                         if e["name"] == r and e.get("cat") == "user_annotation")
               for r in REGIONS}
    steps = a.steps or max(1, len(regions["optimizer"]))
    launches = {}
    for e in spans:
        # Runtime launches, and driver ones (cuBLAS and cuDNN launch through cuLaunchKernelEx).
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    launch_ts = {c: e["ts"] for c, e in launches.items()}
    ops_by_thread = collections.defaultdict(list)
    for e in spans:
        if e.get("cat") == "cpu_op":
            ops_by_thread[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    for ops in ops_by_thread.values():
        ops.sort()

    op_starts = {tid: [o[0] for o in ops] for tid, ops in ops_by_thread.items()}

    def launching_op(launch):
        """The innermost libtorch op around a launch on its thread: ops nest, so it is the
        latest-starting op that has not ended by the launch."""
        ops = ops_by_thread.get(launch["tid"], [])
        i = bisect.bisect_right(op_starts.get(launch["tid"], []), launch["ts"]) - 1
        while i >= 0 and ops[i][1] < launch["ts"]:
            i -= 1
        return ops[i][2] if i >= 0 else "?"
    kernels = [e for e in spans if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]

    def region_of(ts):
        for r in REGIONS:
            iv = regions[r]
            i = bisect.bisect_right(iv, (ts, float("inf"))) - 1
            if i >= 0 and iv[i][0] <= ts <= iv[i][1]:
                return r
        return "(outside the regions)"

    gpu = collections.Counter()
    by_kernel = collections.Counter()
    kernel_region = {}
    for k in kernels:
        ts = launch_ts.get(k.get("args", {}).get("correlation"))
        r = region_of(ts) if ts is not None else "(no launch found)"
        gpu[r] += k["dur"]
        launch = launches.get(k.get("args", {}).get("correlation"))
        key = (launching_op(launch) if launch else "?", k["name"][:70])
        by_kernel[key] += k["dur"]
        kernel_region.setdefault(key, collections.Counter())[r] += k["dur"]
    host = {r: sum(b - s for s, b in iv) for r, iv in regions.items()}
    print(f"{a.trace}: {steps} step(s); per step, ms")
    print(f"{'region':24s} {'host wall':>10s} {'GPU kernels':>12s}   (host wall includes inner regions)")
    for r in REGIONS + sorted(set(gpu) - set(REGIONS)):
        print(f"{r:24s} {host.get(r, 0) / 1e3 / steps:10.2f} {gpu[r] / 1e3 / steps:12.2f}")
    total = sum(gpu.values())
    print(f"{'all GPU kernels':24s} {'':10s} {total / 1e3 / steps:12.2f}")
    print(f"{'GPU timeline span':24s} {'':10s} {gpu_span(kernels) / 1e3 / steps:12.2f}   (busy {100 * total / max(1, gpu_span(kernels)):.1f} %)")
    kinds = collections.Counter()
    for k in kernels:
        kinds[kind_of(k["name"])] += k["dur"]
    print(f"\nGPU time by kernel kind (per step, ms; share)")
    for kind, d in kinds.most_common():
        print(f"{kind:28s} {d / 1e3 / steps:8.2f} {100 * d / total:5.1f}%")
    print(f"\ntop {a.top} (launching op, kernel) by GPU time (per step, ms; share; main region)")
    for (op, name), d in by_kernel.most_common(a.top):
        r = kernel_region[(op, name)].most_common(1)[0][0]
        print(f"{d / 1e3 / steps:8.2f} {100 * d / total:5.1f}%  {r:22s} {op:22s} {name}")


if __name__ == "__main__":
    main()
