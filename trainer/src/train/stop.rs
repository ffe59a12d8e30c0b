//! Graceful stop: SIGINT (Ctrl-C), SIGTERM and SIGUSR1 ask the loop to finish the current
//! step, write a checkpoint and exit 0; a second SIGINT exits at once (status 130).
//!
//! Under `mpirun`, SIGTERM reaches ranks about a second before SIGKILL, while SIGUSR1 is
//! forwarded at once with no kill after it: `kill -USR1 <mpirun pid>` is the reliable way
//! to stop a multi-rank run with a checkpoint.
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone)]
pub struct StopSignal {
    flag: Arc<AtomicBool>,
}

impl StopSignal {
    /// Installs the handlers.
    pub fn install() -> std::io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        // Order matters: the conditional shutdown sees the flag set by an earlier SIGINT.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, Arc::clone(&flag))?;
        for sig in [SIGINT, SIGTERM, SIGUSR1] {
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
        }
        Ok(StopSignal { flag })
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}
