//! The eBPF build step shared by `bgswitch/build.rs` (the data plane) and
//! `bench/build.rs` (the benchmark's programs), included by both with
//! `#[path]`: the nightly toolchain and bpf-linker through aya-build, release
//! profile.
//!
//! `cargo xtask setup` installs bpf-linker under `/opt/bgswitch/toolchain/bin`
//! (override with `BGSWITCH_TOOLCHAIN`); that directory is put on PATH here so
//! a plain `cargo build` finds it. With `AYA_BUILD_SKIP=1` the eBPF build is
//! skipped and empty objects are written so `cargo check`/clippy work without
//! the BPF toolchain (the resulting binaries refuse to load them).
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

const TOOLCHAIN_DEFAULT: &str = "/opt/bgswitch/toolchain";

/// Builds the eBPF crate `package` at `root_dir` (its objects land in
/// OUT_DIR for `include_bytes_aligned!`), or writes the empty `stubs` there
/// under `AYA_BUILD_SKIP=1`.
pub fn build_ebpf(package: &str, root_dir: PathBuf, stubs: &[&str]) -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BGSWITCH_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        for s in stubs {
            std::fs::write(out_dir.join(s), []).context("writing an empty eBPF stub")?;
        }
        return Ok(());
    }

    let toolchain = env::var("BGSWITCH_TOOLCHAIN").unwrap_or_else(|_| TOOLCHAIN_DEFAULT.into());
    let bin = PathBuf::from(toolchain).join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin.clone());
    }
    if !dirs.iter().any(|d| d.join("bpf-linker").is_file()) {
        return Err(anyhow!(
            "bpf-linker not found on PATH nor in {}: run `cargo xtask setup` (as root) first, \
             or build with AYA_BUILD_SKIP=1 for a check-only build",
            bin.display()
        ));
    }
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", env::join_paths(dirs)?) };

    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: package,
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
