"""Gains against model size (docs/study/README.md): sizes.json and sizes.png from the logs of
`scripts/gpu/suite.sh sizes`, copied into docs/study/sizes/ (sizes-{train,infer}-SHAPE.log
from `sparse-train bench`, anchor-{train,infer}-SHAPE.jsonl from torch_anchor.py, measured in
the same GPU job), with docs/study/sizes/runs.json naming each job (shapes, commit, GPU, date).

    ~/.cache/sparse-train/venv/bin/python docs/study/sizes.py

Per shape: the training step (ours dense and hybrid at 99.5 % imposed sparsity, the anchor's
torch.compile step) and the forward (ours dense and TwELL, the anchor's compiled forward), in
tokens/s, and the ratios sparse / compile and sparse / ours dense. The plot is the sparse
path's speed-up against the parameter count.
"""
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = HERE / "sizes"

# " dense:    637.75 ms/iter |      51381 tokens/s | 1.000x vs dense | peak alloc 41.42 GiB | ..."
ROW = re.compile(r"^\s*(\w+):\s+([\d.]+) ms/iter \|\s+(\d+) tokens/s .*?peak alloc ([\d.]+) GiB")
PARAMS = re.compile(r"([\d.]+)B params\)")


def bench_rows(path):
    """The paths' rows of one `sparse-train bench` log: {path: (tokens/s, GiB)}, and the
    parameter count (billions) of its header."""
    rows, params = {}, None
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = (float(m.group(3)), float(m.group(4)))
        p = PARAMS.search(line)
        if p and params is None:
            params = float(p.group(1))
    return rows, params


def anchor_row(path, mode="compile"):
    """The anchor's JSON line of `mode` in `path`."""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            if d.get("mode") == mode:
                return d
    raise SystemExit(f"{path}: no {mode} line from torch_anchor.py")


def shape(name, job):
    out = {"shape": name, "gpu": job["gpu"], "commit": job["commit"], "date": job["date"]}
    for what, sparse in (("train", "hybrid"), ("infer", "twell")):
        log = SIZES / f"sizes-{what}-{name}.log"
        rows, params = bench_rows(log)
        if "dense" not in rows or sparse not in rows:
            raise SystemExit(f"{log}: want the dense and {sparse} rows, found {sorted(rows)}")
        anchor = anchor_row(SIZES / f"anchor-{what}-{name}.jsonl")
        out["params_b"] = params
        out[what] = {
            "ours_dense_tokens_per_s": rows["dense"][0],
            f"ours_{sparse}_tokens_per_s": rows[sparse][0],
            "ours_dense_peak_gib": rows["dense"][1],
            f"ours_{sparse}_peak_gib": rows[sparse][1],
            "compile_tokens_per_s": anchor["tokens_per_s"],
            "compile_peak_gib": anchor.get("peak_mem_gib"),
            "sparse_vs_compile": rows[sparse][0] / anchor["tokens_per_s"],
            "dense_vs_compile": rows["dense"][0] / anchor["tokens_per_s"],
            "sparse_vs_ours_dense": rows[sparse][0] / rows["dense"][0],
        }
    return out


def main():
    runs = SIZES / "runs.json"
    if not runs.exists():
        sys.exit(f"{runs} missing: copy the sizes job's logs into {SIZES} and name the job there")
    shapes = [shape(name, job) for job in json.loads(runs.read_text()) for name in job["shapes"]]
    shapes.sort(key=lambda s: s["params_b"])
    (HERE / "sizes.json").write_text(json.dumps(shapes, indent=1) + "\n")
    for s in shapes:
        t, f = s["train"], s["infer"]
        print(
            f"{s['shape']:>5} ({s['params_b']:.2f}B): train sparse {t['sparse_vs_compile']:.2f}x compile"
            f" ({t['sparse_vs_ours_dense']:.2f}x ours dense), forward TwELL {f['sparse_vs_compile']:.2f}x"
            f" compile ({f['sparse_vs_ours_dense']:.2f}x ours dense)"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [s["params_b"] for s in shapes]
    for what, label in (("train", "training step, hybrid"), ("infer", "forward, TwELL")):
        ax.plot(xs, [s[what]["sparse_vs_compile"] for s in shapes], marker="o", label=f"{label} / torch.compile")
        ax.plot(xs, [s[what]["sparse_vs_ours_dense"] for s in shapes], marker="s", ls="--", label=f"{label} / ours dense")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("parameters (B)")
    ax.set_ylabel("speed-up at 99.5 % imposed FFN sparsity")
    ax.set_title("Sparse FFN speed-up against model size (one GPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "sizes.png", dpi=120)


if __name__ == "__main__":
    main()
