//! `--spin-fwd`: one configuration run for a while, for profiling and
//! interleaved A/B of two builds.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::{run_config, Config, FwdOptions, Rig};
use crate::stats::median;

/// Profiling aid: runs one configuration (`floor`, `redirect`, `bgswitch:N`, `tc:N`, `kernel:N`,
/// `nft:N`, `stateless:N`, `nfttcp:N`, `new`, `floor6`, `bgswitch6:N`, `kernel6:N`, `bgswitch2:N`,
/// `stateless2:N`, `floor2`, `redirect2`) repeatedly for `seconds` (warmed up first); returns the median
/// rate in Mpps.
pub fn spin(spec: &str, seconds: f64, cpu: usize) -> Result<f64> {
    let (kind, n) = spec.split_once(':').unwrap_or((spec, "1"));
    let n: u32 = n.parse().context("flows")?;
    let c = match kind {
        "floor" => Config::Floor,
        "redirect" => Config::Redirect,
        "bgswitch" => Config::Bgswitch(n),
        "tc" => Config::BgswitchTc(n),
        "kernel" => Config::Kernel(n),
        "nft" => Config::Nft(n),
        "nfttcp" => Config::NftTcp(n),
        "new" => Config::NewFlows,
        "stateless" => Config::Stateless(n),
        "floor6" => Config::Floor6,
        "floor2" => Config::Floor2,
        "redirect2" => Config::Redirect2,
        "bgswitch6" => Config::Bgswitch6(n),
        "kernel6" => Config::Kernel6(n),
        "bgswitch2" => Config::Bgswitch2(n),
        "stateless2" => Config::Stateless2(n),
        other => bail!("unknown configuration {other}"),
    };
    let mut opts = FwdOptions::quick(cpu);
    opts.bg_flows = vec![];
    opts.tc_flows = vec![];
    opts.nft_flows = vec![];
    opts.stateless_flows = vec![];
    opts.bg6_flows = vec![];
    opts.kernel6_flows = None;
    if let Config::Bgswitch6(n) = c {
        opts.bg6_flows = vec![n];
    }
    if let Config::Kernel6(n) = c {
        opts.kernel6_flows = Some(n);
    }
    if let Config::Stateless(n) = c {
        opts.stateless_flows = vec![n];
    }
    if let Config::Bgswitch(n) = c {
        opts.bg_flows = vec![n];
    }
    if let Config::BgswitchTc(n) = c {
        opts.tc_flows = vec![n];
    }
    if let Config::Nft(n) | Config::NftTcp(n) = c {
        opts.nft_flows = vec![n];
    }
    opts.two_cpu_flows = vec![];
    if let Config::Bgswitch2(n) | Config::Stateless2(n) = c {
        opts.two_cpu_flows = vec![n];
    }
    opts.new_flows = c == Config::NewFlows;
    opts.frames = 1_000_000;
    let mut rig = Rig::create(&opts)?;
    run_config(&mut rig, c, n.saturating_mul(2).max(opts.frames), &opts)?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut rates = Vec::new();
    let which = rig.attached;
    let counts = |rig: &Rig| {
        ["redirect", "flow_cache_fills", "fib_lookups", "flow_hits"]
            .map(|k| rig.bg_global(which, k))
    };
    let before = counts(&rig);
    while Instant::now() < end {
        rates.push(run_config(&mut rig, c, opts.frames, &opts)?.rate_mpps);
    }
    if which != 0 {
        let after = counts(&rig);
        let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
        eprintln!(
            "{spec}: per redirected frame: {:.3} cache fills, {:.3} FIB lookups, {:.3} flow hits",
            d[1] as f64 / d[0].max(1) as f64,
            d[2] as f64 / d[0].max(1) as f64,
            d[3] as f64 / d[0].max(1) as f64,
        );
    }
    Ok(median(&rates))
}
