//! Builds the benchmark's XDP programs (`bench/ebpf`: `xdp_pass`, `xdp_gen`,
//! `xdp_sink`, `xdp_parts`, `xdp_redirect`) the way bgswitch/build.rs builds the data plane,
//! with the same shared step (`bgswitch/build_support.rs`). Under
//! `AYA_BUILD_SKIP=1` the objects are empty and the benchmark refuses to run.
use std::{env, path::PathBuf};

#[path = "../bgswitch/build_support.rs"]
mod build_support;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("ebpf");
    build_support::build_ebpf(
        "bgswitch-bench-ebpf",
        ebpf_dir,
        &[
            "xdp_pass",
            "xdp_gen",
            "xdp_sink",
            "xdp_parts",
            "xdp_redirect",
        ],
    )
}
