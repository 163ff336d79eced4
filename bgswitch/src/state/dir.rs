//! What the state directory keeps for this host alone, whatever the store
//! of the desired state: the daemon lock and the kernel tick rate of this
//! boot.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::StateError;
use crate::paths;

/// The state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Creates the directory if needed.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(path).map_err(|source| StateError::Dir {
            path: path.into(),
            source,
        })?;
        Ok(Self { path: path.into() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kernel tick rate kept by `keep_tick_rate` for the boot `boot_id`,
    /// if that is this file's boot (anything else, or no file: `None`).
    pub fn kept_tick_rate(&self, boot_id: &str) -> Option<u64> {
        let text = fs::read_to_string(self.path.join(paths::TICK_RATE_FILE)).ok()?;
        let mut words = text.split_whitespace();
        let (boot, hz) = (words.next()?, words.next()?);
        if boot != boot_id || words.next().is_some() {
            return None;
        }
        hz.parse().ok()
    }

    /// Keeps the tick rate measured in the boot `boot_id` for the next
    /// start in the same boot (best effort: the rate can be measured again).
    pub fn keep_tick_rate(&self, boot_id: &str, hz: u64) -> Result<(), StateError> {
        let path = self.path.join(paths::TICK_RATE_FILE);
        let tmp = self.path.join(format!("{}.tmp", paths::TICK_RATE_FILE));
        fs::write(&tmp, format!("{boot_id} {hz}\n"))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    /// Takes the daemon lock (an exclusive `flock` held for the process's
    /// life). A second daemon on the same state directory gets `Locked`.
    pub fn lock(&self) -> Result<File, StateError> {
        let path = self.path.join(paths::LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a valid, owned fd.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            return Err(StateError::Locked {
                path,
                pid: pid.trim().to_string(),
            });
        }
        f.set_len(0).ok();
        let _ = writeln!(f, "{}", std::process::id());
        Ok(f)
    }
}
