//! Training end to end on the shipped tiny corpus (CPU).
use sparse_train_tests::{
    assert_fails_naming, assert_success, assert_within_reassociation_bound, losses, repo, run,
    step_records, REASSOCIATION_REGIME, REASSOCIATION_STEPS,
};
use std::path::Path;

/// Trains configs/tiny.yaml for `steps` steps into `out` with `extra` arguments.
fn train_tiny(out: &Path, steps: usize, extra: &[&str]) {
    let steps = steps.to_string();
    let mut args = vec!["--config", "configs/tiny.yaml", "--max-steps", &steps];
    args.extend(["--out-dir", out.to_str().unwrap()]);
    args.extend(extra);
    assert_success(&run(&args));
}

#[test]
fn tiny_training_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 40, &[]);
    let l = losses(dir.path());
    assert_eq!(l.len(), 40);
    let first: f64 = l[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = l[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < first - 2.0,
        "loss did not fall: first {first:.3}, last {last:.3}"
    );
}

#[test]
fn same_seed_gives_identical_losses() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        train_tiny(d.path(), 6, &[]);
    }
    let (la, lb) = (losses(a.path()), losses(b.path()));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "two runs with one seed differ");
    assert_eq!(
        step_records(a.path())[5]["grad_norm"],
        step_records(b.path())[5]["grad_norm"]
    );
}

/// Writes configs/tiny.yaml to `path` with `from` replaced by `to`.
fn edited_tiny_config(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(repo().join("configs/tiny.yaml")).unwrap();
    assert!(text.contains(from), "configs/tiny.yaml has no `{from}`");
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn bad_config_fails_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    edited_tiny_config(&cfg, "num_heads: 4", "num_heads: 5");
    let out = run(&["--config", cfg.to_str().unwrap()]);
    assert_fails_naming(&out, &["bad.yaml", "model.hidden_size"]);
}

#[test]
fn corrupt_shard_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = dir.path().join("shards");
    std::fs::create_dir(&shards).unwrap();
    let bytes = std::fs::read(repo().join("data/shards/tiny/train/shard_00000.bin")).unwrap();
    std::fs::write(shards.join("shard_00000.bin"), &bytes[..bytes.len() / 2]).unwrap();
    let cfg = dir.path().join("c.yaml");
    let train = format!("train: {}", shards.display());
    edited_tiny_config(&cfg, "train: data/shards/tiny/train", &train);
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--out-dir",
        dir.path().join("run").to_str().unwrap(),
    ]);
    assert_fails_naming(&out, &["shard_00000.bin", "truncated"]);
}

/// The hybrid path computes the dense path's function, adding only the non-zero products
/// (other sums, another order): compared in the regime and bound of
/// `reassociation_tolerance`, whose longest sum here is tiny.yaml's 512 FFN units.
#[test]
fn hybrid_path_gives_the_dense_path_losses() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (d, path) in [(&a, "dense"), (&b, "hybrid")] {
        let set = format!("sparsity.ffn_path={path}");
        let mut extra = vec!["--set", &set];
        extra.extend(REASSOCIATION_REGIME);
        train_tiny(d.path(), REASSOCIATION_STEPS, &extra);
    }
    let (dense, hybrid) = (losses(a.path()), losses(b.path()));
    assert_eq!(dense.len(), REASSOCIATION_STEPS);
    assert_within_reassociation_bound(&dense, &hybrid, 0, 512, "dense vs hybrid");
}

