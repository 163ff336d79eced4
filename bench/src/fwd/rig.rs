//! The test bed of part 2: three namespaces, the generator, the load
//! balancer in each configuration, the sink; runs and their counts.

use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpLinkId, TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use bgswitch::{
    config::AttachSetting,
    dataplane::{backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    model::Colour,
};
use bgswitch_bench_ebpf::{GenConfig, RedirectConfig, SINK_PACKETS};
use bgswitch_common::{PROTO_TCP, PROTO_UDP};
use bgswitch_tests::{in_netns, ip_ns, netns::netns_path, TempNetns};

use super::{
    Config, FwdOptions, GenCfg, RedirectCfg, Rig, FLOOD_ID, FLOOD_PORT, FOLLOW_ID, FOLLOW_PORT,
    FRAME_LEN, GEN6, PORT, SINK6, SINK_ADDR, SINK_ADDR2, SRC6_BASE, SRC_BASE, SRC_PORT_BASE, V6_ID,
    VIP, VIP6,
};
use crate::{cost::xdp_ctx, objects, sys, systems::spawn_in};

pub(super) fn xdp<'a>(e: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    Ok(e.program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?)
}

/// Detaches program `name` of `e`, if `link` says it is attached.
pub(super) fn detach(e: &mut Ebpf, name: &str, link: &mut Option<XdpLinkId>) -> Result<()> {
    if let Some(id) = link.take() {
        xdp(e, name)?.detach(id)?;
    }
    Ok(())
}

/// Attaches program `name` of `e` to interface `ifname` in namespace `ns`,
/// unless `link` says it is attached.
pub(super) fn attach(
    e: &mut Ebpf,
    name: &str,
    link: &mut Option<XdpLinkId>,
    ns: &str,
    ifname: &str,
) -> Result<()> {
    if link.is_none() {
        let id = in_netns(ns, || {
            xdp(e, name)?
                .attach(ifname, XdpMode::Driver)
                .with_context(|| format!("attaching {name} to {ifname}"))
        })??;
        *link = Some(id);
    }
    Ok(())
}

/// Runs the generator in namespace `gen_ns` on `cpu`: `frames` in calls of
/// at most `chunk` (a small chunk paces it: each call returns only after the
/// softirq work its frames caused, unless the kernel deferred it to
/// ksoftirqd). Returns the frames generated and the wall time.
#[allow(clippy::too_many_arguments)]
pub(super) fn generate(
    genp: &mut Ebpf,
    prog: &str,
    gen_ns: &str,
    g0: u32,
    frames: u32,
    chunk: u32,
    batch: u32,
    cpu: usize,
) -> Result<(u64, Duration)> {
    generate_with(xdp(genp, prog)?, gen_ns, g0, frames, chunk, batch, cpu)
}

/// `frames` frames from the generator program `prog` on CPU `cpu`, in calls
/// of `chunk`.
pub(super) fn generate_with(
    prog: &Xdp,
    gen_ns: &str,
    g0: u32,
    frames: u32,
    chunk: u32,
    batch: u32,
    cpu: usize,
) -> Result<(u64, Duration)> {
    in_netns(gen_ns, || -> Result<(u64, Duration)> {
        sys::pin_thread(cpu)?;
        let data = vec![0u8; FRAME_LEN];
        let ctx = xdp_ctx(FRAME_LEN, g0);
        let t = Instant::now();
        let mut sent = 0u32;
        while sent < frames {
            let n = chunk.min(frames - sent);
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(&data),
                    ctx_in: Some(&ctx),
                    repeat: n,
                    attrs: TestRunAttrs::new().xdp_live_frames(batch.min(n)),
                    ..TestRunOptions::new()
                })
                .context("live-frames test run")?;
            ensure!(
                r.return_value == 0,
                "generator run returned {}",
                r.return_value
            );
            sent += n;
        }
        Ok((u64::from(frames), t.elapsed()))
    })?
}

