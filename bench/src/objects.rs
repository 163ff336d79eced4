//! The benchmark's own XDP objects, built by bench/build.rs from `bench/ebpf`.

/// Returns XDP_PASS: the baseline of every program-cost figure.
pub static XDP_PASS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_pass"));
/// The live-frames packet generator.
pub static XDP_GEN: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_gen"));
/// Counts and drops: the receiver.
pub static XDP_SINK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_sink"));

/// Component micro-programs (`part_*`), priced against XDP_PASS.
pub static XDP_PARTS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_parts"));

/// Writes MACs and redirects, nothing else: the ceiling of an XDP forwarder.
pub static XDP_REDIRECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp_redirect"));

/// Fails if the objects are the empty stubs of an `AYA_BUILD_SKIP` build.
pub fn check() -> anyhow::Result<()> {
    if XDP_PASS.is_empty()
        || XDP_GEN.is_empty()
        || XDP_SINK.is_empty()
        || XDP_PARTS.is_empty()
        || XDP_REDIRECT.is_empty()
    {
        anyhow::bail!(
            "bgswitch-bench was built with AYA_BUILD_SKIP: its XDP programs are empty; rebuild it"
        );
    }
    Ok(())
}
