//! Builds the XDP program (`bgswitch-ebpf`) for the BPF target and leaves the
//! object in OUT_DIR for `include_bytes_aligned!` (see `build_support.rs`,
//! shared with the benchmark's build script).
use std::{env, path::PathBuf};

#[path = "build_support.rs"]
mod build_support;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .join("..")
        .join("bgswitch-ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir
            .join("..")
            .join("bgswitch-common")
            .join("src")
            .display()
    );
    build_support::build_ebpf("bgswitch-ebpf", ebpf_dir, &["bgswitch"])
}
