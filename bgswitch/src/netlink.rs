//! Kernel route, neighbour, address, rule and link notifications (rtnetlink
//! multicast groups), for invalidating the next hops flows keep.
//!
//! Route, rule, address and link notifications count as changes as they
//! come. Neighbour notifications are read: on a busy host, neighbours move
//! between REACHABLE, STALE, DELAY and PROBE all the time without their
//! link-layer address changing, which leaves every kept next hop right. Only
//! a neighbour that appears, changes its address, becomes unusable (FAILED,
//! INCOMPLETE) or is deleted counts.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV4_RULE: u32 = 0x80;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
/// `struct ndmsg`: family, two pad bytes, ifindex, state, flags, type.
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// NUD_VALID: PERMANENT | NOARP | REACHABLE | PROBE | STALE | DELAY — the
/// states in which the kernel forwards to the neighbour's address.
const NUD_VALID: u16 = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08;
/// Neighbours remembered at most; past it the view starts afresh (every
/// neighbour counts as new once more).
const MAX_NEIGHBOURS: usize = 1 << 16;

/// (family, ifindex, address) of a neighbour.
type NeighKey = (u8, i32, Vec<u8>);

/// The link-layer address each neighbour forwards to (`None`: not usable),
/// as the notifications told it.
#[derive(Default)]
pub struct NeighbourView {
    known: HashMap<NeighKey, Option<Vec<u8>>>,
}

impl NeighbourView {
    /// Whether the messages of one netlink datagram change a next hop the
    /// data plane may keep.
    pub fn changes(&mut self, mut buf: &[u8]) -> bool {
        let mut any = false;
        while buf.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            if len < NLMSG_HDRLEN || len > buf.len() {
                // Malformed: assume a change.
                return true;
            }
            let body = &buf[NLMSG_HDRLEN..len];
            any |= match kind {
                NLMSG_NOOP | NLMSG_ERROR | NLMSG_DONE => false,
                RTM_NEWNEIGH | RTM_DELNEIGH => self.neighbour(kind == RTM_DELNEIGH, body),
                _ => true,
            };
            buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        }
        any
    }

    /// Forgets every neighbour (after lost notifications).
    pub fn reset(&mut self) {
        self.known.clear();
    }

    fn neighbour(&mut self, deleted: bool, body: &[u8]) -> bool {
        if body.len() < NDMSG_LEN {
            return true;
        }
        let family = body[0];
        let ifindex = i32::from_ne_bytes([body[4], body[5], body[6], body[7]]);
        let state = u16::from_ne_bytes([body[8], body[9]]);
        let (mut dst, mut lladdr) = (None, None);
        let mut attrs = &body[NDMSG_LEN..];
        while attrs.len() >= 4 {
            let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let atype = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if alen < 4 || alen > attrs.len() {
                return true;
            }
            let value = &attrs[4..alen];
            match atype {
                NDA_DST => dst = Some(value.to_vec()),
                NDA_LLADDR => lladdr = Some(value.to_vec()),
                _ => {}
            }
            attrs = &attrs[alen.next_multiple_of(4).min(attrs.len())..];
        }
        let Some(dst) = dst else {
            return true;
        };
        let key = (family, ifindex, dst);
        if deleted {
            self.known.remove(&key);
            return true;
        }
        let now = (state & NUD_VALID != 0).then_some(lladdr).flatten();
        if self.known.len() >= MAX_NEIGHBOURS && !self.known.contains_key(&key) {
            self.known.clear();
        }
        match self.known.insert(key, now.clone()) {
            Some(before) => before != now,
            // First seen: a next hop kept before we heard of it may differ.
            None => true,
        }
    }
}

/// A NETLINK_ROUTE socket subscribed to the IPv4 route, rule, address,
/// neighbour and link groups of the network namespace it was opened in.
pub struct RouteEvents {
    fd: OwnedFd,
    neighbours: NeighbourView,
}

impl RouteEvents {
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zero is a valid sockaddr_nl before the fields are set.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups =
            RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_RULE;
        // SAFETY: binding our socket to a valid sockaddr_nl of the right size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            neighbours: NeighbourView::default(),
        })
    }

    /// Waits up to `timeout` for notifications; reads all that are queued.
    /// `Ok(true)`: something that may change a kept next hop happened (or
    /// notifications were lost, which counts as such a change).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(rc > 0 && self.drain())
    }

    /// Reads every queued notification without waiting; whether any of
    /// them changes a kept next hop (or notifications were lost).
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let mut any = false;
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                any |= self.neighbours.changes(&buf[..n as usize]);
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                // The socket overflowed: changes were lost, so assume some,
                // and what we knew of the neighbours may be stale.
                self.neighbours.reset();
                any = true;
                continue;
            }
            return any;
        }
    }
}

