//! The control-socket client: reaching the daemon (running, absent, or
//! refusing this user), one request and its answer.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, Context as _};

use crate::api::{Request, Response};

/// How a connection to the daemon's socket went.
pub enum Reach {
    Connected(UnixStream),
    /// Nothing listens there (no socket, or a stale one).
    NoDaemon(std::io::Error),
    /// The socket is there but not for this user.
    Denied(std::io::Error),
}

/// Connects to the daemon's socket.
pub fn reach(socket: &Path) -> Reach {
    match UnixStream::connect(socket) {
        Ok(s) => Reach::Connected(s),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Reach::Denied(e),
        Err(e) => Reach::NoDaemon(e),
    }
}

/// What to say when the socket refuses this user.
pub(crate) fn denied(socket: &Path, e: &std::io::Error) -> anyhow::Error {
    anyhow!(
        "{}: {e}: the daemon's socket is for root and the members of its `socket_group` \
         (see the config); run this as root, or as a member of that group",
        socket.display()
    )
}

/// Sends one request and reads the response.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Response> {
    match reach(socket) {
        Reach::Connected(stream) => exchange(stream, req),
        Reach::Denied(e) => Err(denied(socket, &e)),
        Reach::NoDaemon(e) => Err(anyhow!(
            "no bgswitch daemon answers at {} ({e}): is it running?",
            socket.display()
        )),
    }
}

/// One request and its answer on a connected socket.
pub(crate) fn exchange(stream: UnixStream, req: &Request) -> anyhow::Result<Response> {
    // A flip, a shift or `check` may wait for the service's checks (each
    // at most 10 minutes, run in parallel).
    let answer_within = match req {
        Request::Flip { .. } | Request::Shift { .. } | Request::Check { .. } => {
            Duration::from_secs(11 * 60)
        }
        _ => Duration::from_secs(30),
    };
    stream.set_read_timeout(Some(answer_within))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = stream;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    // The daemon may refuse (and close) before reading our request: then the
    // write fails, but its reason is waiting to be read.
    let written = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        written.context("sending the request to the daemon")?;
        read.context("reading the daemon's answer")?;
        return Err(anyhow!(
            "the daemon closed the connection without answering"
        ));
    }
    serde_json::from_str(&answer).context("the daemon's answer is not valid")
}
