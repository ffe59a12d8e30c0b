"""Plots and summary numbers of the 125m sparsity study (docs/study/README.md).

Reads the metrics.jsonl files next to this script and writes PNGs beside them (ce.png,
sparsity.png, layers_sparse.png, layers_dense.png; diagnostic.png from the earlier diagnosis of
the bf16 autocast problem, diagnostic/*):

    ~/.cache/sparse-train/venv/bin/python docs/study/plot_study.py

metrics.jsonl holds one line per optimizer step (step, loss, ce, l1, lambda, lr, grad_norm)
and one line per log interval (log_step, ce, val_ce, sparsity, nnz_per_token, tokens_per_s,
mfu, memory_gib, layers[...], ffn_path).
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {"dense (lambda = 0)": "125m-dense", "sparse (lambda -> 1.28e-3)": "125m"}
DIAG = ["bf16-0.0", "bf16-1.28e-3", "fp32-0.0", "fp32-1.28e-3"]


def load(path):
    steps, logs = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        d = json.loads(line)
        if "log_step" in d:
            logs.append(d)
        elif "step" in d and not d.get("skipped"):
            steps.append(d)
    return steps, logs


def plot_ce(runs, out):
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, (steps, logs)), color in zip(runs.items(), ["C0", "C1"]):
        ax.plot([s["step"] + 1 for s in steps], [s["ce"] for s in steps],
                color=color, alpha=0.6, lw=1, label=f"{label}: train CE")
        val = [(l["log_step"], l["val_ce"]) for l in logs if l.get("val_ce") is not None]
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=5, label=f"{label}: val CE")
    ax.axhline(10.826, color="grey", ls=":", lw=1, label="ln(50257): uniform prediction")
    ax.set_xlabel("optimizer step (65,536 tokens each)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("125m study (bf16 mixed precision): train and validation CE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_sparsity(runs, out):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (label, (_, logs)), color, ls in zip(runs.items(), ["C0", "C1"], ["-", "--"]):
        x = [l["log_step"] for l in logs]
        a.plot(x, [100 * l["sparsity"] for l in logs], ls, color=color, marker=".", label=label)
        b.plot(x, [l["nnz_per_token"] for l in logs], ls, color=color, marker=".", label=label)
    a.set_ylabel("FFN sparsity (% of units zero)")
    b.set_ylabel("mean non-zeros per token (of 2048, mean over layers)")
    for ax in (a, b):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("FFN activity: dense (lambda = 0) vs L1-sparse (lambda -> 1.28e-3)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_layers(logs, out, title):
    last = logs[-1]
    layers = last["layers"]
    idx = list(range(len(layers)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    a.bar(idx, [l["nnz_mean"] for l in layers], color="C1", label="mean")
    a.plot(idx, [l["nnz_max"] for l in layers], "k_", ms=14, mew=2, label="max (over tokens)")
    a.set_ylabel("non-zeros per token (of 2048)")
    a.legend(fontsize=8)
    b.bar(idx, [l["dead"] for l in layers], color="C3")
    b.set_ylabel("dead units (of 2048)")
    for ax in (a, b):
        ax.set_xlabel("layer")
        ax.set_xticks(idx)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}, step {last['log_step']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_diagnostic(out):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, color, ls in zip(DIAG, ["C0", "C1", "C2", "C3"], ["-", "--", "-", "--"]):
        path = HERE / "diagnostic" / name / "metrics.jsonl"
        if not path.exists():
            continue
        steps, logs = load(path)
        a.plot([s["step"] + 1 for s in steps], [s["ce"] for s in steps], ls, color=color,
               lw=1, label=name)
        b.plot([l["log_step"] for l in logs], [100 * l["sparsity"] for l in logs], ls,
               color=color, marker=".", label=name)
    a.set_ylabel("train CE")
    b.set_ylabel("FFN sparsity (%)")
    for ax in (a, b):
        ax.set_xlabel("optimizer step (16,384 tokens each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="precision-lambda")
    fig.suptitle("Earlier diagnosis (old binary, libtorch autocast): 150 steps on the BBC shard, "
                 "bf16 autocast vs fp32")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def summary(name, steps, logs):
    last = logs[-1]
    val = [l for l in logs if l.get("val_ce") is not None]
    tps = [l["tokens_per_s"] for l in logs[1:]]  # the first interval includes warm-up
    mfu = [l["mfu"] for l in logs[1:]]
    print(f"== {name}")
    print(f"  final step {steps[-1]['step'] + 1}: train CE (step) {steps[-1]['ce']:.4f}, "
          f"train CE (last interval mean) {last['ce']:.4f}, loss {steps[-1]['loss']:.4f}")
    print("  val CE: " + ", ".join(f"{l['log_step']}: {l['val_ce']:.4f}" for l in val))
    print(f"  min train CE {min(s['ce'] for s in steps):.4f} at step "
          f"{min(steps, key=lambda s: s['ce'])['step'] + 1}")
    print(f"  sparsity {100 * last['sparsity']:.2f} %, nnz/token {last['nnz_per_token']:.1f}")
    print(f"  tokens/s median {sorted(tps)[len(tps) // 2]:.0f}, MFU median "
          f"{100 * sorted(mfu)[len(mfu) // 2]:.1f} %, memory {last['memory_gib']} GiB")
    print("  layer | nnz mean | nnz max | sparsity % | dead")
    for i, l in enumerate(last["layers"]):
        print(f"  {i:5d} | {l['nnz_mean']:8.1f} | {l['nnz_max']:7d} | "
              f"{100 * l['sparsity']:10.2f} | {l['dead']:4d}")


def main():
    runs = {label: load(HERE / d / "metrics.jsonl") for label, d in RUNS.items()}
    plot_ce(runs, HERE / "ce.png")
    plot_sparsity(runs, HERE / "sparsity.png")
    plot_layers(runs["sparse (lambda -> 1.28e-3)"][1], HERE / "layers_sparse.png",
                "Sparse run (125m.yaml): per-layer FFN activity")
    plot_layers(runs["dense (lambda = 0)"][1], HERE / "layers_dense.png",
                "Dense run (125m-dense.yaml): per-layer FFN activity")
    plot_diagnostic(HERE / "diagnostic.png")
    for label, (steps, logs) in runs.items():
        summary(label, steps, logs)
    d, s = (runs[k][0] for k in RUNS)
    same = all(a["ce"] == b["ce"] and a["grad_norm"] == b["grad_norm"] and a["l1"] == b["l1"]
               for a, b in zip(d, s))
    print(f"per-step ce, l1 and grad_norm bit-identical between the two runs: {same}")
    vd, vs = (runs[k][1][-1]["val_ce"] for k in RUNS)
    print(f"final val CE dense {vd:.4f}, sparse {vs:.4f}, sparse vs dense {100 * (vs / vd - 1):+.3f} %")
    for label, (steps, logs) in runs.items():
        tail = [s["ce"] for s in steps[-25:]]
        layers = logs[-1]["layers"]
        print(f"  {label}: train CE mean of last 25 steps {sum(tail) / len(tail):.4f}; "
              f"layers nnz mean {min(l['nnz_mean'] for l in layers):.1f}-"
              f"{max(l['nnz_mean'] for l in layers):.1f}, nnz max "
              f"{min(l['nnz_max'] for l in layers)}-{max(l['nnz_max'] for l in layers)}, "
              f"dead {sum(l['dead'] for l in layers)} in all")
    for name in DIAG:
        path = HERE / "diagnostic" / name / "metrics.jsonl"
        if path.exists():
            summary(f"diagnostic {name}", *load(path))


if __name__ == "__main__":
    main()
