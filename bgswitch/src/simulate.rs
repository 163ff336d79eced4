//! `bgswitch simulate`: "where would this packet go?"
//!
//! Runs every frame of a pcap file (IPv4 and IPv6) through the same XDP or
//! TC program with the
//! configured services and the saved desired state (active colour, canary
//! share, preview prefixes), using private maps: the live flow table and
//! counters are never touched. Frames are run in order, so a flow's later
//! packets follow the choice made on its first one, as on the host.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::{
    config::Config,
    dataplane::{backend_of, backend_stat_id, service_key, Dataplane, LoadOptions},
    model::{parse_cidr, Colour, DesiredState},
};

const LINKTYPE_ETHERNET: u32 = 1;
/// Largest frame the simulator accepts.
const MAX_FRAME: usize = 65_535;

/// One frame of a pcap file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcapFrame {
    pub ts_sec: u32,
    pub ts_frac: u32,
    pub data: Vec<u8>,
}

/// Reads a classic pcap file (either byte order, micro- or nanosecond
/// timestamps, Ethernet link type).
pub fn read_pcap(mut r: impl Read) -> anyhow::Result<(Vec<PcapFrame>, bool)> {
    let mut hdr = [0u8; 24];
    r.read_exact(&mut hdr)
        .context("pcap: file shorter than its header")?;
    let magic = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let (le, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        _ => bail!("pcap: not a pcap file (magic {magic:#010x}); pcapng is not supported, convert with `tcpdump -r in.pcapng -w out.pcap`"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(&hdr, 20) & 0x0fff_ffff;
    if link != LINKTYPE_ETHERNET {
        bail!("pcap: link type {link} is not Ethernet (1)");
    }
    let mut frames = Vec::new();
    loop {
        let mut rec = [0u8; 16];
        match r.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("pcap: reading a record header"),
        }
        let incl = u32_at(&rec, 8) as usize;
        if incl > MAX_FRAME {
            bail!("pcap: record {} claims {incl} bytes", frames.len() + 1);
        }
        let mut data = vec![0u8; incl];
        r.read_exact(&mut data)
            .with_context(|| format!("pcap: record {} is truncated", frames.len() + 1))?;
        frames.push(PcapFrame {
            ts_sec: u32_at(&rec, 0),
            ts_frac: u32_at(&rec, 4),
            data,
        });
    }
    Ok((frames, nanos))
}

/// Writes a classic little-endian pcap file.
pub fn write_pcap(mut w: impl Write, frames: &[PcapFrame], nanos: bool) -> std::io::Result<()> {
    let magic: u32 = if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 };
    w.write_all(&magic.to_le_bytes())?;
    w.write_all(&2u16.to_le_bytes())?;
    w.write_all(&4u16.to_le_bytes())?;
    w.write_all(&0i32.to_le_bytes())?;
    w.write_all(&0u32.to_le_bytes())?;
    w.write_all(&(MAX_FRAME as u32).to_le_bytes())?;
    w.write_all(&LINKTYPE_ETHERNET.to_le_bytes())?;
    for f in frames {
        w.write_all(&f.ts_sec.to_le_bytes())?;
        w.write_all(&f.ts_frac.to_le_bytes())?;
        w.write_all(&(f.data.len() as u32).to_le_bytes())?;
        w.write_all(&(f.data.len() as u32).to_le_bytes())?;
        w.write_all(&f.data)?;
    }
    Ok(())
}

/// The addresses, protocol and TCP flags of an IPv4 or IPv6 TCP/UDP frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Headers {
    /// `ADDR:PORT`; an IPv6 address in brackets (`[2001:db8::10]:443`).
    pub src: String,
    pub dst: String,
    pub protocol: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tcp_flags: String,
    /// The TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
}

/// Extension headers `headers` walks in an IPv6 frame before giving up, as
/// the program does (hop-by-hop, routing, destination options).
const MAX_EXTENSION_HEADERS: usize = 8;

/// The L3 fields of an IPv4 or IPv6 frame carrying TCP or UDP: source and
/// destination address, protocol, TTL or hop limit, and where the L4 header
/// starts. `None` for anything else (another EtherType, a fragment, another
/// protocol, an IPv6 extension header the program does not walk, a
/// truncated header).
fn l3(f: &[u8]) -> Option<(IpAddr, IpAddr, u8, u8, usize)> {
    match (f.get(12..14)?, f.get(14)? >> 4) {
        ([0x08, 0x00], 4) => {
            if f.len() < 34 {
                return None;
            }
            let ihl = usize::from(f[14] & 0x0f) * 4;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(f[o], f[o + 1], f[o + 2], f[o + 3]));
            Some((ip(26), ip(30), f[23], f[22], 14 + ihl))
        }
        ([0x86, 0xdd], 6) => {
            let h = f.get(14..54)?;
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&h[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let (mut next, mut at) = (h[6], 54);
            for _ in 0..MAX_EXTENSION_HEADERS {
                match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        let e = f.get(at..at + 2)?;
                        next = e[0];
                        at += (usize::from(e[1]) + 1) * 8;
                    }
                    _ => break,
                }
            }
            Some((ip(8), ip(24), next, h[7], at))
        }
        _ => None,
    }
}