/// `sparsity.l1_layer_weights` acts on the loss and on nothing else: weights of 2 on every
/// layer train as twice the lambda, and weights of 0 as lambda 0, bit for bit (scaling by 2 and
/// by 0 is exact), into the L1 ramp (from step 10).
#[test]
fn l1_layer_weights_scale_each_layers_penalty() {
    let steps = 12;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let sets: [&[&str]; 4] = [
        &["--set", "sparsity.l1_layer_weights=[2, 2, 2, 2]"],
        &["--set", "sparsity.l1_coeff=0.1"],
        &["--set", "sparsity.l1_layer_weights=[0, 0, 0, 0]"],
        &["--set", "sparsity.l1_coeff=0"],
    ];
    for (d, set) in dirs.iter().zip(sets) {
        train_tiny(d.path(), steps, set);
    }
    let field = |d: &Path, key: &str| -> Vec<serde_json::Value> {
        step_records(d).iter().map(|r| r[key].clone()).collect()
    };
    let [doubled, twice_lambda, zeroed, no_lambda] = [0, 1, 2, 3].map(|i| dirs[i].path());
    assert_eq!(losses(doubled).len(), steps);
    assert_eq!(
        losses(doubled),
        losses(twice_lambda),
        "weights 2 against lambda x 2"
    );
    assert_eq!(
        field(doubled, "grad_norm"),
        field(twice_lambda, "grad_norm")
    );
    assert_eq!(
        field(zeroed, "ce"),
        field(no_lambda, "ce"),
        "weights 0 against lambda 0"
    );
    assert_eq!(field(zeroed, "grad_norm"), field(no_lambda, "grad_norm"));
    // The penalty is on from step 10, so the weighted runs differ from the unweighted one.
    let plain = tempfile::tempdir().unwrap();
    train_tiny(plain.path(), steps, &[]);
    assert_ne!(
        losses(plain.path()),
        losses(doubled),
        "the weights changed nothing"
    );
}

/// Activation recompute changes what the backward keeps, not what it computes: `full` (each
/// block run again in the backward) gives the losses and gradient norms of `none` bit for bit,
/// into the L1 ramp (from step 10).
#[test]
fn full_recompute_gives_the_same_losses() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (d, mode) in [(&a, "none"), (&b, "full")] {
        let set = format!("train.recompute={mode}");
        train_tiny(d.path(), 12, &["--set", &set]);
    }
    let (kept, recomputed) = (losses(a.path()), losses(b.path()));
    assert_eq!(kept.len(), 12);
    assert_eq!(kept, recomputed, "recompute full changed the losses");
    let norms = |d: &Path| -> Vec<serde_json::Value> {
        step_records(d)
            .iter()
            .map(|r| r["grad_norm"].clone())
            .collect()
    };
    assert_eq!(norms(a.path()), norms(b.path()));
}

#[test]
fn tiny_config_passes_90_percent_ffn_sparsity_and_switches_layers_to_hybrid() {
    let dir = tempfile::tempdir().unwrap();
    train_tiny(dir.path(), 100, &["--set", "train.log_every=20"]);
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let logs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("log_step").is_some())
        .collect();
    let last = logs.last().unwrap();
    let sparsity = last["sparsity"].as_f64().unwrap();
    assert!(sparsity >= 0.90, "FFN sparsity {sparsity} at step 100");
    let paths = last["ffn_path"].as_array().unwrap();
    assert!(paths.iter().all(|p| p == "hybrid"), "paths {paths:?}");
}

/// `--profile-steps 2..3` writes a Chrome trace holding exactly those steps' regions (two
/// micro-batches a step in tiny.yaml), and profiling changes no loss.
#[test]
fn profile_steps_write_a_trace_of_those_steps() {
    let (plain, profiled) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    train_tiny(plain.path(), 4, &[]);
    train_tiny(profiled.path(), 4, &["--profile-steps", "2..3"]);
    assert_eq!(losses(plain.path()), losses(profiled.path()));
    let text = std::fs::read_to_string(profiled.path().join("trace.json")).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&text).unwrap();
    let count = |name: &str| {
        trace["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == name && e["ph"] == "X")
            .count()
    };
    for (name, per_step) in [
        ("micro_batch.forward", 2),
        ("micro_batch.backward", 2),
        ("ffn", 2 * 4),
        ("attention", 2 * 4),
        ("lm_head", 2),
        ("grad_reduce", 1),
        ("optimizer", 1),
    ] {
        assert_eq!(count(name), 2 * per_step, "{name} in the trace of 2 steps");
    }
    assert!(count("aten::mm") > 0, "libtorch ops in the trace");
    let out = run(&[
        "--config",
        "configs/tiny.yaml",
        "--max-steps",
        "4",
        "--profile-steps",
        "5..6",
        "--out-dir",
        profiled.path().to_str().unwrap(),
    ]);
    assert_fails_naming(&out, &["--profile-steps", "1..4"]);
}