impl Rig {
    pub(super) fn create(opts: &FwdOptions) -> Result<Rig> {
        objects::check()?;
        let gen = TempNetns::create()?;
        let lb = TempNetns::create()?;
        let sink = TempNetns::create()?;
        let (g, l, s) = (
            gen.name().to_string(),
            lb.name().to_string(),
            sink.name().to_string(),
        );
        ip_ns(
            &g,
            &[
                "link",
                "add",
                "g0",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                "l0",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "netns",
                &l,
            ],
        )?;
        ip_ns(
            &l,
            &[
                "link",
                "add",
                "l1",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "type",
                "veth",
                "peer",
                "name",
                "s0",
                "numtxqueues",
                "2",
                "numrxqueues",
                "2",
                "netns",
                &s,
            ],
        )?;
        ip_ns(&g, &["addr", "add", "198.18.0.2/24", "dev", "g0"])?;
        ip_ns(&l, &["addr", "add", "198.18.0.1/24", "dev", "l0"])?;
        ip_ns(&l, &["addr", "add", "198.18.1.1/24", "dev", "l1"])?;
        ip_ns(
            &s,
            &["addr", "add", &format!("{SINK_ADDR}/24"), "dev", "s0"],
        )?;
        // IPv6 twins, without duplicate address detection.
        for (ns, a, dev) in [
            (&g, "2001:db8:18::2/64", "g0"),
            (&l, "2001:db8:18::1/64", "l0"),
            (&l, "2001:db8:18:1::1/64", "l1"),
            (&s, "2001:db8:18:1::2/64", "s0"),
        ] {
            ip_ns(ns, &["-6", "addr", "add", a, "dev", dev, "nodad"])?;
        }
        for (ns, i) in [(&g, "g0"), (&l, "l0"), (&l, "l1"), (&s, "s0")] {
            ip_ns(ns, &["link", "set", i, "up"])?;
        }
        let mac = |ns: &str, i: &str| bgswitch_tests::netns::mac_address(ns, i);
        let (g0_mac, l0_mac, s0_mac) = (mac(&g, "g0")?, mac(&l, "l0")?, mac(&s, "s0")?);
        let fmt_mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        // Permanent neighbours: both sink addresses on s0 (behind l1), the
        // generator on g0 (behind l0).
        for (a, m, dev) in [
            (SINK_ADDR, s0_mac, "l1"),
            (SINK_ADDR2, s0_mac, "l1"),
            (Ipv4Addr::new(198, 18, 0, 2), g0_mac, "l0"),
        ] {
            ip_ns(
                &l,
                &[
                    "neigh",
                    "replace",
                    &a.to_string(),
                    "lladdr",
                    &fmt_mac(m),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        for (a, m, dev) in [(SINK6, s0_mac, "l1"), (GEN6, g0_mac, "l0")] {
            ip_ns(
                &l,
                &[
                    "-6",
                    "neigh",
                    "replace",
                    &a.to_string(),
                    "lladdr",
                    &fmt_mac(m),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        ip_ns(
            &l,
            &[
                "-6",
                "route",
                "add",
                &format!("{SRC6_BASE}/64"),
                "via",
                &GEN6.to_string(),
                "dev",
                "l0",
            ],
        )?;
        ip_ns(
            &l,
            &[
                "route",
                "add",
                "198.18.16.0/20",
                "via",
                "198.18.0.2",
                "dev",
                "l0",
            ],
        )?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.l0.rp_filter", "0"),
            ("net.ipv4.conf.l1.rp_filter", "0"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ] {
            sys::ns_sysctl(&l, k, v)?;
        }
        // l0 takes frames from g0's XDP_TX without an XDP program of its own
        // (kernel and nftables paths) only with GRO (NAPI) on.
        sys::ns_run(&l, "ethtool", &["-K", "l0", "gro", "on"])?;
        let g0 = bgswitch_tests::netns::ifindex(&g, "g0")?;

        let mut genp = Ebpf::load(objects::XDP_GEN).context("loading xdp_gen")?;
        xdp(&mut genp, "xdp_gen")?
            .load()
            .context("verifying xdp_gen")?;
        // Keep the generator in the XDP dispatcher: BPF_PROG_TEST_RUN of a
        // program that is not attached anywhere rebuilds the dispatcher and
        // waits for an RCU grace period (~20 ms) on every call. d0/d1 carry
        // no traffic (IPv6 off, so not even neighbour discovery).
        // The same for xdp_gen6, on d2/d3.
        xdp(&mut genp, "xdp_gen6")?
            .load()
            .context("verifying xdp_gen6")?;
        for (a, b, prog) in [("d0", "d1", "xdp_gen"), ("d2", "d3", "xdp_gen6")] {
            ip_ns(&g, &["link", "add", a, "type", "veth", "peer", "name", b])?;
            for d in [a, b] {
                sys::ns_sysctl(&g, &format!("net.ipv6.conf.{d}.disable_ipv6"), "1")?;
                ip_ns(&g, &["link", "set", d, "up"])?;
            }
            in_netns(&g, || {
                xdp(&mut genp, prog)?
                    .attach(a, XdpMode::Driver)
                    .with_context(|| format!("attaching {prog} to the idle {a}"))
            })??;
        }
        let gen_state = PerCpuArray::try_from(genp.take_map("GEN_STATE").context("no GEN_STATE")?)?;
        let mut sinkp = Ebpf::load(objects::XDP_SINK).context("loading xdp_sink")?;
        for name in ["xdp_sink", "xdp_sink_seq"] {
            xdp(&mut sinkp, name)?
                .load()
                .with_context(|| format!("verifying {name}"))?;
        }
        let mut sink_link = None;
        attach(&mut sinkp, "xdp_sink", &mut sink_link, &s, "s0")?;

        let mut redirp = Ebpf::load(objects::XDP_REDIRECT).context("loading xdp_redirect")?;
        {
            let l1 = bgswitch_tests::netns::ifindex(&l, "l1")?;
            let l1_mac = mac(&l, "l1")?;
            let mut a: Array<_, RedirectCfg> = Array::try_from(
                redirp
                    .map_mut("REDIRECT_CONFIG")
                    .context("no REDIRECT_CONFIG")?,
            )?;
            a.set(
                0,
                RedirectCfg(RedirectConfig {
                    dst_mac: s0_mac,
                    src_mac: l1_mac,
                    ifindex: l1,
                }),
                0,
            )?;
            let mut ports = aya::maps::DevMapHash::try_from(
                redirp
                    .map_mut("REDIRECT_PORTS")
                    .context("no REDIRECT_PORTS")?,
            )?;
            // The kernel resolves the ifindex in the caller's namespace.
            in_netns(&l, || ports.insert(l1, l1, None, 0))??;
        }
        xdp(&mut redirp, "xdp_redirect")?
            .load()
            .context("verifying xdp_redirect")?;

        let load_bg = |max_flows: u32| -> Result<Dataplane> {
            let mut dp = Dataplane::load(&LoadOptions {
                bpffs: None,
                max_flows,
            })?;
            // Long idle timeout: a flow idle between rounds must not be re-chosen.
            dp.set_settings(Duration::from_secs(3600), Duration::from_secs(3600))?;
            // As the daemon does (see cost/mod.rs).
            dp.set_backend_hops(bgswitch::netlink::ipv4_rules_by_destination_only()?)?;
            let vip = SocketAddr::V4(SocketAddrV4::new(VIP, PORT));
            let b = SocketAddr::V4(SocketAddrV4::new(SINK_ADDR, PORT));
            dp.write_service(
                0,
                service_key(vip, PROTO_UDP),
                &[backend_of(b, backend_stat_id(0, Colour::Blue, 0))],
                &[backend_of(b, backend_stat_id(0, Colour::Green, 0))],
                Colour::Blue,
            )?;
            // The same VIP and port over TCP, stateless, in a stable period.
            dp.set_stateless(1, true);
            dp.write_service(
                1,
                service_key(vip, PROTO_TCP),
                &[backend_of(b, backend_stat_id(1, Colour::Blue, 0))],
                &[backend_of(b, backend_stat_id(1, Colour::Green, 0))],
                Colour::Blue,
            )?;
            let w = dp.control_word(1);
            dp.end_transition(1, w)?;
            ensure!(
                dp.is_stateless(1),
                "the TCP service did not become stateless"
            );
            // The follow measurement's service (UDP) and the SYN flood's (a
            // TCP table service): blue → SINK_ADDR, green → SINK_ADDR2.
            for (id, port, proto) in [
                (FOLLOW_ID, FOLLOW_PORT, PROTO_UDP),
                (FLOOD_ID, FLOOD_PORT, PROTO_TCP),
            ] {
                let at = |a: Ipv4Addr| SocketAddr::V4(SocketAddrV4::new(a, port));
                dp.write_service(
                    id,
                    service_key(at(VIP), proto),
                    &[backend_of(
                        at(SINK_ADDR),
                        backend_stat_id(id, Colour::Blue, 0),
                    )],
                    &[backend_of(
                        at(SINK_ADDR2),
                        backend_stat_id(id, Colour::Green, 0),
                    )],
                    Colour::Blue,
                )?;
            }
            // IPv6: UDP VIP6:PORT → SINK6:PORT (the table path).
            let vip6 = SocketAddr::V6(SocketAddrV6::new(VIP6, PORT, 0, 0));
            let b6 = SocketAddr::V6(SocketAddrV6::new(SINK6, PORT, 0, 0));
            dp.write_service(
                V6_ID,
                service_key(vip6, PROTO_UDP),
                &[backend_of(b6, backend_stat_id(V6_ID, Colour::Blue, 0))],
                &[backend_of(b6, backend_stat_id(V6_ID, Colour::Green, 0))],
                Colour::Blue,
            )?;
            Ok(dp)
        };
        let mut dps = BTreeMap::new();
        for c in opts.configs() {
            let t = c.table(opts);
            if t != 0 && !dps.contains_key(&t) {
                dps.insert(t, load_bg(t)?);
            }
        }
        let lb_file = File::open(netns_path(&l)?)?;
        Ok(Rig {
            gen,
            lb,
            sink,
            g0,
            gen_prog: "xdp_gen",
            l0_mac,
            g0_mac,
            genp,
            gen_state,
            sinkp,
            sink_link,
            seq_link: None,
            floor_link: None,
            redirp,
            redirect_link: None,
            dps,
            attached: 0,
            attached_as: AttachSetting::Xdp,
            nft_on: false,
            queues: 2,
            lb_file,
            opts: opts.clone(),
        })
    }

    pub(super) fn lb_name(&self) -> String {
        self.lb.name().to_string()
    }

    /// Puts the load balancer in the state `c` needs.
    pub(super) fn set(&mut self, c: Config) -> Result<()> {
        // One queue per veth end except for the two-CPU rows: with two,
        // the socket-buffer paths (TC, the kernel, nftables) became
        // bimodal from run to run here.
        let queues = if c.two_cpus() { 2 } else { 1 };
        if queues != self.queues {
            let n = queues.to_string();
            let ends = [
                (self.gen.name(), "g0"),
                (self.lb.name(), "l0"),
                (self.lb.name(), "l1"),
                (self.sink.name(), "s0"),
            ];
            // A veth end may not send on more queues than its peer
            // receives on (with XDP there): receive queues grow first and
            // shrink last.
            let order = if queues > self.queues {
                ["rx", "tx"]
            } else {
                ["tx", "rx"]
            };
            for dir in order {
                for (ns, dev) in ends {
                    sys::ns_run(ns, "ethtool", &["-L", dev, dir, &n])
                        .with_context(|| format!("{dev}: {n} {dir} queues"))?;
                }
            }
            self.queues = queues;
        }
        let want_attached = c.table(&self.opts);
        let want_as = if matches!(c, Config::BgswitchTc(_)) {
            AttachSetting::Tc
        } else {
            AttachSetting::Xdp
        };
        let lb = self.lb_name();
        let want_floor = matches!(c, Config::Floor | Config::Floor6 | Config::Floor2);
        if !want_floor {
            detach(&mut self.sinkp, "xdp_sink", &mut self.floor_link)?;
        }
        let want_redirect = matches!(c, Config::Redirect | Config::Redirect2);
        if !want_redirect {
            detach(&mut self.redirp, "xdp_redirect", &mut self.redirect_link)?;
        }
        if (self.attached, self.attached_as) != (want_attached, want_as) {
            let which = self.attached;
            if which != 0 {
                let dp = self.dps.get_mut(&which).context("no data plane")?;
                in_netns(&lb, || -> Result<()> {
                    dp.detach("l0")?;
                    dp.detach("l1")?;
                    Ok(())
                })??;
            }
            self.attached = 0;
            if want_attached != 0 {
                let dp = self.dps.get_mut(&want_attached).context("no data plane")?;
                in_netns(&lb, || -> Result<()> {
                    dp.attach("l0", want_as)?;
                    dp.attach("l1", want_as)?;
                    Ok(())
                })??;
                self.attached = want_attached;
                self.attached_as = want_as;
            }
        }
        if want_redirect {
            attach(
                &mut self.redirp,
                "xdp_redirect",
                &mut self.redirect_link,
                &lb,
                "l0",
            )?;
        }
        if want_floor {
            attach(&mut self.sinkp, "xdp_sink", &mut self.floor_link, &lb, "l0")?;
        }
        let want_nft = matches!(c, Config::Nft(_) | Config::NftTcp(_));
        if want_nft != self.nft_on {
            let text = if want_nft {
                format!(
                    "table ip bgfwd {{\n\
                     \tchain pre {{ type nat hook prerouting priority dstnat; policy accept;\n\
                     \t\tip daddr {VIP} udp dport {PORT} dnat to {SINK_ADDR}\n\
                     \t\tip daddr {VIP} tcp dport {PORT} dnat to {SINK_ADDR}\n\t}}\n\
                     \tchain post {{ type nat hook postrouting priority srcnat; policy accept; }}\n}}\n"
                )
            } else {
                "delete table ip bgfwd\n".to_string()
            };
            self.nft(&text)?;
            self.nft_on = want_nft;
        }
        Ok(())
    }

    pub(super) fn nft(&self, text: &str) -> Result<()> {
        let nft = sys::have("nft").context("nft is not installed")?;
        let path = std::env::temp_dir().join(format!("bgswitch-bench-{}.nft", std::process::id()));
        std::fs::write(&path, text)?;
        let out = spawn_in(
            &self.lb_file,
            Command::new(nft)
                .arg("-f")
                .arg(&path)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )?
        .wait_with_output()?;
        let _ = std::fs::remove_file(&path);
        ensure!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub(super) fn delivered(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.sinkp.map("SINK_STATS").context("no SINK_STATS")?)?;
        Ok(m.get(&SINK_PACKETS, 0)?.iter().sum())
    }

    /// Configures the generator for `c` and resets its flow cursor.
    pub(super) fn configure_gen(&mut self, c: Config) -> Result<()> {
        let dst = match c {
            Config::Kernel(_) => SINK_ADDR,
            _ => VIP,
        };
        let dst6 = match c {
            Config::Kernel6(_) => SINK6,
            _ => VIP6,
        };
        let cfg = GenConfig {
            dst_mac: self.l0_mac,
            src_mac: self.g0_mac,
            src_ip: SRC_BASE.octets(),
            dst_ip: dst.octets(),
            dst_port: PORT.to_be_bytes(),
            src_port_base: SRC_PORT_BASE,
            flows: c.flows().max(1),
            proto: if matches!(
                c,
                Config::Stateless(_) | Config::NftTcp(_) | Config::Stateless2(_)
            ) {
                PROTO_TCP
            } else {
                PROTO_UDP
            },
            tag: 0,
            syn: 0,
            spread: u8::from(c.two_cpus()),
            src_ip6: SRC6_BASE.octets(),
            dst_ip6: dst6.octets(),
        };
        self.gen_prog = if c.ipv6() { "xdp_gen6" } else { "xdp_gen" };
        self.set_gen(cfg)
    }

    /// Sets the generator's configuration and resets its flow cursor.
    pub(super) fn set_gen(&mut self, cfg: GenConfig) -> Result<()> {
        let mut a: Array<_, GenCfg> =
            Array::try_from(self.genp.map_mut("GEN_CONFIG").context("no GEN_CONFIG")?)?;
        a.set(0, GenCfg(cfg), 0)?;
        let n = self.gen_state.get(&0, 0)?.len();
        self.gen_state
            .set(0, PerCpuValues::try_from(vec![0u32; n])?, 0)?;
        Ok(())
    }

    /// One generator run of `frames` on `cpu`: (frames generated, delivered,
    /// wall time).
    /// `frames` in calls of at most `chunk` frames (a small chunk paces the
    /// generator: each call returns only after the softirq work its frames
    /// caused, unless the kernel deferred it to ksoftirqd).
    pub(super) fn run(
        &mut self,
        frames: u32,
        chunk: u32,
        batch: u32,
        cpu: usize,
    ) -> Result<(u64, u64, Duration)> {
        let before = self.delivered()?;
        let g = self.gen.name().to_string();
        let (sent, wall) = generate(
            &mut self.genp,
            self.gen_prog,
            &g,
            self.g0,
            frames,
            chunk,
            batch,
            cpu,
        )?;
        // Frames still in flight finish within microseconds.
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.delivered()? - before;
        Ok((sent, delivered, wall))
    }

    /// `run` with two generators at once, on CPUs 0 and 1, `frames` each.
    pub(super) fn run_two(
        &mut self,
        frames: u32,
        chunk: u32,
        batch: u32,
    ) -> Result<(u64, u64, Duration)> {
        let before = self.delivered()?;
        let g = self.gen.name().to_string();
        let prog: &Xdp = xdp(&mut self.genp, self.gen_prog)?;
        let g0 = self.g0;
        let t = Instant::now();
        let sent = std::thread::scope(|sc| -> Result<u64> {
            let runs: Vec<_> = [0usize, 1]
                .into_iter()
                .map(|cpu| {
                    let g = g.as_str();
                    sc.spawn(move || generate_with(prog, g, g0, frames, chunk, batch, cpu))
                })
                .collect();
            let mut sent = 0;
            for r in runs {
                sent += r
                    .join()
                    .map_err(|_| anyhow::anyhow!("a generator thread panicked"))??
                    .0;
            }
            Ok(sent)
        })?;
        let wall = t.elapsed();
        std::thread::sleep(Duration::from_millis(20));
        let delivered = self.delivered()? - before;
        Ok((sent, delivered, wall))
    }

    /// Swaps s0's receiver: `xdp_sink_seq` (flips watched) or `xdp_sink`.
    pub(super) fn seq_sink(&mut self, on: bool) -> Result<()> {
        let s = self.sink.name().to_string();
        let (off, off_link, on_name, on_link) = if on {
            (
                "xdp_sink",
                &mut self.sink_link,
                "xdp_sink_seq",
                &mut self.seq_link,
            )
        } else {
            (
                "xdp_sink_seq",
                &mut self.seq_link,
                "xdp_sink",
                &mut self.sink_link,
            )
        };
        detach(&mut self.sinkp, off, off_link)?;
        attach(&mut self.sinkp, on_name, on_link, &s, "s0")?;
        Ok(())
    }

    pub(super) fn bg_global(&self, which: u32, name: &str) -> u64 {
        self.dps
            .get(&which)
            .and_then(|d| d.global_stat(name).ok().flatten())
            .unwrap_or(0)
    }
}
