//! The daemon's IO edges: the control socket (peer credentials, framing,
//! limits), signals, and the Prometheus endpoint. Every request becomes an
//! [`Event`] for the daemon's loop; nothing here changes state.

use std::{io, time::Duration};

use anyhow::anyhow;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

use super::event::{Event, Peer};
use crate::api::{self, Request, Response};

/// How long a client may take to send a request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most control connections served at once.
const MAX_CLIENTS: usize = 64;

fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns static storage or null; copied out at once.
    let p = unsafe { libc::getpwuid(uid) };
    if p.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: pw_name of a non-null passwd entry is a valid C string.
    let name = unsafe { std::ffi::CStr::from_ptr((*p).pw_name) };
    name.to_string_lossy().into_owned()
}

/// Supplementary groups of a process, from /proc.
fn process_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

pub async fn signal_loop(tx: mpsc::Sender<Event>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let ev = tokio::select! {
            _ = term.recv() => Event::Shutdown("SIGTERM"),
            _ = int.recv() => Event::Shutdown("SIGINT"),
            _ = hup.recv() => Event::Reload,
        };
        if tx.send(ev).await.is_err() {
            return Ok(());
        }
    }
}

pub async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<Event>, gid: Option<u32>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::warn!("control socket: {MAX_CLIENTS} clients already connected; refusing one");
            let mut s = stream;
            let _ = write_response(
                &mut s,
                &Response::error("too many control connections; try again"),
            )
            .await;
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, tx, gid).await {
                log::warn!("control client: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn write_response(stream: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    write_bounded(stream, &line).await
}

/// Writes with the same patience as reads: a client that stops reading is
/// cut off like one that stops writing, so it cannot hold a slot forever.
async fn write_bounded(
    w: &mut (impl tokio::io::AsyncWrite + Unpin),
    bytes: &[u8],
) -> io::Result<()> {
    tokio::time::timeout(REQUEST_TIMEOUT, w.write_all(bytes))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not read its answer in time",
            )
        })?
}

async fn serve_client(
    mut stream: UnixStream,
    tx: mpsc::Sender<Event>,
    gid: Option<u32>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        user: user_name(cred.uid()),
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let allowed = peer.uid == 0
        || peer.uid == me
        || gid.is_some_and(|g| {
            peer.gid == g || peer.pid.is_some_and(|p| process_groups(p).contains(&g))
        });
    if !allowed {
        // Logged before the answer is written: by the time the client reads
        // its refusal, the log already has it.
        log::warn!(
            "control client: refused {} (uid {}{}): not root nor in the socket group",
            peer.user,
            peer.uid,
            peer.pid.map(|p| format!(", pid {p}")).unwrap_or_default()
        );
        let _ = write_response(
            &mut stream,
            &Response::error("permission denied: not root nor in the socket group"),
        )
        .await;
        return Ok(());
    }
    let (read, mut write) = stream.split();
    let mut reader = BufReader::new(read).take(api::MAX_REQUEST_BYTES as u64 + 1);
    let mut line = Vec::new();
    loop {
        line.clear();
        reader.set_limit(api::MAX_REQUEST_BYTES as u64 + 1);
        let n = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
            .await
        {
            Err(_) => {
                return Err(anyhow!(
                    "{}: no complete request within {REQUEST_TIMEOUT:?}; closing",
                    peer.user
                ));
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > api::MAX_REQUEST_BYTES || !line.ends_with(b"\n") {
            let resp = Response::error(format!(
                "request too long or not newline-terminated (limit {} bytes)",
                api::MAX_REQUEST_BYTES
            ));
            log::warn!("control client: {peer}: oversized or truncated request refused");
            let mut l = serde_json::to_vec(&resp)?;
            l.push(b'\n');
            write_bounded(&mut write, &l).await?;
            return Ok(());
        }
        // Told once this request's answer is written (the daemon waits on it
        // before it exits after a detach).
        let mut written: Option<oneshot::Sender<()>> = None;
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => {
                log::warn!("control client: {peer}: malformed request refused: {e}");
                Response::error(format!("malformed request: {e}"))
            }
            Ok(req) => {
                let (reply, rx) = oneshot::channel();
                let (done, done_rx) = oneshot::channel();
                written = Some(done);
                if tx
                    .send(Event::Request {
                        req,
                        peer: peer.clone(),
                        reply,
                        written: done_rx,
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                rx.await
                    .unwrap_or_else(|_| Response::error("daemon is shutting down"))
            }
        };
        let mut l = serde_json::to_vec(&resp)?;
        l.push(b'\n');
        write_bounded(&mut write, &l).await?;
        if let Some(w) = written {
            let _ = w.send(());
        }
    }
}

/// Serves `/metrics` on `listener` with hyper (HTTP/1.1: GET and HEAD,
/// keep-alive, content negotiation between OpenMetrics and the Prometheus
/// text format); the text comes from the daemon loop. Limits: 16
/// connections (more are closed at once), 16 KiB of request head read
/// within 5 s, an idle keep-alive connection closed after 30 s.
pub async fn metrics_loop(listener: TcpListener, tx: mpsc::Sender<Event>) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::debug!("metrics client {peer}: {METRICS_CONNECTIONS} connections open; closed");
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let tx = tx.clone();
                async move { Ok::<_, std::convert::Infallible>(metrics_answer(req, tx).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .max_buf_size(16 * 1024)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            // A keep-alive connection idle (or slow) this long is closed.
            let idle = tokio::time::sleep(METRICS_IDLE);
            tokio::pin!(idle);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        log::debug!("metrics client {peer}: {e}");
                    }
                }
                () = &mut idle => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
            drop(permit);
        });
    }
}

const METRICS_CONNECTIONS: usize = 16;
const METRICS_IDLE: Duration = Duration::from_secs(30);

async fn metrics_answer(
    req: hyper::Request<hyper::body::Incoming>,
    tx: mpsc::Sender<Event>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use hyper::{header, Method, StatusCode};
    let reply = |status: StatusCode, ctype: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, ctype)
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET or HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let format = crate::metrics::Format::negotiate(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    let (tell, rx) = oneshot::channel();
    if tx.send(Event::Scrape { reply: tell }).await.is_err() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the daemon is stopping\n".into(),
        );
    }
    match rx.await {
        Ok(Ok(text)) => reply(StatusCode::OK, format.content_type(), format.encode(text)),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e}\n"),
        ),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the daemon is stopping\n".into(),
        ),
    }
}