fn headers(f: &[u8]) -> Option<(Headers, SocketAddr, SocketAddr)> {
    let (src_ip, dst_ip, proto, ttl, l4) = l3(f)?;
    if f.len() < l4 + 4 || !(proto == 6 || proto == 17) {
        return None;
    }
    let port = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    let src = SocketAddr::new(src_ip, port(l4));
    let dst = SocketAddr::new(dst_ip, port(l4 + 2));
    let mut flags = String::new();
    if proto == 6 && f.len() > l4 + 13 {
        for (bit, name) in [
            (0x02, "SYN"),
            (0x10, "ACK"),
            (0x01, "FIN"),
            (0x04, "RST"),
            (0x08, "PSH"),
        ] {
            if f[l4 + 13] & bit != 0 {
                if !flags.is_empty() {
                    flags.push(',');
                }
                flags.push_str(name);
            }
        }
    }
    Some((
        Headers {
            src: src.to_string(),
            dst: dst.to_string(),
            protocol: if proto == 6 { "tcp" } else { "udp" }.into(),
            tcp_flags: flags,
            ttl,
        },
        src,
        dst,
    ))
}

/// What happened to one frame.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// 1-based index in the pcap.
    pub frame: usize,
    /// What happened to the frame: `rewritten` (to a backend), `replied`
    /// (a backend's reply rewritten back to the VIP) or `untouched`.
    pub outcome: String,
    /// The program's verdict: PASS, TX, REDIRECT, DROP, ABORTED (XDP);
    /// PASS, REDIRECT, DROP (TC). A rewritten frame the program passes is
    /// forwarded by the kernel's stack.
    pub verdict: String,
    /// to_backend, reply, or untouched.
    pub direction: String,
    pub service: Option<String>,
    pub colour: Option<Colour>,
    pub backend: Option<String>,
    #[serde(rename = "in")]
    pub input: Option<Headers>,
    #[serde(rename = "out")]
    pub output: Option<Headers>,
    pub changed: bool,
}

/// Which of the data plane's programs the frames go through: the XDP
/// program (frames as a physical NIC's driver hands them over) or the TC
/// one (socket buffers, as veth pairs, bridges and tap devices hand them
/// over): what `attach` gives the interface the frames arrive on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Program {
    #[default]
    Xdp,
    Tc,
}

fn verdict(program: Program, action: u32) -> &'static str {
    match (program, action) {
        (Program::Xdp, 0) => "ABORTED",
        (Program::Xdp, 1) => "DROP",
        (Program::Xdp, 2) => "PASS",
        (Program::Xdp, 3) => "TX",
        (Program::Xdp, 4) => "REDIRECT",
        // TC_ACT_UNSPEC (what comes next decides) and TC_ACT_OK.
        (Program::Tc, u32::MAX | 0) => "PASS",
        (Program::Tc, 2) => "DROP",
        (Program::Tc, 7) => "REDIRECT",
        _ => "UNKNOWN",
    }
}

