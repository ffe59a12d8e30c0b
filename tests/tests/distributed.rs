//! Multi-rank runs on CPU over MPI (`mpirun`, installed by scripts/setup.sh).
//!
//! Two kinds of comparison. Data parallelism over 2 ranks does the arithmetic of 1 rank in
//! the same order, so those runs are compared bit for bit ([`COMMON`] says why). Tensor
//! parallelism and ZeRO-1 add the same terms in another order, so those runs are compared in
//! the regime and within the bound of `sparse_train_tests::reassociation_tolerance`.
use sparse_train_tests::{
    assert_bit_identical, assert_fails_naming, assert_success, assert_within_reassociation_bound,
    binary, losses, mpirun, mpirun_command, step_records, Trainer, REASSOCIATION_REGIME,
};
use std::process::Output;
use std::time::{Duration, Instant};

/// A global batch of 4 sequences in micro-batches of 2. One rank runs micro-batches 1 and 2
/// and its gradient buffers hold g1, then g1 + g2; two ranks run one each and the all-reduce
/// adds g1 + g2 (or g2 + g1: IEEE addition is commutative, bit for bit). Everything else
/// (forward and backward of the same micro-batch shapes, the norm, AdamW) runs on the same
/// tensors with one intra-op thread in every process (sparse_train_tests::ONE_THREAD), so
/// 1 and 2 ranks give the same bits on any CPU, whatever kernels it picks. (With 4
/// micro-batches, 1 rank would add ((g1 + g2) + g3) + g4 and 2 ranks (g1 + g2) + (g3 + g4):
/// another rounding, which training amplifies.)
const COMMON: [&str; 8] = [
    "--config",
    "configs/tiny.yaml",
    "--quiet",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.micro_batch_size=2",
    "--set=train.log_every=4",
];

/// The longest sum the compared runs add in another order: tiny.yaml's intermediate_size
/// (the FFN's down projection, split over tensor-parallel ranks, and the gradient it sends
/// to the FFN's input); the other sums (hidden size 128, 128 tokens per micro-batch) are
/// shorter.
const LONGEST_SUM: usize = 512;

fn mpirun_output(ranks: usize, args: &[&str]) -> Output {
    mpirun_command(ranks, args)
        .output()
        .expect("mpirun not found: run scripts/setup.sh")
}

fn train(ranks: usize, out: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    let mut args: Vec<&str> = COMMON.to_vec();
    args.extend(["--out-dir", out.to_str().unwrap()]);
    args.extend(extra);
    let o = mpirun_output(ranks, &args);
    assert_success(&o);
    losses(out)
}

/// `extra` then [`REASSOCIATION_REGIME`].
fn in_regime<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = extra.to_vec();
    args.extend(REASSOCIATION_REGIME);
    args
}

fn grad_norms(run_dir: &std::path::Path) -> Vec<f64> {
    step_records(run_dir)
        .iter()
        .map(|v| v["grad_norm"].as_f64().unwrap())
        .collect()
}

#[test]
fn two_ranks_equal_one_rank_on_the_same_global_batch() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let one = train(1, a.path(), &["--max-steps", "20"]);
    let two = train(2, b.path(), &["--max-steps", "20"]);
    assert_eq!(one.len(), 20);
    assert_bit_identical(&one, &two, "2 ranks vs 1: loss");
    assert_bit_identical(
        &grad_norms(a.path()),
        &grad_norms(b.path()),
        "2 ranks vs 1: gradient norm",
    );
}

/// ZeRO-1 equals plain data parallelism, and its checkpoint (the moments of every shard)
/// resumes both on one rank without ZeRO-1 and on two ranks with it.
#[test]
fn zero1_equals_plain_data_parallel_and_its_checkpoint_resumes_on_any_ranks() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let every = ["--max-steps", "10", "--set", "checkpoint.every=5"];
    let plain = train(2, a.path(), &in_regime(&every));
    let mut zero1_args = in_regime(&every);
    zero1_args.extend(["--set", "parallel.zero1=true"]);
    let zero1 = train(2, b.path(), &zero1_args);
    assert_eq!(plain.len(), 10);
    assert_within_reassociation_bound(&plain, &zero1, 0, LONGEST_SUM, "ZeRO-1 vs plain");
    let ckpt = b.path().join("checkpoints/step_00000005");
    let resume = ["--max-steps", "10", "--resume", ckpt.to_str().unwrap()];
    let out = tempfile::tempdir().unwrap();
    let on_one = train(1, out.path(), &in_regime(&resume));
    assert_within_reassociation_bound(
        &plain[5..],
        &on_one,
        5,
        LONGEST_SUM,
        "ZeRO-1 checkpoint resumed on 1 rank",
    );
    let out = tempfile::tempdir().unwrap();
    let mut again = in_regime(&resume);
    again.extend(["--set", "parallel.zero1=true"]);
    let on_two = train(2, out.path(), &again);
    assert_bit_identical(
        &zero1[5..],
        &on_two,
        "ZeRO-1 checkpoint resumed on 2 ranks with ZeRO-1",
    );
}

