//! Builds the benchmark's XDP programs (`bench/ebpf`: `xdp_pass`, `xdp_gen`,
//! `xdp_sink`) with aya-build, like bgswitch/build.rs builds the data plane:
//! nightly + bpf-linker (installed by `cargo xtask setup` under
//! `/opt/bgswitch/toolchain/bin`, override with `BGSWITCH_TOOLCHAIN`), release
//! profile. With `AYA_BUILD_SKIP=1` empty objects are written so check-only
//! builds work; the benchmark then refuses to run.
use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

const TOOLCHAIN_DEFAULT: &str = "/opt/bgswitch/toolchain";
const OBJECTS: [&str; 4] = ["xdp_pass", "xdp_gen", "xdp_sink", "xdp_parts"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=BGSWITCH_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        for o in OBJECTS {
            std::fs::write(out_dir.join(o), []).context("writing an empty eBPF stub")?;
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
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: "bgswitch-bench-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
