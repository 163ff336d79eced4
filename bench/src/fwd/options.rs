//! What part 2 runs: its options (full and quick) and its configurations,
//! each with its key, label and flow counts.

use crate::sys;

#[derive(Clone, Debug)]
pub struct FwdOptions {
    pub rounds: usize,
    /// Frames per run.
    pub frames: u32,
    pub batch: u32,
    pub cpu: usize,
    /// Flow-table size of the part-2 data plane (the daemon's default), and
    /// of the one for flow counts above it.
    pub max_flows: u32,
    pub big_max_flows: u32,
    /// bgswitch flow counts of part 2.
    pub bg_flows: Vec<u32>,
    /// The same through bgswitch's TC program.
    pub tc_flows: Vec<u32>,
    /// Flow counts through a stateless service in its stable period (TCP).
    pub stateless_flows: Vec<u32>,
    pub nft_flows: Vec<u32>,
    pub kernel_flows: u32,
    /// IPv6: bgswitch flow counts (the table path), and the kernel's own
    /// IPv6 forwarding (None: not run).
    pub bg6_flows: Vec<u32>,
    pub kernel6_flows: Option<u32>,
    /// Part 5: flows through a table of `scale_max_flows` (empty: skip).
    pub scale_max_flows: u32,
    pub scale_flows: Vec<u32>,
    pub floor: bool,
    /// Also run bgswitch with a new flow in every packet.
    pub new_flows: bool,
    /// Frames of the paced loss check per configuration.
    pub paced_frames: u32,
    /// Flips watched frame by frame (`Rig::follow`), and frames per trial.
    pub follow_trials: usize,
    pub follow_frames: u32,
    /// Flows per CPU of the two-CPU rows (empty: none).
    pub two_cpu_flows: Vec<u32>,
    /// The SYN flood: connections open before it, and its frames (0: skip).
    pub flood_established: u32,
    pub flood_frames: u32,
}

impl FwdOptions {
    /// Every configuration, in round order, and part 5's after them.
    pub(super) fn configs(&self) -> Vec<Config> {
        let mut v = Vec::new();
        if self.floor {
            v.push(Config::Floor);
            v.push(Config::Redirect);
            if !self.bg6_flows.is_empty() || self.kernel6_flows.is_some() {
                v.push(Config::Floor6);
            }
        }
        v.extend(self.bg_flows.iter().map(|&n| Config::Bgswitch(n)));
        v.extend(self.tc_flows.iter().map(|&n| Config::BgswitchTc(n)));
        v.extend(self.stateless_flows.iter().map(|&n| Config::Stateless(n)));
        if self.new_flows {
            v.push(Config::NewFlows);
        }
        v.push(Config::Kernel(self.kernel_flows));
        v.extend(self.bg6_flows.iter().map(|&n| Config::Bgswitch6(n)));
        v.extend(self.kernel6_flows.map(Config::Kernel6));
        if sys::have("nft").is_some() {
            v.extend(self.nft_flows.iter().map(|&n| Config::Nft(n)));
            // The stateless rows' peer: the same DNAT for TCP ACKs.
            if !self.stateless_flows.is_empty() {
                v.extend(self.nft_flows.last().map(|&n| Config::NftTcp(n)));
            }
        }
        v.extend(self.scale_flows.iter().map(|&n| Config::Scale(n)));
        if sys::cpus() >= 2 {
            // What the path gives two CPUs without bgswitch: the floor and
            // the redirect ceiling, with two generators as well.
            if self.floor && !self.two_cpu_flows.is_empty() {
                v.push(Config::Floor2);
                v.push(Config::Redirect2);
            }
            for &n in &self.two_cpu_flows {
                v.push(Config::Bgswitch2(n));
                v.push(Config::Stateless2(n));
            }
        }
        v
    }

