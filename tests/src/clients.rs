//! Clients for the test servers, with their sockets in a given namespace
//! (normally the client namespace, or the load-balancer namespace to talk to
//! backends directly).
//!
//! Every socket is created inside the namespace with
//! [`in_netns`] and every operation has a timeout
//! ([`CONNECT_TIMEOUT`], [`IO_TIMEOUT`] by default) so a broken data path
//! makes a test fail instead of hang.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::http::{invalid, Conn};
use crate::netns::in_netns;

/// Timeout for establishing a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Default timeout for each read or write (and for waiting for a UDP reply).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Response body (lossily decoded as UTF-8), e.g. `"blue b1\n"`.
    pub body: String,
    /// Value of the `X-Backend` header, or an empty string if absent.
    pub backend: String,
}

/// Turns the `EAGAIN` a socket timeout produces into a readable error.
fn explain_timeout(err: io::Error, timeout: Duration) -> io::Error {
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("timed out after {timeout:?}"),
        ),
        _ => err,
    }
}

/// Opens a TCP connection to `addr` from namespace `ns`, with the default
/// timeouts applied.
fn connect(ns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let stream = in_netns(ns, || -> io::Result<TcpStream> {
        let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })?
    .with_context(|| format!("connecting to {addr} from netns {ns:?}"))?;
    Ok(stream)
}

fn request(addr: SocketAddr, path: &str, close: bool) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bgswitch-tests\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Reads one response. `until_eof` allows a body without Content-Length
/// (delimited by the server closing the connection).
fn read_reply(conn: &mut Conn<TcpStream>, until_eof: bool) -> io::Result<(HttpReply, bool)> {
    let head = conn.read_head()?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        )
    })?;
    let mut parts = head.start.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code
            .parse::<u16>()
            .map_err(|_| invalid(format!("bad status line {:?}", head.start)))?,
        _ => return Err(invalid(format!("bad status line {:?}", head.start))),
    };
    if head.header("transfer-encoding").is_some() {
        return Err(invalid("chunked responses are not supported".into()));
    }
    let body = match head.content_length()? {
        Some(len) => conn.read_body(len)?,
        None if until_eof => conn.read_to_eof()?,
        None => return Err(invalid("keep-alive response without Content-Length".into())),
    };
    let reply = HttpReply {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        backend: head.header("x-backend").unwrap_or_default().to_owned(),
    };
    Ok((reply, head.has_token("connection", "close")))
}

/// `GET path` on a new TCP connection to `addr` opened from namespace `ns`,
/// with `Connection: close`. Times out after [`CONNECT_TIMEOUT`] when
/// connecting and [`IO_TIMEOUT`] per read or write.
pub fn http_get(ns: &str, addr: impl Into<SocketAddr>, path: &str) -> Result<HttpReply> {
    let addr = addr.into();
    let mut conn = Conn::new(connect(ns, addr)?);
    let mut exchange = || -> io::Result<HttpReply> {
        conn.write_all(request(addr, path, true).as_bytes())?;
        Ok(read_reply(&mut conn, true)?.0)
    };
    exchange()
        .map_err(|err| explain_timeout(err, IO_TIMEOUT))
        .with_context(|| format!("GET {path} from {addr} (netns {ns:?})"))
}

/// A bulk transfer's outcome: which backend served it, and how long it took.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub backend: String,
    pub elapsed: Duration,
}

