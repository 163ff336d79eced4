//! Minimal HTTP/1.1 message framing shared by the test servers and clients.
//!
//! Only what the test bed needs: a buffered connection that reads a message
//! head (start line and headers) and a body of known length or up to EOF.

use std::io::{self, Read, Write};

/// Largest message head accepted, in bytes.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// A stream plus the bytes read from it but not consumed yet (so pipelined
/// or keep-alive messages are not lost between calls).
pub(crate) struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
}

/// A parsed message head.
#[derive(Debug)]
pub(crate) struct Head {
    /// `GET /path HTTP/1.1` or `HTTP/1.1 200 OK`.
    pub start: String,
    /// Header names and values, in order, values trimmed.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Whether a comma-separated header (e.g. `Connection`) contains `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name))
            .flat_map(|(_, value)| value.split(','))
            .any(|item| item.trim().eq_ignore_ascii_case(token))
    }

    /// The `Content-Length`, if any; an unparsable value is an error.
    pub fn content_length(&self) -> io::Result<Option<usize>> {
        self.header("content-length")
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| invalid(format!("bad Content-Length {value:?}")))
            })
            .transpose()
    }
}

pub(crate) fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl<S: Read + Write> Conn<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads more bytes into the buffer; returns how many (0 at EOF).
    fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
    }

    /// Reads one message head. Returns `Ok(None)` on a clean EOF before any
    /// byte of a new message, and an error on EOF in the middle of a head.
    pub fn read_head(&mut self) -> io::Result<Option<Head>> {
        loop {
            if let Some((head_len, sep_len)) = find_head_end(&self.buf) {
                let raw: Vec<u8> = self.buf.drain(..head_len + sep_len).collect();
                return parse_head(&raw[..head_len]).map(Some);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid(format!(
                    "message head longer than {MAX_HEAD} bytes"
                )));
            }
            if self.fill()? == 0 {
                return if self.buf.iter().all(u8::is_ascii_whitespace) {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of a message head",
                    ))
                };
            }
        }
    }

    /// Reads exactly `len` body bytes.
    pub fn read_body(&mut self, len: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < len {
            if self.fill()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed after {} of {len} body bytes",
                        self.buf.len()
                    ),
                ));
            }
        }
        Ok(self.buf.drain(..len).collect())
    }

    /// Reads the body up to EOF.
    pub fn read_to_eof(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? != 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Writes a whole message.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)?;
        self.stream.flush()
    }
}

/// Finds the end of a head: returns (length of head, length of separator).
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    (0..buf.len()).find_map(|i| {
        if buf[i..].starts_with(b"\r\n\r\n") {
            Some((i, 4))
        } else if buf[i..].starts_with(b"\n\n") {
            Some((i, 2))
        } else {
            None
        }
    })
}

fn parse_head(raw: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(raw).map_err(|_| invalid("non-UTF-8 message head".into()))?;
    // Tolerate leading blank lines (RFC 9112 section 2.2).
    let mut lines = text.lines().skip_while(|line| line.trim().is_empty());
    let start = lines
        .next()
        .ok_or_else(|| invalid("empty message head".into()))?
        .trim()
        .to_owned();
    let headers = lines
        .map(|line| {
            line.split_once(':')
                .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
                .ok_or_else(|| invalid(format!("malformed header line {line:?}")))
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(Head { start, headers })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A read-only in-memory stream that discards writes.
    struct Mem(Cursor<Vec<u8>>);

    impl Read for Mem {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Mem {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn reads_pipelined_messages() {
        let data = b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
                     GET /b HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n";
        let mut conn = Conn::new(Mem(Cursor::new(data.to_vec())));
        let head = conn.read_head().unwrap().unwrap();
        assert_eq!(head.start, "GET /a HTTP/1.1");
        assert_eq!(head.header("HOST"), Some("x"));
        assert_eq!(head.content_length().unwrap(), Some(3));
        assert_eq!(conn.read_body(3).unwrap(), b"abc");
        let head = conn.read_head().unwrap().unwrap();
        assert_eq!(head.start, "GET /b HTTP/1.1");
        assert!(head.has_token("connection", "close"));
        assert!(conn.read_head().unwrap().is_none());
    }

    #[test]
    fn rejects_truncated_messages() {
        let mut conn = Conn::new(Mem(Cursor::new(b"HTTP/1.1 200 OK\r\nX".to_vec())));
        assert!(conn.read_head().is_err());
        let mut conn = Conn::new(Mem(Cursor::new(b"HTTP/1.1 200 OK\r\n\r\nab".to_vec())));
        conn.read_head().unwrap().unwrap();
        assert!(conn.read_body(3).is_err());
    }
}
