#!/usr/bin/env python3
"""GPU time by kernel in a Chrome trace (libtorch's profiler, as `bench generate
--profile-dir` writes): per kernel name, total and per-step microseconds and launches per
step, and the busy time against the span from the first kernel to the last.

    python3 scripts/gpu/kernel_totals.py TRACE.json --steps N [--top 25]
"""
import argparse
import collections
import json

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("trace")
p.add_argument("--steps", type=int, default=1, help="divide totals by this many steps")
p.add_argument("--top", type=int, default=25)
a = p.parse_args()
events = json.load(open(a.trace))
events = events.get("traceEvents", events)
kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
if not kernels:
    raise SystemExit("no GPU kernels in the trace")
total = collections.defaultdict(float)
count = collections.Counter()
for e in kernels:
    total[e["name"]] += e["dur"]
    count[e["name"]] += 1
start = min(e["ts"] for e in kernels)
end = max(e["ts"] + e["dur"] for e in kernels)
busy = sum(total.values())
print(f"{len(kernels)} kernels, span {(end - start) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms "
      f"({100 * busy / (end - start):.0f} %); per step ({a.steps}): span {(end - start) / a.steps:.1f} us, "
      f"busy {busy / a.steps:.1f} us, {len(kernels) / a.steps:.1f} kernels")
for name, us in sorted(total.items(), key=lambda kv: -kv[1])[: a.top]:
    print(f"{us / a.steps:9.1f} us/step {count[name] / a.steps:6.1f}/step  {name[:110]}")