    pub fn full(cpu: usize) -> Self {
        Self {
            rounds: 7,
            frames: 2_000_000,
            batch: 64,
            cpu,
            max_flows: bgswitch_common::DEFAULT_MAX_FLOWS,
            big_max_flows: 1 << 21,
            bg_flows: vec![1, 10_000, 1_000_000],
            tc_flows: vec![1, 10_000],
            stateless_flows: vec![1, 10_000, 1_000_000],
            nft_flows: vec![1, 10_000],
            kernel_flows: 10_000,
            bg6_flows: vec![1, 10_000],
            kernel6_flows: Some(10_000),
            scale_max_flows: 1 << 20,
            scale_flows: vec![1, 10_000, 100_000, 500_000, 1_000_000, 1 << 20],
            floor: true,
            new_flows: true,
            paced_frames: 500_000,
            follow_trials: 20,
            follow_frames: 300_000,
            two_cpu_flows: vec![10_000],
            flood_established: 1000,
            flood_frames: 4_000_000,
        }
    }
    pub fn quick(cpu: usize) -> Self {
        Self {
            rounds: 3,
            frames: 200_000,
            batch: 64,
            cpu,
            max_flows: bgswitch_common::DEFAULT_MAX_FLOWS,
            big_max_flows: 1 << 21,
            bg_flows: vec![10_000],
            tc_flows: vec![10_000],
            stateless_flows: vec![10_000],
            nft_flows: vec![10_000],
            kernel_flows: 10_000,
            bg6_flows: vec![10_000],
            kernel6_flows: Some(10_000),
            scale_max_flows: 0,
            scale_flows: vec![],
            floor: false,
            new_flows: false,
            paced_frames: 200_000,
            follow_trials: 3,
            follow_frames: 200_000,
            two_cpu_flows: vec![10_000],
            flood_established: 200,
            flood_frames: 600_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Config {
    Floor,
    /// `xdp_redirect` on l0: MACs and a DevMap redirect to l1, nothing else.
    Redirect,
    Bgswitch(u32),
    /// bgswitch's TC program on l0 and l1.
    BgswitchTc(u32),
    Kernel(u32),
    Nft(u32),
    /// Part 5: the scale data plane.
    Scale(u32),
    /// bgswitch with a new flow in every packet (the table full, evicting).
    NewFlows,
    /// bgswitch, a stateless service in its stable period (TCP ACKs).
    Stateless(u32),
    /// nftables DNAT of TCP ACKs (conntrack picks up mid-stream flows).
    NftTcp(u32),
    /// IPv6 (`xdp_gen6`'s frames): the floor, bgswitch (table path), the
    /// kernel's forwarding.
    Floor6,
    Bgswitch6(u32),
    Kernel6(u32),
    /// Two generators at once, on CPUs 0 and 1 (two-queue veths: each
    /// CPU's frames are received and forwarded on that CPU), each with
    /// flows of its own: bgswitch's table path, and a stateless service.
    /// The floor and the redirect ceiling with two generators at once.
    Floor2,
    Redirect2,
    Bgswitch2(u32),
    Stateless2(u32),
}

pub(super) fn flows(n: u32) -> String {
    if n == 1 {
        "1 flow".into()
    } else {
        format!("{n} flows")
    }
}

impl Config {
    pub(super) fn key(self) -> String {
        match self {
            Config::Floor => "generator_to_drop_floor".into(),
            Config::Redirect => "xdp_redirect_ceiling".into(),
            Config::Bgswitch(n) => format!("bgswitch_{n}_flows"),
            Config::BgswitchTc(n) => format!("bgswitch_tc_{n}_flows"),
            Config::Kernel(n) => format!("kernel_forwarding_{n}_flows"),
            Config::Nft(n) => format!("nftables_dnat_{n}_flows"),
            Config::NftTcp(n) => format!("nftables_dnat_tcp_{n}_flows"),
            Config::Scale(n) => format!("bgswitch_full_table_{n}_flows"),
            Config::NewFlows => "bgswitch_new_flow_every_packet".into(),
            Config::Stateless(n) => format!("bgswitch_stateless_{n}_flows"),
            Config::Floor6 => "ipv6_generator_to_drop_floor".into(),
            Config::Bgswitch6(n) => format!("ipv6_bgswitch_{n}_flows"),
            Config::Kernel6(n) => format!("ipv6_kernel_forwarding_{n}_flows"),
            Config::Bgswitch2(n) => format!("bgswitch_{n}_flows_two_cpus"),
            Config::Stateless2(n) => format!("bgswitch_stateless_{n}_flows_two_cpus"),
            Config::Floor2 => "generator_to_drop_floor_two_cpus".into(),
            Config::Redirect2 => "xdp_redirect_ceiling_two_cpus".into(),
        }
    }
    pub(super) fn label(self) -> String {
        match self {
            Config::Floor => "generator → drop (floor)".into(),
            Config::Redirect => {
                "XDP redirect alone: MACs + DevMap, no parse or lookup (ceiling)".into()
            }
            Config::Bgswitch(n) | Config::Scale(n) => format!("bgswitch, {}", flows(n)),
            Config::BgswitchTc(n) => format!("bgswitch TC, {}", flows(n)),
            Config::Kernel(n) => format!("plain kernel forwarding, {}", flows(n)),
            Config::Nft(n) => format!("nftables DNAT, {}", flows(n)),
            Config::NftTcp(n) => format!("nftables DNAT (TCP), {}", flows(n)),
            Config::NewFlows => "bgswitch, a new flow in every packet".into(),
            Config::Stateless(n) => format!("bgswitch stateless (TCP), {}", flows(n)),
            Config::Floor6 => "IPv6: generator → drop (floor)".into(),
            Config::Bgswitch6(n) => format!("IPv6: bgswitch, {}", flows(n)),
            Config::Kernel6(n) => format!("IPv6: plain kernel forwarding, {}", flows(n)),
            Config::Bgswitch2(n) => format!("two CPUs: bgswitch, {} per CPU", flows(n)),
            Config::Stateless2(n) => {
                format!("two CPUs: bgswitch stateless (TCP), {} per CPU", flows(n))
            }
            Config::Floor2 => "two CPUs: generator → drop (floor)".into(),
            Config::Redirect2 => "two CPUs: XDP redirect alone (ceiling)".into(),
        }
    }
    pub(super) fn two_cpus(self) -> bool {
        matches!(
            self,
            Config::Bgswitch2(_) | Config::Stateless2(_) | Config::Floor2 | Config::Redirect2
        )
    }
    pub(super) fn ipv6(self) -> bool {
        matches!(
            self,
            Config::Floor6 | Config::Bgswitch6(_) | Config::Kernel6(_)
        )
    }
    /// Flow-table size (max_flows) of the data plane this configuration
    /// uses; 0 for none.
    pub(super) fn table(self, o: &FwdOptions) -> u32 {
        match self {
            Config::Bgswitch(n) | Config::BgswitchTc(n) | Config::Bgswitch6(n)
                if n <= o.max_flows =>
            {
                o.max_flows
            }
            Config::Bgswitch6(_) => o.big_max_flows,
            Config::Bgswitch(_) | Config::BgswitchTc(_) => o.big_max_flows,
            Config::Scale(_) => o.scale_max_flows,
            // Its own data plane (evicting all the time), half the default size.
            Config::NewFlows => o.max_flows / 2,
            // Records nothing: the default table, unused.
            Config::Stateless(_) | Config::Stateless2(_) => o.max_flows,
            Config::Bgswitch2(_) => o.max_flows,
            _ => 0,
        }
    }
    pub(super) fn flows(self) -> u32 {
        match self {
            Config::Floor
            | Config::Redirect
            | Config::Floor6
            | Config::Floor2
            | Config::Redirect2 => 1,
            Config::Bgswitch(n)
            | Config::BgswitchTc(n)
            | Config::Kernel(n)
            | Config::Nft(n)
            | Config::NftTcp(n)
            | Config::Scale(n)
            | Config::Stateless(n)
            | Config::Bgswitch6(n)
            | Config::Kernel6(n)
            | Config::Bgswitch2(n)
            | Config::Stateless2(n) => n,
            // Longer than any run: every frame of a run is a flow of its own.
            Config::NewFlows => u32::MAX,
        }
    }
}
