//! The processes of one `mpirun` job's ranks, found through `/proc` (Linux): the drills
//! signal one rank of a running job, not the whole job.
use std::path::Path;
use std::time::{Duration, Instant};

/// Parent pid of `pid`, from `/proc/PID/stat` (the field after the command's parentheses).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `ancestor` is `pid`'s parent, grandparent, ...
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match parent_of(p) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => p = parent,
            _ => return false,
        }
    }
    false
}

/// The world rank Open MPI gave process `pid` (`OMPI_COMM_WORLD_RANK` in its environment).
fn mpi_rank_of(pid: u32) -> Option<usize> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|&b| b == 0).find_map(|var| {
        let value = var.strip_prefix(b"OMPI_COMM_WORLD_RANK=")?;
        std::str::from_utf8(value).ok()?.parse().ok()
    })
}

/// The pid of rank `rank` of the job `mpirun` (pid `mpirun_pid`) started, waiting up to
/// `limit` for it to appear.
pub fn rank_pid(mpirun_pid: u32, rank: usize, limit: Duration) -> u32 {
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(Path::new("/proc"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| mpi_rank_of(pid) == Some(rank) && descends_from(pid, mpirun_pid));
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            start.elapsed() < limit,
            "no rank {rank} under mpirun (pid {mpirun_pid}) after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` to process `pid` (a rank found by [`rank_pid`]).
pub fn signal_pid(pid: u32, sig: i32) {
    // SAFETY: a plain syscall; a pid that is gone gives ESRCH, reported below.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}
