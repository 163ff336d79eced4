//! Spoofed TCP SYN floods sent from inside a namespace.
//!
//! [`send_syn_flood`] writes complete IPv4 + TCP SYN packets (both
//! checksums valid, built with `etherparse`), each from a distinct random
//! source address of a given network and a random source port, through an
//! `IPPROTO_RAW` socket (`IP_HDRINCL` implied) created in the namespace:
//! the namespace's kernel routes them as its own traffic (the client's
//! default route, its neighbour entry for the gateway) without checking
//! the source, so the frames reach the next hop as a flood of new
//! connections from many hosts would. Nothing answers them: the addresses
//! belong to nobody. The flood is sent from every CPU (a thread pinned to
//! each: a veth hands a packet to its peer on the sending CPU, so the
//! receiver processes it on every CPU, as behind a NIC spreading it over
//! its queues), bounded in count and time and paced in batches so a veth's
//! backlog does not drop it before the receiver's program sees it;
//! [`FloodReport`] says how many packets went out.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etherparse::{PacketBuilder, TcpOptionElement};

use crate::netns::in_netns;
use crate::rng::Rng;

/// What to send: `count` SYNs from distinct addresses in
/// `source_net/source_prefix`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynFlood {
    /// The network the spoofed sources are drawn from (its host bits are
    /// ignored). Pick one nothing in the test bed uses.
    pub source_net: Ipv4Addr,
    /// Its prefix length (8..=24: room for the distinct addresses).
    pub source_prefix: u8,
    /// SYNs to send, each from its own address.
    pub count: usize,
    /// SYNs sent back to back before each pause.
    pub batch: usize,
    /// The pause after each batch.
    pub pause: Duration,
    /// The whole flood stops after this long, sent or not.
    pub time_limit: Duration,
    /// Seed of the addresses, ports and sequence numbers.
    pub seed: u64,
}

impl SynFlood {
    /// `count` SYNs from `source_net/source_prefix` in batches of 100 with
    /// a 1 ms pause after each, for at most 10 s, seeded from the clock.
    pub fn new(source_net: Ipv4Addr, source_prefix: u8, count: usize) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            source_net,
            source_prefix,
            count,
            batch: 100,
            pause: Duration::from_millis(1),
            time_limit: Duration::from_secs(10),
            seed,
        }
    }

    /// Whether `addr` lies in the source network.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = prefix_mask(self.source_prefix);
        u32::from(addr) & mask == u32::from(self.source_net) & mask
    }
}

/// What [`send_syn_flood`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodReport {
    /// SYNs the kernel took (`sendto` succeeded).
    pub sent: usize,
    /// Sends retried after a transient refusal (no buffer space, would block).
    pub retries: usize,
    /// How long the flood took, pauses included.
    pub elapsed: Duration,
    /// The CPUs it was sent from (one thread each).
    pub cpus: usize,
    /// The seed it was drawn from (to reproduce its packets).
    pub seed: u64,
}

/// The netmask of a prefix length (0..=32).
fn prefix_mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// `count` distinct addresses of `net/prefix`, none with a host byte of 0
/// or 255 (nothing that looks like a network or broadcast address), each
/// with a random port of 1024..=65535, in random order.
///
/// # Errors
/// When the prefix is outside 8..=24 or holds too few addresses.
pub fn spoofed_sources(
    net: Ipv4Addr,
    prefix: u8,
    count: usize,
    rng: &mut Rng,
) -> Result<Vec<SocketAddrV4>> {
    ensure!(
        (8..=24).contains(&prefix),
        "source prefix /{prefix}: must be 8..=24"
    );
    let hosts = 1u64 << (32 - u32::from(prefix));
    // Addresses ending in .0 or .255 are skipped: 254 of every 256.
    ensure!(
        count as u64 <= hosts / 256 * 254 / 2,
        "{count} distinct sources do not fit comfortably in {net}/{prefix}"
    );
    let base = u32::from(net) & prefix_mask(prefix);
    let mut seen = HashSet::with_capacity(count);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let addr = base | rng.below(hosts) as u32;
        if matches!(addr & 0xff, 0 | 255) || !seen.insert(addr) {
            continue;
        }
        let port = 1024 + rng.below(65536 - 1024) as u16;
        out.push(SocketAddrV4::new(Ipv4Addr::from(addr), port));
    }
    Ok(out)
}

/// A TCP SYN from `src` to `dst` as an IPv4 packet (no link-layer header):
/// TTL 64, sequence number `seq`, window 64240, an MSS option of 1460, the
/// IPv4 header and TCP checksums computed.
pub fn syn_packet(src: SocketAddrV4, dst: SocketAddrV4, seq: u32) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 64240)
        .syn()
        .options(&[TcpOptionElement::MaximumSegmentSize(1460)])
        .map_err(|e| anyhow::anyhow!("TCP options: {e}"))?;
    let mut packet = Vec::with_capacity(builder.size(0));
    builder
        .write(&mut packet, &[])
        .map_err(|e| anyhow::anyhow!("building a SYN {src} → {dst}: {e}"))?;
    Ok(packet)
}

/// An `IPPROTO_RAW` socket (the caller writes the IPv4 header) in
/// namespace `ns`, with a 1 s send timeout so no send blocks for long.
fn raw_socket(ns: &str) -> Result<OwnedFd> {
    in_netns(ns, || -> io::Result<OwnedFd> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    })?
    .with_context(|| format!("opening a raw IPv4 socket in netns {ns:?}"))
}

