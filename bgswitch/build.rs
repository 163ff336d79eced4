//! Builds the XDP program (`bgswitch-ebpf`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! `cargo xtask setup` installs bpf-linker under `/opt/bgswitch/toolchain/bin`
//! (override with `BGSWITCH_TOOLCHAIN`); that directory is put on PATH here so a
//! plain `cargo build` finds it. With `AYA_BUILD_SKIP=1` the eBPF build is
//! skipped and an empty object is written so `cargo check`/clippy work without
//! the BPF toolchain (the resulting binary refuses to load it).
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

const TOOLCHAIN_DEFAULT: &str = "/opt/bgswitch/toolchain";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BGSWITCH_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(out_dir.join("bgswitch"), []).context("writing the empty eBPF stub")?;
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

    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("bgswitch-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={root_dir}/../bgswitch-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "bgswitch-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
