"""A training run's event files, read by the real TensorBoard reader: the expected scalars
at the expected steps, and after a resume no overlapping steps."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import run


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_events_have_expected_tags_and_no_overlap_after_resume(tmp_path):
    out = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", "--out-dir", str(out), "--quiet",
              "--set", "train.log_every=2", "--set", "train.max_steps=8", "--set", "checkpoint.every=2"]
    run(*common, "--max-steps", "8")
    acc = scalars(out)
    tags = set(acc.Tags()["scalars"])
    for t in ["train/loss", "train/ce", "train/l1", "train/lambda", "train/lr", "train/grad_norm",
              "perf/tokens_per_s", "perf/mfu", "perf/memory_gib", "train/skipped_steps",
              "sparsity/sparsity", "layer00/nnz_mean", "layer03/nnz_max", "layer01/sparsity",
              "layer02/dead", "layer00/ffn_path"]:
        assert t in tags, f"missing tag {t}; have {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    # Resume from step 4 into the same run directory: steps 6 and 8 are logged again and
    # TensorBoard must show each step once, the resumed values replacing the old ones.
    ckpt = out / "checkpoints" / "step_00000004"
    run("--config", "configs/tiny.yaml", "--out-dir", str(out), "--quiet", "--set", "train.log_every=2",
        "--set", "train.max_steps=8", "--resume", str(ckpt))
    steps = [e.step for e in scalars(out).Scalars("train/loss")]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8], steps