#[test]
fn checkpoints_resume_on_a_different_number_of_ranks() {
    let full = tempfile::tempdir().unwrap();
    let reference = train(
        1,
        full.path(),
        &["--max-steps", "12", "--set", "checkpoint.every=6"],
    );
    let two = tempfile::tempdir().unwrap();
    let on_two = train(
        2,
        two.path(),
        &["--max-steps", "12", "--set", "checkpoint.every=6"],
    );
    assert_bit_identical(&reference, &on_two, "2 ranks vs 1");
    // A 2-rank checkpoint resumed on 1 rank, and a 1-rank one on 2 ranks.
    for (ranks, src) in [(1, two.path()), (2, full.path())] {
        let out = tempfile::tempdir().unwrap();
        let ckpt = src.join("checkpoints/step_00000006");
        let resumed = train(
            ranks,
            out.path(),
            &["--max-steps", "12", "--resume", ckpt.to_str().unwrap()],
        );
        assert_bit_identical(
            &reference[6..],
            &resumed,
            &format!("resume on {ranks} rank(s)"),
        );
    }
}

/// Megatron-style tensor parallelism: heads and FFN units split over 2 ranks computes the
/// same training run as one rank. The split changes the forward's sums (attention and FFN
/// outputs are sums of per-rank partials), not only the gradient sums.
#[test]
fn tensor_parallel_two_equals_one_rank() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = in_regime(&["--max-steps", "10"]);
    let one = train(1, a.path(), &args);
    args.extend(["--set", "parallel.tensor=2"]);
    let two = train(2, b.path(), &args);
    assert_eq!(one.len(), 10);
    assert_within_reassociation_bound(&one, &two, 0, LONGEST_SUM, "tensor 2 vs 1 rank");
}

/// data 2 x tensor 2 with ZeRO-1 over the data groups equals one rank; its checkpoint (the
/// whole model, gathered) resumes on one rank, and a one-rank checkpoint resumes on tensor 2.
#[test]
fn data_and_tensor_parallel_with_zero1_and_resume_across_layouts() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut args = in_regime(&["--max-steps", "8", "--set", "checkpoint.every=4"]);
    let one = train(1, a.path(), &args);
    args.extend([
        "--set",
        "parallel.tensor=2",
        "--set",
        "parallel.data=2",
        "--set",
        "parallel.zero1=true",
    ]);
    let four = train(4, b.path(), &args);
    assert_within_reassociation_bound(
        &one,
        &four,
        0,
        LONGEST_SUM,
        "data 2 x tensor 2 (ZeRO-1) vs 1 rank",
    );
    for (ranks, src, extra) in [
        (1, b.path(), vec![]),
        (2, a.path(), vec!["--set", "parallel.tensor=2"]),
    ] {
        let out = tempfile::tempdir().unwrap();
        let ckpt = src.join("checkpoints/step_00000004");
        let mut r = in_regime(&["--max-steps", "8", "--resume", ckpt.to_str().unwrap()]);
        r.extend(extra);
        let resumed = train(ranks, out.path(), &r);
        assert_within_reassociation_bound(
            &one[4..],
            &resumed,
            4,
            LONGEST_SUM,
            &format!("resume on {ranks} rank(s)"),
        );
    }
}

#[test]
fn tensor_parallel_width_must_divide_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut args: Vec<&str> = COMMON.to_vec();
    args.extend(["--out-dir", dir.path().to_str().unwrap()]);
    args.extend(["--max-steps", "2", "--set", "parallel.tensor=2"]);
    let o = mpirun_output(3, &args);
    assert_fails_naming(&o, &["parallel.tensor"]);
}

#[test]
fn a_rank_with_a_different_config_stops_the_whole_job_naming_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let start = Instant::now();
    let app = |extra: &'static [&'static str]| {
        let mut args = vec!["--config", "configs/tiny.yaml", "--quiet"];
        args.extend(extra);
        args.extend(["--out-dir", out.to_str().unwrap()]);
        args
    };
    // Two MPI apps in one job: rank 1 sets another learning rate.
    let o = mpirun()
        .args(["-n", "1"])
        .arg(binary())
        .args(app(&[]))
        .args([":", "-n", "1"])
        .arg(binary())
        .args(app(&["--set", "train.lr=0.002"]))
        .output()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(60), "no hang");
    assert_fails_naming(&o, &["rank", "config"]);
}

/// SIGUSR1 to `mpirun` (forwarded to every rank at once) stops all ranks of a data 1 x
/// tensor 2 run at the same step with one checkpoint of the whole model, which resumes.
#[test]
fn a_signal_to_mpirun_stops_every_rank_at_one_step_with_one_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args: Vec<&str> = COMMON.to_vec();
    args.extend(["--out-dir", run.to_str().unwrap()]);
    args.extend(["--max-steps", "100000", "--set", "parallel.tensor=2"]);
    let mut t = Trainer::spawn_mpirun(2, &args);
    t.wait_for_steps(&run, 3, Duration::from_secs(120));
    t.signal(libc::SIGUSR1);
    let status = t
        .wait_timeout(Duration::from_secs(60))
        .expect("ranks still running 60 s after SIGUSR1");
    let (out, err) = t.output();
    assert!(status.success(), "{status}\n{out}\n{err}");
    let done = step_records(&run).len();
    assert!(
        out.contains(&format!(
            "stop requested: checkpoint written at step {done}"
        )),
        "{out}"
    );
    let latest = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step_{done:08}"));
    let mut more: Vec<&str> = COMMON.to_vec();
    let until = (done + 2).to_string();
    more.extend(["--out-dir", run.to_str().unwrap(), "--resume"]);
    more.extend(["--max-steps", &until, "--set", "parallel.tensor=2"]);
    assert_success(&mpirun_output(2, &more));
    assert_eq!(step_records(&run).len(), done + 2);
}
