//! Real servers that run on threads of the test process while their sockets
//! live in a backend network namespace.
//!
//! The listening socket is created inside the namespace with
//! [`in_netns`]; everything else runs on ordinary
//! threads.
//!
//! * [`HttpServer`]: a small HTTP/1.1 server with keep-alive. Every response
//!   has the body `"{colour} {name}\n"` and the header `X-Backend: {name}`;
//!   `GET /sleep/{ms}` waits that long before answering; `GET /bytes/{n}`
//!   answers `n` bytes of [`bulk_pattern`] (for transfers of many
//!   segments); `POST /digest` answers the length and [`digest`] of the
//!   body it was sent.
//! * [`UdpEchoServer`]: answers each datagram with `"{colour} {name} "`
//!   followed by the original payload.
//!
//! Both stop on [`stop`](HttpServer::stop) or when dropped, within a bounded
//! time.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::http::{invalid, Conn, Head};
use crate::netns::in_netns;

/// Most connections an [`HttpServer`] serves at once; further connections
/// wait in the listen backlog until a slot frees up.
pub const MAX_CONNECTIONS: usize = 512;

/// Listen backlog requested for the HTTP listener (capped by the
/// namespace's `net.core.somaxconn`).
const LISTEN_BACKLOG: libc::c_int = 1024;

/// How often idle server threads look at their stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long `stop` waits for connection threads before giving up on them.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// An idle keep-alive connection is closed by the server after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Write timeout on server connections.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest accepted `/sleep/{ms}`.
const MAX_SLEEP: Duration = Duration::from_secs(600);

/// Largest `/bytes/{n}` answered, and `/digest` body read.
pub const MAX_BULK: usize = 64 << 20;