/// `GET /bytes/{n}` from `addr` (a new connection from namespace `ns`):
/// fails unless exactly the `n` bytes of [`crate::servers::bulk_pattern`]
/// arrive (naming the first byte that differs).
pub fn http_download(ns: &str, addr: impl Into<SocketAddr>, n: usize) -> Result<Transfer> {
    let addr = addr.into();
    let t = std::time::Instant::now();
    let mut conn = Conn::new(connect(ns, addr)?);
    let path = format!("/bytes/{n}");
    let mut exchange = || -> io::Result<(Vec<u8>, String)> {
        conn.write_all(request(addr, &path, true).as_bytes())?;
        let head = conn
            .read_head()?
            .ok_or_else(|| invalid("connection closed before a response".into()))?;
        let len = head
            .content_length()?
            .ok_or_else(|| invalid("no Content-Length".into()))?;
        let backend = head.header("x-backend").unwrap_or_default().to_owned();
        Ok((conn.read_body(len)?, backend))
    };
    let (body, backend) = exchange()
        .map_err(|err| explain_timeout(err, IO_TIMEOUT))
        .with_context(|| format!("GET {path} from {addr} (netns {ns:?})"))?;
    let want = crate::servers::bulk_pattern(n);
    if body.len() != n {
        bail!(
            "GET {path} from {addr}: {} bytes arrived, not {n}",
            body.len()
        );
    }
    if let Some(i) = body.iter().zip(&want).position(|(a, b)| a != b) {
        bail!("GET {path} from {addr}: byte {i} of {n} differs (backend {backend})");
    }
    Ok(Transfer {
        backend,
        elapsed: t.elapsed(),
    })
}

/// `POST /digest` with `data` to `addr` (a new connection from namespace
/// `ns`): fails unless the server counted exactly `data`'s length and
/// [`crate::servers::digest`].
pub fn http_upload(ns: &str, addr: impl Into<SocketAddr>, data: &[u8]) -> Result<Transfer> {
    let addr = addr.into();
    let t = std::time::Instant::now();
    let mut conn = Conn::new(connect(ns, addr)?);
    let mut exchange = || -> io::Result<HttpReply> {
        let head = format!(
            "POST /digest HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bgswitch-tests\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        );
        conn.write_all(head.as_bytes())?;
        conn.write_all(data)?;
        Ok(read_reply(&mut conn, true)?.0)
    };
    let reply = exchange()
        .map_err(|err| explain_timeout(err, IO_TIMEOUT))
        .with_context(|| format!("POST /digest to {addr} (netns {ns:?})"))?;
    let want = format!("{} {:016x}\n", data.len(), crate::servers::digest(data));
    if reply.body != want {
        bail!(
            "POST /digest to {addr}: the backend ({}) got {:?}, not {want:?}",
            reply.backend,
            reply.body
        );
    }
    Ok(Transfer {
        backend: reply.backend,
        elapsed: t.elapsed(),
    })
}

/// An HTTP client that sends many requests over one TCP connection
/// (keep-alive), e.g. to check that an established connection keeps going
/// to the same backend across a switch.
pub struct KeepAliveClient {
    ns: String,
    addr: SocketAddr,
    conn: Conn<TcpStream>,
    closed: bool,
    timeout: Duration,
}

impl KeepAliveClient {
    /// Connects to `addr` from namespace `ns`.
    pub fn connect(ns: &str, addr: impl Into<SocketAddr>) -> Result<Self> {
        let addr = addr.into();
        Ok(Self {
            ns: ns.to_owned(),
            addr,
            conn: Conn::new(connect(ns, addr)?),
            closed: false,
            timeout: IO_TIMEOUT,
        })
    }

    /// `GET path` on the shared connection.
    pub fn get(&mut self, path: &str) -> Result<HttpReply> {
        if self.closed {
            bail!(
                "GET {path} from {} (netns {:?}): the server closed the keep-alive connection",
                self.addr,
                self.ns
            );
        }
        let message = request(self.addr, path, false);
        let conn = &mut self.conn;
        let mut exchange = || -> io::Result<(HttpReply, bool)> {
            conn.write_all(message.as_bytes())?;
            read_reply(conn, false)
        };
        match exchange() {
            Ok((reply, closing)) => {
                self.closed = closing;
                Ok(reply)
            }
            Err(err) => {
                self.closed = true;
                Err(explain_timeout(err, self.timeout)).with_context(|| {
                    format!(
                        "GET {path} from {} on keep-alive connection (netns {:?})",
                        self.addr, self.ns
                    )
                })
            }
        }
    }

    /// Changes the read/write timeout (default [`IO_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        let stream = self.conn.get_mut();
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .context("setting keep-alive client timeouts")?;
        self.timeout = timeout;
        Ok(())
    }

    /// Local (client-side) address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.conn.get_ref().local_addr().context("local address")
    }

    /// The address the client connected to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Sends `payload` to `addr` (IPv4 or IPv6) from a fresh UDP socket of its