const RTM_NEWRULE: u16 = 32;
const RTM_GETRULE: u16 = 34;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// `struct fib_rule_hdr`: family, dst_len, src_len, tos, table, two reserved
/// bytes, action, flags (u32).
const FIB_RULE_HDR_LEN: usize = 12;
/// Rule attributes that select on nothing but the destination (or select
/// nothing): FRA_DST, FRA_GOTO, FRA_PRIORITY, FRA_SUPPRESS_IFGROUP,
/// FRA_SUPPRESS_PREFIXLEN, FRA_TABLE, FRA_PAD, FRA_PROTOCOL (who made the
/// rule). Any other — source, interfaces, marks, UIDs, ports, protocol,
/// DSCP, l3mdev (VRF) — can make a route depend on the packet's client.
const DESTINATION_ONLY_ATTRS: [u16; 8] = [1, 4, 6, 13, 14, 15, 18, 21];

/// Whether the host's IPv4 policy-routing rules choose a route by the
/// destination alone (the three default rules do), so the next hop towards a
/// backend is the same for every client. Reads the rules with an
/// RTM_GETRULE dump in the caller's network namespace.
pub fn ipv4_rules_by_destination_only() -> io::Result<bool> {
    // SAFETY: plain socket(2) call.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval of the right size on our socket.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + FIB_RULE_HDR_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + FIB_RULE_HDR_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETRULE.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    let mut hdr = [0u8; FIB_RULE_HDR_LEN];
    hdr[0] = libc::AF_INET as u8;
    req.extend_from_slice(&hdr);
    // SAFETY: sending our own buffer (to the kernel: no address needed).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    let mut by_destination = true;
    loop {
        // SAFETY: reading into our own buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        match rules_by_destination_only(&buf[..n as usize])? {
            RuleDump::More(ok) => by_destination &= ok,
            RuleDump::Done(ok) => return Ok(by_destination && ok),
        }
    }
}

/// What one datagram of a rule dump said.
#[derive(Debug, PartialEq, Eq)]
enum RuleDump {
    /// More datagrams follow; whether these rules select by destination only.
    More(bool),
    /// The dump ended here.
    Done(bool),
}

