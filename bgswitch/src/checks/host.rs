//! What the host must have for a check to run: its user (never root) and
//! its program (a regular file that user may execute).

use std::{
    ffi::{CStr, CString},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::{
    config::{CheckConfig, Config, ConfigError},
    paths,
};

/// A user a check runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up in the host's user database (NSS); refuses root.
pub fn user(name: &str) -> Result<User, String> {
    let c = CString::new(name).map_err(|_| format!("'{name}' is not a user name"))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `out` points into `pw`
    // (whose strings point into `buf`) or is null.
    let rc = unsafe {
        libc::getpwnam_r(
            c.as_ptr(),
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 {
        return Err(format!(
            "looking up user '{name}': {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if out.is_null() {
        return Err(format!("user '{name}' does not exist on this host"));
    }
    if pw.pw_uid == 0 {
        return Err(format!(
            "user '{name}' is root (uid 0): checks never run as root"
        ));
    }
    // SAFETY: pw_name of a found entry is a valid C string in `buf`.
    let found = unsafe { CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned();
    Ok(User {
        name: found,
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// The program `command0` names (an absolute path, or a bare name found in
/// `paths::CHECK_PATH`), if it is a regular file `user` may execute.
pub fn program(command0: &str, user: &User) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if command0.starts_with('/') {
        vec![PathBuf::from(command0)]
    } else {
        paths::CHECK_PATH
            .split(':')
            .map(|d| Path::new(d).join(command0))
            .collect()
    };
    let mut why = None;
    for p in candidates {
        match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => why = Some(format!("{}: {e}", p.display())),
            Ok(m) if !m.is_file() => why = Some(format!("{} is not a regular file", p.display())),
            Ok(m) => {
                let mode = m.permissions().mode();
                let bit = if m.uid() == user.uid {
                    0o100
                } else if m.gid() == user.gid {
                    0o010
                } else {
                    0o001
                };
                if mode & bit == 0 {
                    why = Some(format!(
                        "{} is not executable by user {} (mode {:o}, owner uid {}, group gid {})",
                        p.display(),
                        user.name,
                        mode & 0o7777,
                        m.uid(),
                        m.gid()
                    ));
                    continue;
                }
                return Ok(p);
            }
        }
    }
    Err(why.unwrap_or_else(|| {
        if command0.starts_with('/') {
            format!("{command0} does not exist")
        } else {
            format!("'{command0}' is not found in {}", paths::CHECK_PATH)
        }
    }))
}

/// The host checks of every service's checks: the user exists and is not
/// root, the program exists and that user may execute it.
pub fn check_host(config: &Config) -> Result<(), ConfigError> {
    for (i, svc) in config.services.iter().enumerate() {
        for (j, c) in svc.checks.iter().enumerate() {
            let err = |key: &str, reason: String| ConfigError {
                file: config.path.display().to_string(),
                key: format!("service[{i}] ({}).check[{j}] ({}).{key}", svc.name, c.name),
                reason,
            };
            let u = user(&c.user).map_err(|r| err("user", r))?;
            program(first(c), &u).map_err(|r| err("command", r))?;
        }
    }
    Ok(())
}

fn first(c: &CheckConfig) -> &str {
    c.command.first().map_or("", String::as_str)
}
