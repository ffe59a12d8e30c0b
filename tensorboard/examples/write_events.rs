//! Writes a run that is interrupted and resumed, for `tests/test_read_events.py`.
//!
//! `write_events DIR STEPS RESUME_STEP`: a first writer logs `train/loss` = 1/(step+1) and
//! `train/lr` = 0.001 for steps `0..STEPS`; a second writer (the resumed run) marks a restart at
//! `RESUME_STEP` and logs `train/loss` = 100 + step and `train/lr` = 0.002 for steps
//! `RESUME_STEP..STEPS + 5`.

use std::path::Path;

use sparse_tensorboard::{EventWriter, TensorboardError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, steps, resume] = args.as_slice() else {
        return Err("usage: write_events DIR STEPS RESUME_STEP".into());
    };
    let dir = Path::new(dir);
    let steps: i64 = steps.parse()?;
    let resume: i64 = resume.parse()?;
    write_first_run(dir, steps)?;
    write_resumed_run(dir, resume, steps + 5)?;
    Ok(())
}

fn write_first_run(dir: &Path, steps: i64) -> Result<(), TensorboardError> {
    let mut writer = EventWriter::create(dir)?;
    for step in 0..steps {
        writer.add_scalars(
            step,
            &[
                ("train/loss", 1.0 / (step as f32 + 1.0)),
                ("train/lr", 0.001),
            ],
        )?;
    }
    writer.flush()
}

fn write_resumed_run(dir: &Path, resume: i64, end: i64) -> Result<(), TensorboardError> {
    let mut writer = EventWriter::create(dir)?;
    writer.mark_restart(resume)?;
    for step in resume..end {
        writer.add_scalar("train/loss", 100.0 + step as f32, step)?;
        writer.add_scalar("train/lr", 0.002, step)?;
    }
    writer.flush()
}
