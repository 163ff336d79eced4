//! Client load for the flip measurements: a prober that opens a new
//! connection per request (each one a new flow) and records when it started
//! and which colour answered, and keep-alive clients that count failures.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use bgswitch_tests::{in_netns, Colour, KeepAliveClient};

use crate::sys;

const TIMEOUT: Duration = Duration::from_secs(2);

/// One HTTP request on a new connection from the calling thread's namespace;
/// returns the colour that answered.
pub fn request_here(addr: SocketAddrV4) -> Result<Colour> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("bad response {text:?}");
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    body.split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no colour in {body:?}"))
}

/// One request from namespace `ns`.
pub fn request(ns: &str, addr: SocketAddrV4) -> Result<Colour> {
    in_netns(ns, || request_here(addr))?
}

/// A request's start time and outcome.
#[derive(Clone, Debug)]
pub struct Probe {
    pub start_ns: u64,
    pub outcome: Result<Colour, String>,
}

/// Background clients: one prober (new connection per request) and
/// `keepalive` keep-alive clients.
pub struct Load {
    stop: Arc<AtomicBool>,
    prober: Option<JoinHandle<Vec<Probe>>>,
    keepalive: Vec<JoinHandle<()>>,
    pub ka_requests: Arc<AtomicU64>,
    pub ka_failures: Arc<AtomicU64>,
}

impl Load {
    pub fn start(ns: &str, addr: SocketAddrV4, keepalive: usize) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let ka_requests = Arc::new(AtomicU64::new(0));
        let ka_failures = Arc::new(AtomicU64::new(0));
        let prober = {
            let stop = stop.clone();
            let ns = ns.to_string();
            std::thread::spawn(move || {
                in_netns(&ns, || {
                    let mut v = Vec::with_capacity(100_000);
                    // Bounded: stops on the flag or after 10 minutes.
                    let end = std::time::Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                        let start_ns = sys::now_ns();
                        let outcome = request_here(addr).map_err(|e| format!("{e:#}"));
                        if outcome.is_err() {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        v.push(Probe { start_ns, outcome });
                    }
                    v
                })
                .unwrap_or_default()
            })
        };
        let mut ka = Vec::new();
        for _ in 0..keepalive {
            let (stop, reqs, fails) = (stop.clone(), ka_requests.clone(), ka_failures.clone());
            let ns = ns.to_string();
            ka.push(std::thread::spawn(move || {
                let mut client: Option<KeepAliveClient> = None;
                let end = std::time::Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                    if client.is_none() {
                        match KeepAliveClient::connect(&ns, addr) {
                            Ok(c) => client = Some(c),
                            Err(_) => {
                                fails.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        }
                    }
                    let c = client.as_mut().expect("connected above");
                    reqs.fetch_add(1, Ordering::Relaxed);
                    if c.get("/").is_err() {
                        fails.fetch_add(1, Ordering::Relaxed);
                        client = None;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        Ok(Load {
            stop,
            prober: Some(prober),
            keepalive: ka,
            ka_requests,
            ka_failures,
        })
    }

    /// Stops every client and returns the prober's record.
    pub fn finish(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.keepalive.drain(..) {
            let _ = h.join();
        }
        self.prober
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