/// family (ephemeral port) in namespace `ns` and returns the reply as a
/// string; times out after [`IO_TIMEOUT`].
pub fn udp_request(ns: &str, addr: impl Into<SocketAddr>, payload: &[u8]) -> Result<String> {
    let addr = addr.into();
    UdpClient::for_addr(ns, addr)?.request(addr, payload)
}

/// A UDP client that keeps one socket (hence one source port) for several
/// requests.
pub struct UdpClient {
    ns: String,
    socket: UdpSocket,
    timeout: Duration,
}

impl UdpClient {
    /// Binds an ephemeral IPv4 UDP socket in namespace `ns`.
    pub fn new(ns: &str) -> Result<Self> {
        Self::bind(ns, (Ipv4Addr::UNSPECIFIED, 0).into())
    }

    /// Binds an ephemeral IPv6 UDP socket in namespace `ns`.
    pub fn new6(ns: &str) -> Result<Self> {
        Self::bind(ns, (Ipv6Addr::UNSPECIFIED, 0).into())
    }

    /// Binds an ephemeral UDP socket of `to`'s family in namespace `ns`.
    pub fn for_addr(ns: &str, to: SocketAddr) -> Result<Self> {
        match to {
            SocketAddr::V4(_) => Self::new(ns),
            SocketAddr::V6(_) => Self::new6(ns),
        }
    }

    /// Binds a UDP socket to `local` in namespace `ns`.
    pub fn bind(ns: &str, local: SocketAddr) -> Result<Self> {
        let socket = in_netns(ns, || -> io::Result<UdpSocket> {
            let socket = UdpSocket::bind(local)?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            socket.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(socket)
        })?
        .with_context(|| format!("binding a UDP socket in netns {ns:?}"))?;
        Ok(Self {
            ns: ns.to_owned(),
            socket,
            timeout: IO_TIMEOUT,
        })
    }

    /// Changes how long [`request`](Self::request) waits for a reply
    /// (default [`IO_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.socket
            .set_read_timeout(Some(timeout))
            .context("setting UDP client timeout")?;
        self.timeout = timeout;
        Ok(())
    }

    /// Local address (the source port stays the same for every request).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.socket.local_addr().context("local address")
    }

    /// Sends `payload` to `addr` and returns the reply as a string.
    pub fn request(&self, addr: impl Into<SocketAddr>, payload: &[u8]) -> Result<String> {
        let addr = addr.into();
        self.request_from(addr, payload).map(|(reply, _)| reply)
    }

    /// Like [`request`](Self::request), also returning the address the reply
    /// came from. Replies left over from earlier, timed-out requests are
    /// discarded before sending.
    pub fn request_from(
        &self,
        addr: impl Into<SocketAddr>,
        payload: &[u8],
    ) -> Result<(String, SocketAddr)> {
        let addr = addr.into();
        let context = || format!("UDP request to {addr} from netns {:?}", self.ns);
        self.drain().with_context(context)?;
        self.socket.send_to(payload, addr).with_context(context)?;
        let mut buf = vec![0u8; 65536];
        let (len, from) = crate::retry_eintr(|| self.socket.recv_from(&mut buf))
            .map_err(|err| explain_timeout(err, self.timeout))
            .with_context(|| format!("{}: waiting for the reply", context()))?;
        Ok((String::from_utf8_lossy(&buf[..len]).into_owned(), from))
    }

    /// Discards datagrams already queued on the socket.
    fn drain(&self) -> io::Result<()> {
        self.socket.set_nonblocking(true)?;
        let mut buf = [0u8; 2048];
        let result = loop {
            match self.socket.recv_from(&mut buf) {
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                // A queued ICMP error from an earlier request: drop it too.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(err) => break Err(err),
            }
        };
        self.socket.set_nonblocking(false)?;
        result
    }
}
