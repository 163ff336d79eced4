//! Active health checks: the pure rise/fall state machine, and the probes
//! (TCP connect, HTTP GET) that run as tasks on the daemon's runtime — one
//! small task per backend, no thread per backend.

use std::{net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

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

/// One probe of `addr` (see [`Prober`]).
pub async fn probe(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), String> {
    Prober::new(cfg)?.probe(addr).await
}

/// What a backend's probes need that is made once: the TLS client of an
/// HTTPS check (its roots read from the CA file, or the host's bundle).
pub struct Prober {
    cfg: HealthConfig,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// The host's CA bundle (Debian's ca-certificates), for HTTPS checks
/// without `ca`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The longest body an `expect` check reads.
const BODY_LIMIT: usize = 64 * 1024;

impl Prober {
    /// Fails when the TLS client cannot be made (an unreadable CA file).
    pub fn new(cfg: &HealthConfig) -> Result<Self, String> {
        let tls = match &cfg.kind {
            HealthKind::Http { tls: Some(t), .. } => Some(tls_connector(t)?),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tls,
        })
    }

    /// One probe of `addr` within the check's timeout.
    pub async fn probe(&self, addr: SocketAddr) -> Result<(), String> {
        match tokio::time::timeout(self.cfg.timeout, self.probe_inner(addr)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {:?}", self.cfg.timeout)),
        }
    }

    async fn probe_inner(&self, addr: SocketAddr) -> Result<(), String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let HealthKind::Http {
            path,
            status,
            host,
            expect,
            tls,
        } = &self.cfg.kind
        else {
            return Ok(());
        };
        let host = host.clone().unwrap_or_else(|| addr.to_string());
        match (&self.tls, tls) {
            (Some(connector), Some(t)) => {
                let name = match &t.sni {
                    Some(n) => rustls::pki_types::ServerName::try_from(n.clone())
                        .map_err(|e| format!("sni {n}: {e}"))?,
                    None => rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
                };
                let stream = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                http_get(stream, path, &host, *status, expect.as_deref()).await
            }
            _ => http_get(stream, path, &host, *status, expect.as_deref()).await,
        }
    }
}

/// `GET path` on a connected stream with hyper's HTTP/1.1 client: the
/// status in `status`, and the body containing `expect` when given.
async fn http_get<S>(
    stream: S,
    path: &str,
    host: &str,
    status: (u16, u16),
    expect: Option<&str>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt as _;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "bgswitch-health")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        let code = resp.status().as_u16();
        if !(status.0..=status.1).contains(&code) {
            return Err(format!("HTTP {code} (expected {}-{})", status.0, status.1));
        }
        if let Some(want) = expect {
            let body = http_body_util::Limited::new(resp.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            if !body.windows(want.len()).any(|w| w == want.as_bytes()) {
                return Err(format!(
                    "HTTP {code}, but the body (its first {} bytes) does not contain {want:?}",
                    body.len().min(BODY_LIMIT)
                ));
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

/// The TLS client of an HTTPS check: roots from `ca` (or the host's
/// bundle), or — `insecure` — no verification at all.
fn tls_connector(t: &crate::config::TlsProbe) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    // ring, the provider etcd-client's TLS already builds (aws-lc-rs, with
    // post-quantum key exchange, would add a C toolchain to the build);
    // backends' health checks need no post-quantum key exchange.
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if t.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(NoVerification(provider)))
            .with_no_client_auth()
    } else {
        let path =
            t.ca.clone()
                .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CA_BUNDLE));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path)
            .map_err(|e| format!("reading CA file {}: {e}", path.display()))?
        {
            let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("CA file {}: {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("CA file {}: no certificate in it", path.display()));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// `insecure = true`: any certificate is taken (logged loudly at start).
#[derive(Debug)]
struct NoVerification(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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

    #[tokio::test]
    async fn probes_against_real_sockets() {
        probes_against_real_sockets_at("127.0.0.1:0").await;
    }

    #[tokio::test]
    async fn probes_an_ipv6_backend() {
        probes_against_real_sockets_at("[::1]:0").await;
    }

    async fn probes_against_real_sockets_at(bind: &str) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads, mut seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for status in [200, 503] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = heads.send(String::from_utf8_lossy(&buf[..n]).into_owned());
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
                host: None,
                expect: None,
                tls: None,
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        };
        assert_eq!(probe(addr, &http).await, Ok(()));
        // The Host header as a URL writes the address (IPv6 in brackets).
        let head = seen.recv().await.unwrap();
        assert!(
            head.starts_with("GET /healthz HTTP/1.1\r\n")
                && head
                    .to_ascii_lowercase()
                    .contains(&format!("host: {addr}\r\n")),
            "{head}"
        );
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