/// Sends `packet` (an IPv4 packet addressed to `to`) on the raw socket.
fn send_raw(fd: &OwnedFd, packet: &[u8], to: Ipv4Addr) -> io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the buffer and the address are valid for the lengths passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != packet.len() => Err(io::Error::other(format!(
            "sent {n} of {} bytes",
            packet.len()
        ))),
        _ => Ok(()),
    }
}

/// Sends the spoofed SYNs `flood` describes from namespace `ns` to `to`
/// (see the [module docs](self)): the packets are built first, then sent
/// by one thread per CPU this process may run on, each pinned to its CPU
/// and sending every n-th packet, in batches with a pause after each,
/// until all went out or the time limit is reached. A veth hands a packet
/// to its peer on the sending CPU, so the receiver sees the flood on every
/// CPU, as a NIC spreading it over its queues would, and per-CPU state
/// (the BPF LRU map's per-CPU lists) all meets it. A transient refusal
/// (no buffer space, would block) is retried after 1 ms; any other error
/// ends the flood with an error.
///
/// # Errors
/// When the socket cannot be opened, the sources do not fit the network,
/// or a send fails for good.
pub fn send_syn_flood(ns: &str, to: SocketAddrV4, flood: &SynFlood) -> Result<FloodReport> {
    let mut rng = Rng::from_state(flood.seed);
    let sources = spoofed_sources(flood.source_net, flood.source_prefix, flood.count, &mut rng)?;
    let packets = sources
        .iter()
        .map(|&src| syn_packet(src, to, rng.u32()))
        .collect::<Result<Vec<_>>>()?;
    let fd = raw_socket(ns)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let shares = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..cpus)
            .map(|cpu| {
                let share: Vec<&[u8]> = packets
                    .iter()
                    .skip(cpu)
                    .step_by(cpus)
                    .map(Vec::as_slice)
                    .collect();
                let fd = &fd;
                scope.spawn(move || {
                    crate::pin_to_cpu(cpu);
                    send_share(fd, &share, to, flood, start)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Vec<_>>()
    });
    let mut report = FloodReport {
        seed: flood.seed,
        cpus,
        ..FloodReport::default()
    };
    for (cpu, share) in shares.into_iter().enumerate() {
        let (sent, retries) = share.with_context(|| {
            format!("spoofed SYNs to {to} from netns {ns:?} on CPU #{cpu} of {cpus}")
        })?;
        report.sent += sent;
        report.retries += retries;
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Sends `packets` on the raw socket `fd` in `flood`'s batches and pauses
/// until `flood`'s time limit (counted from `start`); returns how many
/// went out and how many sends were retried.
fn send_share(
    fd: &OwnedFd,
    packets: &[&[u8]],
    to: SocketAddrV4,
    flood: &SynFlood,
    start: Instant,
) -> Result<(usize, usize)> {
    let (mut sent, mut retries) = (0, 0);
    for chunk in packets.chunks(flood.batch.max(1)) {
        for packet in chunk {
            loop {
                if start.elapsed() > flood.time_limit {
                    return Ok((sent, retries));
                }
                match send_raw(fd, packet, *to.ip()) {
                    Ok(()) => break,
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
                        ) =>
                    {
                        retries += 1;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => bail!("SYN {} of {}: {e}", sent + 1, packets.len()),
                }
            }
            sent += 1;
        }
        std::thread::sleep(flood.pause);
    }
    Ok((sent, retries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[test]
    fn sources_are_distinct_and_inside_the_network() {
        let flood = SynFlood::new(Ipv4Addr::new(198, 19, 128, 0), 17, 4000);
        let mut rng = Rng::from_state(7);
        let sources = spoofed_sources(flood.source_net, 17, flood.count, &mut rng).unwrap();
        assert_eq!(sources.len(), 4000);
        let distinct: HashSet<_> = sources.iter().map(|s| *s.ip()).collect();
        assert_eq!(distinct.len(), 4000);
        for s in &sources {
            assert!(flood.contains(*s.ip()), "{s}");
            assert!(!matches!(s.ip().octets()[3], 0 | 255), "{s}");
            assert!(s.port() >= 1024, "{s}");
        }
        assert!(!flood.contains(Ipv4Addr::new(198, 19, 0, 10)));
        assert!(spoofed_sources(flood.source_net, 25, 10, &mut rng).is_err());
        assert!(spoofed_sources(flood.source_net, 24, 200, &mut rng).is_err());
    }

    #[test]
    fn a_syn_has_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(198, 19, 200, 7), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 8080);
        let packet = syn_packet(src, dst, 0x1234_5678).unwrap();
        let sliced = SlicedPacket::from_ip(&packet).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
            panic!("not IPv4: {sliced:?}");
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        assert_eq!(ip.header().source_addr(), *src.ip());
        assert_eq!(ip.header().destination_addr(), *dst.ip());
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            panic!("not TCP: {sliced:?}");
        };
        assert!(tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin());
        assert_eq!((tcp.source_port(), tcp.destination_port()), (40000, 8080));
        assert_eq!(tcp.sequence_number(), 0x1234_5678);
        let want = tcp
            .to_header()
            .calc_checksum_ipv4(&header, tcp.payload())
            .unwrap();
        assert_eq!(tcp.checksum(), want);
        assert_eq!(packet.len(), 20 + 24);
    }
}
