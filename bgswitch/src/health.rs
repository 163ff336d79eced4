//! Active health checks: the pure rise/fall state machine, and the probes
//! (TCP connect, HTTP GET) that run as tasks on the daemon's runtime — one
//! small task per backend, no thread per backend.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{HealthConfig, HealthKind};

/// What the daemon knows of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet (or no checks configured): serves traffic.
    #[default]
    Unknown,
    Up,
    Down,
}

/// Rise/fall bookkeeping of one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendHealth {
    pub state: Health,
    pub consecutive_ok: u32,
    pub consecutive_failed: u32,
    /// The last probe's failure, if it failed.
    pub last_error: Option<String>,
}

impl BackendHealth {
    /// Records one probe result; returns the new state if it changed.
    pub fn observe(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> Option<Health> {
        let before = self.state;
        match result {
            Ok(()) => {
                self.consecutive_ok += 1;
                self.consecutive_failed = 0;
                self.last_error = None;
                if self.state != Health::Up && self.consecutive_ok >= rise {
                    self.state = Health::Up;
                }
            }
            Err(e) => {
                self.consecutive_failed += 1;
                self.consecutive_ok = 0;
                self.last_error = Some(e);
                if self.state != Health::Down && self.consecutive_failed >= fall {
                    self.state = Health::Down;
                }
            }
        }
        (self.state != before).then_some(self.state)
    }
}

/// The backends (indexes into the configured pool) that serve new flows: all
/// but those known to be down; if every one is down, all of them (fail open:
/// a pool never empties itself, it is reported instead).
pub fn serving(pool: &[Health]) -> (Vec<usize>, bool) {
    let up: Vec<usize> = (0..pool.len())
        .filter(|&i| pool[i] != Health::Down)
        .collect();
    if up.is_empty() {
        ((0..pool.len()).collect(), true)
    } else {
        (up, false)
    }
}

/// One probe of `addr`.
pub async fn probe(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), String> {
    match tokio::time::timeout(cfg.timeout, probe_inner(addr, &cfg.kind)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", cfg.timeout)),
    }
}

async fn probe_inner(addr: SocketAddr, kind: &HealthKind) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let HealthKind::Http { path, status } = kind else {
        return Ok(());
    };
    let req = request(path, addr);
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("");
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {:?}", truncate(line)))?;
    if (status.0..=status.1).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code} (expected {}-{})", status.0, status.1))
    }
}

/// The HTTP probe's request. The Host header is the backend's address and
/// port as a URL writes them: an IPv6 address in brackets
/// (`[2001:db8::11]:8443`, RFC 3986), which `SocketAddr` prints so (the
/// config refuses zones, which would add `%…`).
fn request(path: &str, addr: SocketAddr) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bgswitch-health\r\nConnection: close\r\n\r\n"
    )
}

fn truncate(s: &str) -> &str {
    let end = s.char_indices().nth(60).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

/// A small deterministic jitter (0..interval/10) so probes of many backends
/// do not fire in lockstep.
pub fn jitter(interval: Duration, seed: usize) -> Duration {
    let tenth = interval.as_millis() as u64 / 10;
    if tenth == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis((seed as u64).wrapping_mul(2_654_435_761) % tenth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut h = BackendHealth::default();
        assert_eq!(h.observe(Ok(()), 2, 3), None, "one success is not enough");
        assert_eq!(h.observe(Ok(()), 2, 3), Some(Health::Up));
        assert_eq!(h.observe(Err("x".into()), 2, 3), None);
        assert_eq!(h.observe(Err("x".into()), 2, 3), None);
        assert_eq!(
            h.observe(Ok(()), 2, 3),
            None,
            "a success resets the failures"
        );
        for _ in 0..2 {
            assert_eq!(h.observe(Err("x".into()), 2, 3), None);
        }
        assert_eq!(h.observe(Err("refused".into()), 2, 3), Some(Health::Down));
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        assert_eq!(h.observe(Ok(()), 2, 3), None);
        assert_eq!(h.observe(Ok(()), 2, 3), Some(Health::Up));
    }

    #[test]
    fn serving_fails_open() {
        use Health::*;
        assert_eq!(serving(&[Up, Down, Unknown]), (vec![0, 2], false));
        assert_eq!(serving(&[Down, Down]), (vec![0, 1], true));
    }

    #[test]
    fn the_host_header_brackets_an_ipv6_address() {
        let r = request("/healthz", "[2001:db8:1::11]:8443".parse().unwrap());
        assert!(
            r.starts_with("GET /healthz HTTP/1.1\r\nHost: [2001:db8:1::11]:8443\r\n"),
            "{r}"
        );
        let r = request("/", "198.18.1.11:8080".parse().unwrap());
        assert!(r.contains("\r\nHost: 198.18.1.11:8080\r\n"), "{r}");
    }

    #[tokio::test]
    async fn probes_against_real_sockets() {
        probes_against_real_sockets_at("127.0.0.1:0").await;
    }

    #[tokio::test]
    async fn probes_an_ipv6_backend() {
        probes_against_real_sockets_at("[::1]:0").await;
    }

    async fn probes_against_real_sockets_at(bind: &str) {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for status in [200, 503] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                    )
                    .await;
            }
        });
        let http = HealthConfig {
            kind: HealthKind::Http {
                path: "/healthz".into(),
                status: (200, 399),
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        };
        assert_eq!(probe(addr, &http).await, Ok(()));
        let e = probe(addr, &http).await.unwrap_err();
        assert!(e.contains("HTTP 503"), "{e}");
        // Nothing listens there any more: refused.
        let tcp = HealthConfig {
            kind: HealthKind::Tcp,
            ..http
        };
        let closed = {
            let l = std::net::TcpListener::bind(bind).unwrap();
            l.local_addr().unwrap()
        };
        let e = probe(closed, &tcp).await.unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
