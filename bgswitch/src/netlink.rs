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

#[cfg(test)]
mod tests {
    use super::*;

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