/// Byte `i` of the bulk pattern that `/bytes/{n}` sends (a xorshift
/// stream seeded by the offset's 64-KiB block, so any slice can be checked
/// on its own and a misplaced segment shows).
pub fn bulk_pattern(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut block = usize::MAX;
    let mut x = 0u64;
    for i in 0..n {
        if i >> 16 != block {
            block = i >> 16;
            x = 0x9e37_79b9_7f4a_7c15 ^ (block as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out
}

/// FNV-1a (64 bits) of `data`: what `/digest` answers with the length.
pub fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Locks a mutex, ignoring poisoning (a panicking connection thread must not
/// wedge the server).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A stop flag that sleeping threads can wait on.
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopSignal {
    fn stop(&self) {
        *lock(&self.stopped) = true;
        self.changed.notify_all();
    }

    fn is_stopped(&self) -> bool {
        *lock(&self.stopped)
    }

    /// Sleeps for `duration` unless stopped first; returns whether stopped.
    fn sleep(&self, duration: Duration) -> bool {
        let guard = lock(&self.stopped);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, duration, |stopped| !*stopped)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard
    }
}

/// Waits until every handle has finished or `deadline` passes, joins the
/// finished ones and returns how many were left running (detached).
fn join_until(handles: Vec<JoinHandle<()>>, deadline: Instant) -> usize {
    while Instant::now() < deadline && handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut left = 0;
    for handle in handles {
        if handle.is_finished() {
            // A panic in a connection thread has already been reported on
            // stderr; there is nothing more to do with it here.
            let _ = handle.join();
        } else {
            left += 1;
        }
    }
    left
}

/// State shared between an [`HttpServer`] handle, its acceptor thread and
/// its connection threads.
struct HttpShared {
    colour: String,
    name: String,
    stop: StopSignal,
    accepted: AtomicU64,
    requests: AtomicU64,
    /// Number of live connection threads.
    active: Mutex<usize>,
    slot_freed: Condvar,
    /// Clones of the open connections, so `stop` can shut them down.
    open: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A minimal HTTP/1.1 server serving from threads of this process, with its
/// listening socket in a backend namespace. See the [module docs](self).
pub struct HttpServer {
    ns: String,
    addr: SocketAddr,
    shared: Arc<HttpShared>,
    listener: Option<Arc<TcpListener>>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts listening on `bind` inside namespace `ns` and serving
    /// connections. Responses carry the body `"{colour} {name}\n"` and the
    /// header `X-Backend: {name}`. Port 0 picks a free port (see
    /// [`local_addr`](Self::local_addr)).
    pub fn start(
        ns: &str,
        bind: impl Into<SocketAddr>,
        colour: &str,
        name: &str,
    ) -> Result<HttpServer> {
        let bind = bind.into();
        let listener = in_netns(ns, || -> io::Result<TcpListener> {
            let listener = TcpListener::bind(bind)?;
            // std listens with a backlog of 128; raise it for bursts of
            // concurrent connections (listen(2) again only changes it).
            // SAFETY: plain syscall on a descriptor we own.
            if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } != 0 {
                return Err(io::Error::last_os_error());
            }
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?
        .with_context(|| format!("HTTP server {name}: listening on {bind} in netns {ns:?}"))?;
        let addr = listener.local_addr().unwrap_or(bind);
        let listener = Arc::new(listener);
        let shared = Arc::new(HttpShared {
            colour: colour.to_owned(),
            name: name.to_owned(),
            stop: StopSignal::default(),
            accepted: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            active: Mutex::new(0),
            slot_freed: Condvar::new(),
            open: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || accept_loop(&listener, &shared))
                .with_context(|| format!("HTTP server {name}: spawning the acceptor thread"))?
        };
        Ok(HttpServer {
            ns: ns.to_owned(),
            addr,
            shared,
            listener: Some(listener),
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The namespace the server's sockets live in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The backend name given to [`start`](Self::start).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Number of TCP connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Number of HTTP requests read so far (answered or in progress).
    pub fn requests_served(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    /// Number of connections currently open.
    pub fn open_connections(&self) -> usize {
        *lock(&self.shared.active)
    }

    /// Whether the server is still running (not stopped).
    pub fn is_running(&self) -> bool {
        self.acceptor.is_some()
    }

    /// Stops the server: the listener is closed at once (new connections are
    /// refused), open connections are shut down (interrupting `/sleep`
    /// requests) and the threads are joined, waiting at most a few seconds.
    /// Calling it again does nothing.
    pub fn stop(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        self.shared.stop.stop();
        self.shared.slot_freed.notify_all();
        if let Some(listener) = self.listener.take() {
            // Shutting a listening socket down closes it right away (the
            // acceptor thread may still hold a reference for a moment).
            // SAFETY: plain syscall on a descriptor kept alive by `listener`.
            unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        let _ = acceptor.join();
        for stream in lock(&self.shared.open).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        let left = join_until(workers, deadline);
        if left > 0 {
            eprintln!(
                "HTTP server {} in {}: {left} connection thread(s) still running after stop",
                self.shared.name, self.ns
            );
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("ns", &self.ns)
            .field("addr", &self.addr)
            .field("name", &self.shared.name)
            .field("running", &self.is_running())
            .finish()
    }
}

/// Decrements the live-connection count and unregisters the connection when
/// a connection thread ends, however it ends.
struct ConnectionGuard {
    shared: Arc<HttpShared>,
    id: u64,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.shared.open).remove(&self.id);
        *lock(&self.shared.active) -= 1;
        self.shared.slot_freed.notify_all();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<HttpShared>) {
    let mut next_id = 0u64;
    loop {
        // Wait for a free connection slot.
        {
            let mut active = lock(&shared.active);
            while *active >= MAX_CONNECTIONS && !shared.stop.is_stopped() {
                active = shared
                    .slot_freed
                    .wait_timeout(active, POLL_INTERVAL)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        }
        if shared.stop.is_stopped() {
            return;
        }
        let mut pollfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the listener outlives the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, POLL_INTERVAL.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _peer)) => {
                next_id += 1;
                spawn_connection(shared, stream, next_id);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) if shared.stop.is_stopped() => return,
            Err(err) => {
                // E.g. EMFILE or ECONNABORTED: report and keep going.
                eprintln!("HTTP server {}: accept failed: {err}", shared.name);
                shared.stop.sleep(Duration::from_millis(20));
            }
        }
    }
}

fn spawn_connection(shared: &Arc<HttpShared>, stream: TcpStream, id: u64) {
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    *lock(&shared.active) += 1;
    {
        let mut open = lock(&shared.open);
        if let Ok(clone) = stream.try_clone() {
            open.insert(id, clone);
        }
        // `stop` sets the flag before shutting registered connections down,
        // so one registered after that sweep is caught here.
        if shared.stop.is_stopped() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
    let guard = ConnectionGuard {
        shared: Arc::clone(shared),
        id,
    };
    let spawned = std::thread::Builder::new()
        .name(format!("http-{}-c", shared.name))
        .spawn(move || {
            if let Err(err) = serve_connection(&guard.shared, stream) {
                if !guard.shared.stop.is_stopped() && !is_disconnect(&err) {
                    eprintln!("HTTP server {}: connection error: {err}", guard.shared.name);
                }
            }
        });
    match spawned {
        Ok(handle) => {
            let mut workers = lock(&shared.workers);
            workers.retain(|worker| !worker.is_finished());
            workers.push(handle);
        }
        // The closure (and with it the guard and the stream) is dropped,
        // which closes the connection and frees the slot.
        Err(err) => eprintln!("HTTP server {}: cannot spawn a thread: {err}", shared.name),
    }
}

/// Errors that just mean the peer went away or the connection idled out.
fn is_disconnect(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// A request as far as the server cares.
struct Request {
    path: String,
    close: bool,
}

fn parse_request(head: &Head) -> io::Result<Request> {
    let mut parts = head.start.split_whitespace();
    let (Some(_method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("bad request line {:?}", head.start)));
    };
    let close = if version.eq_ignore_ascii_case("HTTP/1.0") {
        !head.has_token("connection", "keep-alive")
    } else {
        head.has_token("connection", "close")
    };
    Ok(Request {
        path: path.to_owned(),
        close,
    })
}

/// What `/sleep/{ms}` asks for: `None` for other paths, `Some(Err)` for a
/// malformed or too long duration.
fn sleep_request(path: &str) -> Option<Result<Duration, ()>> {
    let rest = path.strip_prefix("/sleep/")?;
    let ms = rest.split(['?', '/']).next().unwrap_or_default();
    Some(
        ms.parse::<u64>()
            .map(Duration::from_millis)
            .ok()
            .filter(|duration| *duration <= MAX_SLEEP)
            .ok_or(()),
    )
}

fn serve_connection(shared: &HttpShared, stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut conn = Conn::new(stream);
    loop {
        let Some(head) = conn.read_head()? else {
            return Ok(());
        };
        shared.requests.fetch_add(1, Ordering::Relaxed);
        let request = parse_request(&head)?;
        if head.header("transfer-encoding").is_some() {
            return Err(invalid("chunked request bodies are not supported".into()));
        }
        let mut sent = Vec::new();
        if let Some(len) = head.content_length()? {
            if len > MAX_BULK {
                return Err(invalid(format!("a body of {len} bytes is too long")));
            }
            sent = conn.read_body(len)?;
        }
        if request.path == "/digest" {
            let body = format!("{} {:016x}\n", sent.len(), digest(&sent));
            write_response(&mut conn, "200 OK", shared, request.close, body.as_bytes())?;
            if request.close {
                let _ = conn.get_ref().shutdown(Shutdown::Write);
                return Ok(());
            }
            continue;
        }
        if let Some(n) = request.path.strip_prefix("/bytes/") {
            let body = match n.parse::<usize>() {
                Ok(n) if n <= MAX_BULK => bulk_pattern(n),
                _ => b"bad length\n".to_vec(),
            };
            write_response(&mut conn, "200 OK", shared, request.close, &body)?;
            if request.close {
                let _ = conn.get_ref().shutdown(Shutdown::Write);
                return Ok(());
            }
            continue;
        }
        let (status, body) = match sleep_request(&request.path) {
            Some(Ok(duration)) => {
                if shared.stop.sleep(duration) {
                    return Ok(());
                }
                ("200 OK", format!("{} {}\n", shared.colour, shared.name))
            }
            Some(Err(())) => ("400 Bad Request", "bad sleep duration\n".to_owned()),
            None => ("200 OK", format!("{} {}\n", shared.colour, shared.name)),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Backend: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            shared.name,
            if request.close { "close" } else { "keep-alive" },
        );
        conn.write_all(response.as_bytes())?;
        if request.close {
            let _ = conn.get_ref().shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// Writes one response with `body`.
fn write_response(
    conn: &mut Conn<TcpStream>,
    status: &str,
    shared: &HttpShared,
    close: bool,
    body: &[u8],
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         X-Backend: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        shared.name,
        if close { "close" } else { "keep-alive" },
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

/// Counters shared with the UDP worker thread.
struct UdpShared {
    stop: AtomicBool,
    answered: AtomicU64,
}

/// A UDP server answering each datagram with `"{colour} {name} "` followed
/// by the original payload. See the [module docs](self).
pub struct UdpEchoServer {
    ns: String,
    addr: SocketAddr,
    name: String,
    shared: Arc<UdpShared>,
    worker: Option<JoinHandle<()>>,
}

impl UdpEchoServer {
    /// Binds `bind` inside namespace `ns` and starts answering datagrams.
    /// Port 0 picks a free port (see [`local_addr`](Self::local_addr)).
    pub fn start(
        ns: &str,
        bind: impl Into<SocketAddr>,
        colour: &str,
        name: &str,
    ) -> Result<UdpEchoServer> {
        let bind = bind.into();
        let socket = in_netns(ns, || -> io::Result<UdpSocket> {
            let socket = UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(POLL_INTERVAL))?;
            Ok(socket)
        })?
        .with_context(|| format!("UDP server {name}: binding {bind} in netns {ns:?}"))?;
        let addr = socket.local_addr().unwrap_or(bind);
        let shared = Arc::new(UdpShared {
            stop: AtomicBool::new(false),
            answered: AtomicU64::new(0),
        });
        let prefix = format!("{colour} {name} ").into_bytes();
        let worker = {
            let shared = Arc::clone(&shared);
            let owned_name = name.to_owned();
            std::thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || udp_loop(&socket, &prefix, &shared, &owned_name))
                .with_context(|| format!("UDP server {name}: spawning the worker thread"))?
        };
        Ok(UdpEchoServer {
            ns: ns.to_owned(),
            addr,
            name: name.to_owned(),
            shared,
            worker: Some(worker),
        })
    }

    /// The address the server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The namespace the server's socket lives in.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The backend name given to [`start`](Self::start).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of datagrams answered so far.
    pub fn datagrams_answered(&self) -> u64 {
        self.shared.answered.load(Ordering::Relaxed)
    }

    /// Whether the server is still running (not stopped).
    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the server and closes its socket (within about 50 ms).
    /// Calling it again does nothing.
    pub fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.shared.stop.store(true, Ordering::Relaxed);
            if join_until(vec![worker], Instant::now() + STOP_GRACE) > 0 {
                eprintln!(
                    "UDP server {} in {}: worker still running after stop",
                    self.name, self.ns
                );
            }
        }
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for UdpEchoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpEchoServer")
            .field("ns", &self.ns)
            .field("addr", &self.addr)
            .field("name", &self.name)
            .field("running", &self.is_running())
            .finish()
    }
}

fn udp_loop(socket: &UdpSocket, prefix: &[u8], shared: &UdpShared, name: &str) {
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(prefix.len() + buf.len());
    while !shared.stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((len, peer)) => {
                reply.clear();
                reply.extend_from_slice(prefix);
                reply.extend_from_slice(&buf[..len]);
                match socket.send_to(&reply, peer) {
                    Ok(_) => {
                        shared.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => eprintln!("UDP server {name}: reply to {peer} failed: {err}"),
                }
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // ICMP errors from earlier replies surface as ECONNREFUSED.
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(err) => {
                eprintln!("UDP server {name}: receive failed: {err}");
                std::thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sleep_paths() {
        assert_eq!(sleep_request("/"), None);
        assert_eq!(sleep_request("/sleeping"), None);
        assert_eq!(
            sleep_request("/sleep/250"),
            Some(Ok(Duration::from_millis(250)))
        );
        assert_eq!(
            sleep_request("/sleep/5?x=1"),
            Some(Ok(Duration::from_millis(5)))
        );
        assert_eq!(sleep_request("/sleep/abc"), Some(Err(())));
        assert_eq!(sleep_request("/sleep/999999999"), Some(Err(())));
    }

    #[test]
    fn parses_connection_semantics() {
        let head = |start: &str, headers: &[(&str, &str)]| Head {
            start: start.to_owned(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(!parse_request(&head("GET / HTTP/1.1", &[])).unwrap().close);
        assert!(
            parse_request(&head("GET / HTTP/1.1", &[("Connection", "close")]))
                .unwrap()
                .close
        );
        assert!(parse_request(&head("GET / HTTP/1.0", &[])).unwrap().close);
        assert!(
            !parse_request(&head("GET / HTTP/1.0", &[("connection", "Keep-Alive")]))
                .unwrap()
                .close
        );
        assert!(parse_request(&head("GET /", &[])).is_err());
    }
}
