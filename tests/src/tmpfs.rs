//! A size-limited tmpfs mounted over a fresh temporary directory: a small disk the drills
//! fill up. Mounting needs root (CAP_SYS_ADMIN); [`Tmpfs::mount`] says why when it cannot.
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

/// A mounted tmpfs, unmounted on drop.
pub struct Tmpfs {
    dir: TempDir,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes; `Err` says why it cannot (not root, no mount
    /// permission in this container).
    pub fn mount(bytes: u64) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("mounting a tmpfs needs root".into());
        }
        let dir = TempDir::new().map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path()))?;
        Ok(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes in use on the file system.
    pub fn used_bytes(&self) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs writes into the zeroed struct given; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        (st.f_blocks - st.f_bfree) as u64 * st.f_frsize as u64
    }

    /// Changes the size limit to `bytes` (at least what is in use).
    pub fn resize(&self, bytes: u64) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(self.path()))
        .unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily if a process still holds a file there; the directory goes after it.
        if run(Command::new("umount").arg(self.path())).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(self.path()));
        }
    }
}