/// Runs `frames` through a private copy of the data plane configured like
/// the host. `only` restricts the report to one service's frames.
pub fn simulate(
    config: &Config,
    state: &DesiredState,
    frames: &[PcapFrame],
    only: Option<&str>,
    ingress: Option<u32>,
    program: Program,
) -> anyhow::Result<(Vec<Outcome>, Vec<PcapFrame>)> {
    if let Some(name) = only {
        state.service(name)?;
    }
    let mut dp = Dataplane::load(&LoadOptions {
        bpffs: None,
        max_flows: 1024.max(frames.len() as u32),
    })?;
    dp.set_settings(config.udp_idle_timeout, config.tcp_idle_timeout)?;
    // backend address → (service, colour); VIP → service.
    let mut backends: HashMap<SocketAddr, (String, Colour)> = HashMap::new();
    let mut vips: HashMap<(SocketAddr, String), String> = HashMap::new();
    for svc in &config.services {
        let st = state.service(&svc.name)?;
        let pool = |c: Colour| {
            svc.pool(c)
                .iter()
                .enumerate()
                .map(|(i, a)| backend_of(*a, backend_stat_id(st.id, c, i as u32)))
                .collect::<Vec<_>>()
        };
        dp.write_service(
            st.id,
            service_key(svc.vip, svc.protocol.number()),
            &pool(Colour::Blue),
            &pool(Colour::Green),
            st.active,
        )?;
        dp.set_canary(st.id, st.canary_bp)?;
        let prefixes = st
            .preview
            .iter()
            .map(|p| parse_cidr(p))
            .collect::<Result<Vec<_>, _>>()?;
        dp.set_preview(st.id, &prefixes)?;
        for c in Colour::BOTH {
            for a in svc.pool(c) {
                backends.insert(*a, (svc.name.clone(), c));
            }
        }
        vips.insert((svc.vip, svc.protocol.to_string()), svc.name.clone());
    }
    let mut outcomes = Vec::new();
    let mut out_frames = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        if f.data.len() < 14 {
            outcomes.push(Outcome {
                frame: i + 1,
                outcome: "untouched".into(),
                verdict: "PASS".into(),
                direction: "untouched".into(),
                service: None,
                colour: None,
                backend: None,
                input: None,
                output: None,
                changed: false,
            });
            out_frames.push(f.clone());
            continue;
        }
        let (action, out, _) = match program {
            Program::Xdp => dp.test_run(&f.data, ingress, 1)?,
            Program::Tc => dp.test_run_tc(&f.data, ingress, 0, 1)?,
        };
        let input = headers(&f.data);
        let output = headers(&out);
        let changed = out != f.data;
        let mut o = Outcome {
            frame: i + 1,
            outcome: if changed { "rewritten" } else { "untouched" }.into(),
            verdict: verdict(program, action).into(),
            direction: "untouched".into(),
            service: None,
            colour: None,
            backend: None,
            input: input.as_ref().map(|h| h.0.clone()),
            output: output.as_ref().map(|h| h.0.clone()),
            changed,
        };
        if let (Some((ih, isrc, idst)), Some((_, _, odst))) = (&input, &output) {
            if changed {
                if let Some(svc) = vips.get(&(*idst, ih.protocol.clone())) {
                    o.direction = "to_backend".into();
                    o.service = Some(svc.clone());
                    o.backend = Some(odst.to_string());
                    o.colour = backends.get(odst).map(|(_, c)| *c);
                } else if let Some((svc, c)) = backends.get(isrc) {
                    o.direction = "reply".into();
                    o.outcome = "replied".into();
                    o.service = Some(svc.clone());
                    o.colour = Some(*c);
                    o.backend = Some(isrc.to_string());
                }
            }
        }
        out_frames.push(PcapFrame {
            ts_sec: f.ts_sec,
            ts_frac: f.ts_frac,
            data: out,
        });
        if only.is_none_or(|n| o.service.as_deref() == Some(n)) {
            outcomes.push(o);
        }
    }
    Ok((outcomes, out_frames))
}

/// The text report of a simulation.
pub fn render(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for o in outcomes {
        let input = o
            .input
            .as_ref()
            .map(|h| {
                format!(
                    "{} → {} {}{}",
                    h.src,
                    h.dst,
                    h.protocol,
                    if h.tcp_flags.is_empty() {
                        String::new()
                    } else {
                        format!(" [{}]", h.tcp_flags)
                    }
                )
            })
            .unwrap_or_else(|| "not TCP/UDP over IPv4 or IPv6".into());
        let what = match o.direction.as_str() {
            "to_backend" => format!(
                "{} {} → backend {}",
                o.service.as_deref().unwrap_or("?"),
                o.colour.map_or("?".to_string(), |c| c.to_string()),
                o.backend.as_deref().unwrap_or("?")
            ),
            "reply" => format!(
                "reply from {} {} backend {}, source rewritten to {}",
                o.service.as_deref().unwrap_or("?"),
                o.colour.map_or("?".to_string(), |c| c.to_string()),
                o.backend.as_deref().unwrap_or("?"),
                o.output.as_ref().map_or("?", |h| h.src.as_str())
            ),
            _ => "left as it came".into(),
        };
        let sent = match (o.outcome.as_str(), o.verdict.as_str()) {
            (_, "REDIRECT") => "sent out of the next hop's interface (REDIRECT)",
            (_, "TX") => "sent back out of the interface it came in on (TX)",
            ("untouched", "PASS") => "handed to the kernel's stack (PASS)",
            (_, "PASS") => "handed to the kernel's stack, which forwards it (PASS)",
            (_, "DROP") => "dropped (DROP)",
            _ => "aborted (ABORTED)",
        };
        s += &format!("#{:<5} {:<9} {input}: {what}; {sent}\n", o.frame, o.outcome);
    }
    s
}

