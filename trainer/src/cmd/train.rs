//! `sparse-train train` (and bare `sparse-train --config ...`): load the config, join the
//! job's ranks, train.
use crate::config::{Config, DataConfig, DeviceChoice};
use crate::train::profile::ProfileSteps;
use crate::train::{train, RunOptions};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Arguments of `sparse-train train`, also accepted without the subcommand.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrainArgs {
    /// Run config (YAML) to train.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Stop after this many optimizer steps (overrides train.max_steps).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Run directory (overrides train.out_dir).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Override a config value: `--set train.batch_size=16` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Train on uniform random tokens instead of the config's data (throughput runs).
    #[arg(long)]
    pub synthetic_data: bool,
    /// Resume from the run directory's latest checkpoint, or from PATH (a checkpoint or a
    /// run directory).
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Print only the log lines, no progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Write a Chrome trace of steps A..B (the log's step numbers, both included) to
    /// RUN/trace.json: every libtorch op, CUDA kernel and the trainer's regions.
    #[arg(long, value_name = "A..B")]
    pub profile_steps: Option<ProfileSteps>,
}

/// Trains with `args` on every rank of the job (one process without `mpirun`); a failure on
/// any rank ends the job.
pub fn run(args: &TrainArgs) -> Result<()> {
    let Some(path) = &args.config else {
        bail!("nothing to do: pass --config FILE to train, or a subcommand (see --help)");
    };
    let mut cfg = Config::load_with_overrides(path, &args.overrides)?;
    if args.synthetic_data {
        cfg.data = DataConfig {
            synthetic: true,
            ..Default::default()
        };
    }
    let opts = RunOptions {
        max_steps: args.max_steps,
        resume: args.resume.clone(),
        out_dir: args.out_dir.clone(),
        quiet: args.quiet,
        profile_steps: args.profile_steps,
    };
    let world =
        sparse_launch::fail_fast(sparse_launch::World::init(&sparse_launch::WorldOptions {
            cpu_only: cfg.train.device == DeviceChoice::Cpu,
            ..Default::default()
        }));
    let result = train(&cfg, &opts, &world);
    let () = world.fail_fast(result);
    world.finish();
    Ok(())
}
