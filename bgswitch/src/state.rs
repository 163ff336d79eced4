//! The durable desired state: one JSON file in the state directory, replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), and
//! the lock that keeps a second daemon out.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    model::{Change, DesiredState},
    paths,
};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct StateFile {
    version: u32,
    #[serde(flatten)]
    state: DesiredState,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a bgswitch state file ({reason}); refusing to start on a guessed colour — \
         fix or move the file aside"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another bgswitch daemon holds {path} (pid {pid})")]
    Locked { path: PathBuf, pid: String },
}

/// One line of the journal: a change (or a refused attempt) of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub service: String,
    /// "ok", or "refused: …" for an attempt that changed nothing.
    pub outcome: String,
    #[serde(flatten)]
    pub change: Change,
}

/// The state directory and its files.
#[derive(Clone, Debug)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// Creates the directory (mode 0750) if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Dir {
            path: dir.into(),
            source,
        })?;
        Ok(Self { dir: dir.into() })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(paths::STATE_FILE)
    }

    /// Reads the state; a missing file is an empty state (first start).
    pub fn load(&self) -> Result<DesiredState, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DesiredState::default())
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let file: StateFile = serde_json::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "version {} (this daemon reads {STATE_VERSION})",
                    file.version
                ),
            });
        }
        Ok(file.state)
    }

    /// Replaces the state file atomically; on error the old file is intact.
    pub fn save(&self, state: &DesiredState) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{}.tmp", paths::STATE_FILE));
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&StateFile {
            version: STATE_VERSION,
            state: state.clone(),
        })
        .map_err(|e| werr(std::io::Error::other(e)))?;
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o640)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join(paths::JOURNAL_FILE)
    }

    /// Appends one entry to the journal (one JSON line, fsynced).
    pub fn append_journal(&self, entry: &JournalEntry) -> Result<(), StateError> {
        let path = self.journal_path();
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(entry).map_err(|e| werr(std::io::Error::other(e)))?;
        line.push(b'\n');
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&path)
            .map_err(werr)?;
        f.write_all(&line).map_err(werr)?;
        f.sync_data().map_err(werr)
    }

    /// The journal entries of `service` (all services when `None`), oldest
    /// first. Unreadable lines are skipped and reported in the log.
    pub fn read_journal(&self, service: Option<&str>) -> Result<Vec<JournalEntry>, StateError> {
        let path = self.journal_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<JournalEntry>(line) {
                Ok(e) if service.is_none_or(|s| s == e.service) => out.push(e),
                Ok(_) => {}
                Err(e) => log::warn!("{}:{}: unreadable journal line: {e}", path.display(), i + 1),
            }
        }
        Ok(out)
    }

    /// Takes the daemon lock (an exclusive `flock` held for the process's
    /// life). A second daemon on the same state directory gets `Locked`.
    pub fn lock(&self) -> Result<File, StateError> {
        let path = self.dir.join(paths::LOCK_FILE);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Colour, ServiceState};

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bgswitch-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_missing_and_corrupt() {
        let d = tmpdir("rt");
        let store = StateStore::open(&d).unwrap();
        assert_eq!(store.load().unwrap(), DesiredState::default());
        let mut s = DesiredState::default();
        s.services.insert(
            "web".into(),
            ServiceState {
                id: 3,
                active: Colour::Green,
                generation: 7,
                previous: Some(Colour::Blue),
                canary_bp: 250,
                preview: vec!["198.18.0.0/24".into()],
                watch: None,
                confirm: Some(crate::model::Confirm {
                    colour: Colour::Green,
                    deadline_ms: 99,
                }),
                rolled_back: None,
                flips: 1,
                rollbacks: 0,
                history: vec![],
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
        assert!(!d.join("state.json.tmp").exists());
        fs::write(store.path(), "{ not json").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("refusing to start"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn journal_appends_and_filters() {
        let d = tmpdir("journal");
        let store = StateStore::open(&d).unwrap();
        assert!(store.read_journal(None).unwrap().is_empty());
        let mut st = DesiredState::default();
        let cfg = crate::config::parse(
            Path::new("t"),
            "interfaces=[\"e\"]\n[[service]]\nname=\"a\"\nvip=\"1.1.1.1:1\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:1\"]\ngreen=[\"1.1.1.3:1\"]\n[[service]]\nname=\"b\"\nvip=\"1.1.1.1:2\"\nprotocol=\"tcp\"\nblue=[\"1.1.1.2:2\"]\ngreen=[\"1.1.1.3:2\"]\n",
        )
        .unwrap();
        st.reconcile(&cfg).unwrap();
        let req = crate::model::Request::default();
        for name in ["a", "b", "a"] {
            let crate::model::FlipOutcome::Changed(change) =
                st.flip(name, None, &req, &Default::default()).unwrap()
            else {
                panic!()
            };
            store
                .append_journal(&JournalEntry {
                    service: name.into(),
                    outcome: "ok".into(),
                    change,
                })
                .unwrap();
        }
        fs::OpenOptions::new()
            .append(true)
            .open(store.journal_path())
            .unwrap()
            .write_all(b"garbage line\n")
            .unwrap();
        assert_eq!(store.read_journal(None).unwrap().len(), 3);
        let a = store.read_journal(Some("a")).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].change.generation, 3);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn second_lock_is_refused() {
        let d = tmpdir("lock");
        let store = StateStore::open(&d).unwrap();
        let held = store.lock().unwrap();
        let e = store.lock().unwrap_err();
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(held);
        store.lock().unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