/// Loads the config and state, reads the pcap, simulates, writes `out`.
pub fn run(
    config_path: &Path,
    pcap: &Path,
    out: Option<&Path>,
    only: Option<&str>,
    ingress: Option<&str>,
    program: Program,
) -> anyhow::Result<Vec<Outcome>> {
    let config = crate::config::load(config_path)?;
    let store = crate::state::LocalStore::open(&config.state_dir)?;
    let mut state = store.load()?;
    state.reconcile(config.service_names())?;
    let ingress = match ingress {
        None => None,
        Some(name) => Some(
            crate::dataplane::ifindex(name)
                .with_context(|| format!("--ingress: no interface {name}"))?,
        ),
    };
    let file = std::fs::File::open(pcap).with_context(|| format!("opening {}", pcap.display()))?;
    let (frames, nanos) =
        read_pcap(std::io::BufReader::new(file)).with_context(|| pcap.display().to_string())?;
    let (outcomes, out_frames) = simulate(&config, &state, &frames, only, ingress, program)?;
    if let Some(p) = out {
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        write_pcap(std::io::BufWriter::new(f), &out_frames, nanos)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame: IPv6 from `src` to `dst`, hop limit 64, the
    /// extension headers `ext` (each: its type, 8 bytes), then a TCP SYN or
    /// a UDP header.
    fn frame6(src: &str, dst: &str, ext: &[u8], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x86, 0xdd]);
        let l4_len = if proto == 6 { 20 } else { 8 };
        let payload = ext.len() * 8 + l4_len;
        f.extend([0x60, 0, 0, 0]);
        f.extend((payload as u16).to_be_bytes());
        f.push(ext.first().copied().unwrap_or(proto));
        f.push(64);
        f.extend(src.parse::<Ipv6Addr>().unwrap().octets());
        f.extend(dst.parse::<Ipv6Addr>().unwrap().octets());
        for (i, _) in ext.iter().enumerate() {
            let next = ext.get(i + 1).copied().unwrap_or(proto);
            f.extend([next, 0, 1, 4, 0, 0, 0, 0]);
        }
        f.extend(sport.to_be_bytes());
        f.extend(dport.to_be_bytes());
        if proto == 6 {
            f.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        } else {
            f.extend([0, 8, 0, 0]);
        }
        f
    }

    #[test]
    fn ipv6_frames_are_described_with_bracketed_addresses() {
        let f = frame6("2001:db8:9::1", "2001:db8::10", &[], 6, 40000, 443);
        let (h, src, dst) = headers(&f).unwrap();
        assert_eq!(h.src, "[2001:db8:9::1]:40000");
        assert_eq!(h.dst, "[2001:db8::10]:443");
        assert_eq!(
            (h.protocol.as_str(), h.tcp_flags.as_str(), h.ttl),
            ("tcp", "SYN", 64)
        );
        assert_eq!(dst, "[2001:db8::10]:443".parse().unwrap());
        assert!(src.is_ipv6());
        // Hop-by-hop, routing and destination options are walked.
        let f = frame6("fd00::1", "fd00::53", &[0, 43, 60], 17, 5353, 53);
        let (h, _, _) = headers(&f).unwrap();
        assert_eq!(
            (h.dst.as_str(), h.protocol.as_str()),
            ("[fd00::53]:53", "udp")
        );
        // A fragment header, ICMPv6 and a truncated frame are not TCP/UDP.
        assert!(headers(&frame6("fd00::1", "fd00::53", &[44], 17, 1, 53)).is_none());
        assert!(headers(&frame6("fd00::1", "fd00::53", &[], 58, 1, 53)).is_none());
        let f = frame6("fd00::1", "fd00::53", &[0], 6, 1, 80);
        assert!(headers(&f[..60]).is_none());
        // IPv4 as before.
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00, 0x45, 0, 0, 40, 0, 0, 0x40, 0, 63, 17, 0, 0]);
        f.extend([198, 18, 0, 1, 198, 19, 0, 10, 0x9c, 0x40, 0, 53, 0, 8, 0, 0]);
        let (h, _, _) = headers(&f).unwrap();
        assert_eq!(
            (h.src.as_str(), h.dst.as_str(), h.ttl),
            ("198.18.0.1:40000", "198.19.0.10:53", 63)
        );
    }

    #[test]
    fn pcap_round_trip_and_errors() {
        let frames = vec![
            PcapFrame {
                ts_sec: 1,
                ts_frac: 2,
                data: vec![1, 2, 3],
            },
            PcapFrame {
                ts_sec: 3,
                ts_frac: 4,
                data: vec![0; 60],
            },
        ];
        let mut buf = Vec::new();
        write_pcap(&mut buf, &frames, true).unwrap();
        let (back, nanos) = read_pcap(&buf[..]).unwrap();
        assert!(nanos);
        assert_eq!(back, frames);
        assert!(read_pcap(&b"garbage garbage garbage!"[..])
            .unwrap_err()
            .to_string()
            .contains("not a pcap"));
        let cut = &buf[..buf.len() - 10];
        assert!(format!("{:#}", read_pcap(cut).unwrap_err()).contains("truncated"));
    }
}
