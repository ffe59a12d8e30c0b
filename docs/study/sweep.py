"""The lambda sweep of docs/study/README.md: sweep.json and its plots from the arms' runs.

Each arm is a run folder docs/study/sweep/lambda-<LAMBDA>/ (metrics.jsonl, TensorBoard events,
train.log), unpacked from the $OUT/sweep-<LAMBDA>.tar.gz of `scripts/gpu/suite.sh sweep`;
docs/study/sweep/runs.json names, per arm, the GPU job (commit, GPU, command) that made it; an
arm's folder is lambda-<arm> (arm: the lambda, or e.g. 3.5e-3-reinit with reinit_dead).

    ~/.cache/sparse-train/venv/bin/python docs/study/sweep.py

writes docs/study/sweep.json (one object per arm), pareto.png (final FFN sparsity against
validation CE relative to the dense arm), sweep_layers.png (per-layer non-zeros per token at
the end of each arm) and sweep_curves.png (validation CE and sparsity against tokens).
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
SWEEP = HERE / "sweep"


def load(run):
    steps, logs = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if "log_step" in d:
            logs.append(d)
        elif "step" in d and not d.get("skipped"):
            steps.append(d)
    return steps, logs


def summarize(run, job):
    steps, logs = load(run)
    final = logs[-1]
    evals = [d for d in logs if d.get("val_ce") is not None]
    tokens_per_step = job["tokens_per_step"]
    paths = final["ffn_path"]
    layers = final["layers"]
    # Throughput over the whole arm: the log intervals' tokens/s, weighted by their steps.
    spans = [(b["log_step"] - a["log_step"], b["tokens_per_s"]) for a, b in zip(logs, logs[1:])]
    spans.insert(0, (logs[0]["log_step"], logs[0]["tokens_per_s"]))
    seconds = sum(n * tokens_per_step / tps for n, tps in spans if tps > 0)
    return {
        "arm": job.get("arm", job["lambda"]),
        "lambda": job["lambda"],
        "reinit_dead": job.get("reinit_dead", False),
        "l1_layer_weights": job.get("l1_layer_weights"),
        "steps": len(steps),
        "tokens": len(steps) * tokens_per_step,
        "val_ce": evals[-1]["val_ce"],
        "val_tokens": job["val_tokens"],
        "train_ce_final_interval": final["ce"],
        "sparsity": final["sparsity"],
        "nnz_per_token": final["nnz_per_token"],
        "nnz_per_token_by_layer": [round(x["nnz_mean"], 2) for x in layers],
        "dead_units": sum(x["dead"] for x in layers),
        "ffn_path": {p: paths.count(p) for p in sorted(set(paths))},
        "tokens_per_s": len(steps) * tokens_per_step / seconds,
        "tokens_per_s_final_interval": final["tokens_per_s"],
        "val_ce_curve": [[d["log_step"] * tokens_per_step, d["val_ce"]] for d in evals],
        "gpu": job["gpu"],
        "commit": job["commit"],
        "command": job["command"],
    }


def main():
    jobs = json.loads((SWEEP / "runs.json").read_text())
    arms = []
    for job in jobs:
        run = SWEEP / f"lambda-{job.get('arm', job['lambda'])}"
        if (run / "metrics.jsonl").exists():
            arms.append(summarize(run, job))
    arms.sort(key=lambda a: (float(a["lambda"]), a["reinit_dead"]))
    dense = next((a for a in arms if float(a["lambda"]) == 0.0), None)
    for a in arms:
        a["val_ce_rel_dense"] = a["val_ce"] / dense["val_ce"] - 1.0 if dense else None
    (HERE / "sweep.json").write_text(json.dumps(arms, indent=1) + "\n")
    for a in arms:
        rel = a["val_ce_rel_dense"]
        print(
            f"{a['arm']:>13}: {a['tokens'] / 1e6:6.1f} M tokens, val CE {a['val_ce']:.4f}"
            f" ({'' if rel is None else f'{rel * 100:+.2f} %'}), sparsity {a['sparsity'] * 100:.2f} %,"
            f" {a['nnz_per_token']:.1f} nnz/token, {a['dead_units']} dead, {a['tokens_per_s'] / 1e3:.0f}k tok/s,"
            f" paths {a['ffn_path']}"
        )
    if not arms:
        return

    fig, ax = plt.subplots(figsize=(7, 5))
    for a in arms:
        rel = (a["val_ce_rel_dense"] or 0.0) * 100
        ax.scatter(a["sparsity"] * 100, rel, s=40)
        ax.annotate(f"λ={a['arm']}", (a["sparsity"] * 100, rel), textcoords="offset points", xytext=(5, 5))
    ax.axvline(99.5, color="grey", ls="--", lw=0.8)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("FFN sparsity at the end (%)")
    ax.set_ylabel("validation CE vs dense arm (%)")
    ax.set_title("125m, λ sweep: sparsity against validation CE")
    fig.tight_layout()
    fig.savefig(HERE / "pareto.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 5))
    for a in arms:
        ys = a["nnz_per_token_by_layer"]
        ax.plot(range(len(ys)), ys, marker="o", label=f"λ={a['arm']}")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("non-zeros per token (of 2048), final interval")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "sweep_layers.png", dpi=120)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for a in arms:
        run = SWEEP / f"lambda-{a['arm']}"
        _, logs = load(run)
        xs = [d["log_step"] * 65536 / 1e6 for d in logs]
        a2.plot(xs, [d["sparsity"] * 100 for d in logs], label=f"λ={a['arm']}")
        ev = a["val_ce_curve"]
        a1.plot([t / 1e6 for t, _ in ev], [v for _, v in ev], marker="o", label=f"λ={a['arm']}")
    a1.set_xlabel("tokens (M)")
    a1.set_ylabel("validation CE (whole BBC set)")
    a2.set_xlabel("tokens (M)")
    a2.set_ylabel("FFN sparsity (%)")
    a1.legend()
    a2.legend()
    fig.tight_layout()
    fig.savefig(HERE / "sweep_curves.png", dpi=120)


if __name__ == "__main__":
    main()