fn rules_by_destination_only(mut buf: &[u8]) -> io::Result<RuleDump> {
    let mut ok = true;
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed netlink message in the rule dump",
            ));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(RuleDump::Done(ok)),
            NLMSG_ERROR => {
                let errno = body
                    .get(..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(-libc::EIO);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            RTM_NEWRULE => ok &= rule_by_destination_only(body),
            _ => {}
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    Ok(RuleDump::More(ok))
}

/// One rule (`fib_rule_hdr` and attributes): no source prefix, no TOS, and
/// only attributes of [`DESTINATION_ONLY_ATTRS`].
fn rule_by_destination_only(body: &[u8]) -> bool {
    if body.len() < FIB_RULE_HDR_LEN || body[2] != 0 || body[3] != 0 {
        return false;
    }
    let mut attrs = &body[FIB_RULE_HDR_LEN..];
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return false;
        }
        if !DESTINATION_ONLY_ATTRS.contains(&kind) {
            return false;
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(src_len: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, src_len, 0, 254, 0, 0, 1, 0, 0, 0, 0];
        for (k, v) in attrs {
            body.extend(attr(*k, v));
        }
        msg(RTM_NEWRULE, &body)
    }

    #[test]
    fn only_rules_that_select_by_destination_keep_next_hops_per_backend() {
        // The three default rules: priority and table (and protocol).
        let mut dump = Vec::new();
        for (prio, table) in [(0u32, 255u32), (32766, 254), (32767, 253)] {
            dump.extend(rule(
                0,
                &[
                    (6, &prio.to_ne_bytes()),
                    (15, &table.to_ne_bytes()),
                    (21, &[2]),
                ],
            ));
        }
        assert_eq!(
            rules_by_destination_only(&dump).unwrap(),
            RuleDump::More(true)
        );
        let mut done = dump.clone();
        done.extend(msg(NLMSG_DONE, &[0; 4]));
        assert_eq!(
            rules_by_destination_only(&done).unwrap(),
            RuleDump::Done(true)
        );
        // `from 198.18.0.0/16 table 100`: a source prefix.
        let mut from = dump.clone();
        from.extend(rule(
            16,
            &[(2, &[198, 18, 0, 0]), (15, &100u32.to_ne_bytes())],
        ));
        assert_eq!(
            rules_by_destination_only(&from).unwrap(),
            RuleDump::More(false)
        );
        // `iif eth1`, `fwmark 1`, `l3mdev`: no source prefix, but still the client's.
        for (k, v) in [
            (3u16, &b"eth1\0"[..]),
            (10, &1u32.to_ne_bytes()[..]),
            (19, &[1u8][..]),
        ] {
            let mut d = dump.clone();
            d.extend(rule(0, &[(k, v)]));
            assert_eq!(
                rules_by_destination_only(&d).unwrap(),
                RuleDump::More(false),
                "attr {k}"
            );
        }
        // `to 198.19.0.0/16 table 100`: by destination.
        let mut to = dump.clone();
        to.extend(rule(
            0,
            &[(1, &[198, 19, 0, 0]), (15, &100u32.to_ne_bytes())],
        ));
        assert_eq!(
            rules_by_destination_only(&to).unwrap(),
            RuleDump::More(true)
        );
        // An error answer and a malformed message are errors, not "fine".
        let mut err = Vec::new();
        err.extend(msg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes()));
        assert!(rules_by_destination_only(&err).is_err());
        let mut bad = rule(0, &[]);
        bad[0] = 200;
        assert!(rules_by_destination_only(&bad).is_err());
        // A truncated attribute is not destination-only.
        let mut trunc = vec![libc::AF_INET as u8, 0, 0, 0, 254, 0, 0, 1, 0, 0, 0, 0];
        trunc.extend([40, 0, 6, 0, 1, 0, 0, 0]);
        assert!(!rule_by_destination_only(&trunc));
    }

    /// One netlink message of `kind` with `body`.
    fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    /// An RTM_NEWNEIGH/DELNEIGH for 198.18.1.11 on ifindex 3.
    fn neigh(kind: u16, state: u16, lladdr: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![2u8, 0, 0, 0];
        body.extend_from_slice(&3i32.to_ne_bytes());
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        body.extend(attr(NDA_DST, &[198, 18, 1, 11]));
        if let Some(l) = lladdr {
            body.extend(attr(NDA_LLADDR, &l));
        }
        msg(kind, &body)
    }

    const REACHABLE: u16 = 0x02;
    const STALE: u16 = 0x04;
    const DELAY: u16 = 0x08;
    const PROBE: u16 = 0x10;
    const FAILED: u16 = 0x20;
    const A: [u8; 6] = [2, 0, 0, 0, 1, 0x11];
    const B: [u8; 6] = [2, 0, 0, 0, 1, 0x12];

    #[test]
    fn only_neighbour_changes_that_move_a_next_hop_count() {
        let mut v = NeighbourView::default();
        assert!(
            v.changes(&neigh(RTM_NEWNEIGH, REACHABLE, Some(A))),
            "first seen"
        );
        for s in [STALE, DELAY, PROBE, REACHABLE, STALE] {
            assert!(
                !v.changes(&neigh(RTM_NEWNEIGH, s, Some(A))),
                "state {s:#x}, same address"
            );
        }
        assert!(v.changes(&neigh(RTM_NEWNEIGH, REACHABLE, Some(B))), "moved");
        assert!(v.changes(&neigh(RTM_NEWNEIGH, FAILED, None)), "unusable");
        assert!(!v.changes(&neigh(RTM_NEWNEIGH, FAILED, None)));
        assert!(v.changes(&neigh(RTM_NEWNEIGH, REACHABLE, Some(B))), "back");
        assert!(v.changes(&neigh(RTM_DELNEIGH, STALE, Some(B))), "deleted");
        assert!(v.changes(&neigh(RTM_NEWNEIGH, STALE, Some(B))), "new again");
        // Several messages in one datagram: one that counts is enough.
        let mut two = neigh(RTM_NEWNEIGH, PROBE, Some(B));
        two.extend(neigh(RTM_NEWNEIGH, REACHABLE, Some(A)));
        assert!(v.changes(&two));
        let mut quiet = neigh(RTM_NEWNEIGH, STALE, Some(A));
        quiet.extend(neigh(RTM_NEWNEIGH, DELAY, Some(A)));
        assert!(!v.changes(&quiet));
        v.reset();
        assert!(v.changes(&neigh(RTM_NEWNEIGH, STALE, Some(A))), "forgotten");
    }

    #[test]
    fn other_notifications_and_malformed_ones_count() {
        let mut v = NeighbourView::default();
        const RTM_NEWROUTE: u16 = 24;
        const RTM_NEWLINK: u16 = 16;
        assert!(v.changes(&msg(RTM_NEWROUTE, &[0; 12])));
        assert!(v.changes(&msg(RTM_NEWLINK, &[0; 16])));
        assert!(!v.changes(&msg(NLMSG_DONE, &[0; 4])));
        // Truncated header, length past the datagram, short ndmsg, no NDA_DST.
        let mut bad = neigh(RTM_NEWNEIGH, STALE, Some(A));
        bad[0] = 0xff;
        assert!(v.changes(&bad));
        assert!(v.changes(&msg(RTM_NEWNEIGH, &[2, 0, 0, 0])));
        let mut body = vec![2u8, 0, 0, 0];
        body.extend_from_slice(&3i32.to_ne_bytes());
        body.extend_from_slice(&STALE.to_ne_bytes());
        body.extend_from_slice(&[0, 1]);
        assert!(v.changes(&msg(RTM_NEWNEIGH, &body)));
        assert!(!v.changes(&[]));
    }
}
