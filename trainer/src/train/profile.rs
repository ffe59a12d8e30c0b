//! `--profile-steps A..B`: a Chrome trace of optimizer steps A to B (the step numbers of the
//! log line, both included), written to `RUN/trace.json` (rank r > 0: `RUN/trace.rank<r>.json`)
//! by libtorch's profiler ([`sparse_kernels::torch::profiler`]). It holds every libtorch op
//! with its input shapes, on CUDA every kernel and copy, and the trainer's named regions
//! (`micro_batch.forward`, `attention`, `ffn`, `lm_head`, `micro_batch.backward`,
//! `grad_reduce`, `optimizer`). Open it in Perfetto (ui.perfetto.dev) or chrome://tracing.
use anyhow::{bail, Context, Result};
use sparse_kernels::torch::profiler;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tch::Device;

/// The steps to profile, as the log numbers them (1-based), both included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSteps {
    pub first: usize,
    pub last: usize,
}

impl FromStr for ProfileSteps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "`{s}`: expected A..B with 1 <= A <= B, the step numbers of the log line \
                 (e.g. 5..6), or one step A"
            )
        };
        let (a, b) = s.split_once("..").unwrap_or((s, s));
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
        let (first, last) = (parse(a)?, parse(b)?);
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(ProfileSteps { first, last })
    }
}

/// Starts the profiler before step `first` and writes the trace after step `last` (or when
/// the run ends earlier).
pub struct StepProfiler {
    steps: ProfileSteps,
    path: PathBuf,
    device: Device,
    running: bool,
}

impl StepProfiler {
    /// The profiler of `steps` for the rank `rank` of a run writing to `out_dir`; an error
    /// when the run's steps `resumed_at + 1 ..= max_steps` do not reach `steps.first`.
    pub fn new(
        steps: ProfileSteps,
        out_dir: &Path,
        rank: usize,
        device: Device,
        resumed_at: usize,
        max_steps: usize,
    ) -> Result<StepProfiler> {
        if steps.first <= resumed_at || steps.first > max_steps {
            bail!(
                "--profile-steps {}..{}: this run trains steps {}..{}; profile steps inside it",
                steps.first,
                steps.last,
                resumed_at + 1,
                max_steps
            );
        }
        let name = match rank {
            0 => "trace.json".to_string(),
            r => format!("trace.rank{r}.json"),
        };
        Ok(StepProfiler {
            steps,
            path: out_dir.join(name),
            device,
            running: false,
        })
    }

    /// Before 0-based step `step`: starts recording when it is the first profiled one.
    pub fn before_step(&mut self, step: usize) -> Result<()> {
        if step + 1 == self.steps.first {
            profiler::start(self.device.is_cuda())?;
            self.running = true;
        }
        Ok(())
    }

    /// After 0-based step `step`: writes the trace when it was the last profiled one and
    /// returns its path.
    pub fn after_step(&mut self, step: usize) -> Result<Option<&Path>> {
        if step + 1 == self.steps.last {
            return self.finish();
        }
        Ok(None)
    }

    /// Writes the trace if recording (the run ended inside the profiled steps).
    pub fn finish(&mut self) -> Result<Option<&Path>> {
        if !self.running {
            return Ok(None);
        }
        self.running = false;
        // The kernels queued so far belong in the trace.
        crate::model::generate::synchronize(self.device);
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the run directory {}", dir.display()))?;
        }
        profiler::stop(&self.path)?;
        Ok(Some(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_as_log_numbers() {
        let p = |s: &str| s.parse::<ProfileSteps>();
        assert_eq!(p("5..6"), Ok(ProfileSteps { first: 5, last: 6 }));
        assert_eq!(p("3"), Ok(ProfileSteps { first: 3, last: 3 }));
        for bad in ["0..2", "6..5", "a..b", "..4", ""] {
            assert!(p(bad).unwrap_err().contains("expected A..B"), "{bad}");
        }
    }

    #[test]
    fn steps_outside_the_run_are_refused() {
        let steps = ProfileSteps { first: 5, last: 6 };
        let dir = Path::new("runs/x");
        let e = StepProfiler::new(steps, dir, 0, Device::Cpu, 10, 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("trains steps 11..20"), "{e}");
        assert!(StepProfiler::new(steps, dir, 0, Device::Cpu, 0, 4).is_err());
        assert!(StepProfiler::new(steps, dir, 0, Device::Cpu, 4, 5).is_ok());
    }
}
