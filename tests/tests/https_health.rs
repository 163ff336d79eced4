//! HTTPS health checks against real TLS servers (`openssl s_server -www`
//! on every backend of a service, with a certificate for the backends'
//! addresses and a DNS name): verified against the configured CA, refused
//! for another CA or a wrong name, taken without verification with
//! `insecure = true`, and a body that lacks the expected text fails.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bgswitch_tests::{
    switcher::{require_root, served_topology, service, Switcher},
    Colour, Topology,
};

const PORT: u16 = 8443;

/// `openssl s_server` processes, killed when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl (`cargo xtask setup` installs it)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// Two CAs (`backends-ca`, `other-ca`) and the backends' certificate,
/// signed by the first, for every backend's address and `backends.test`.
fn certificates(dir: &Path, topo: &Topology) {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    for ca in ["backends-ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &p(&format!("{ca}.key")),
            "-out",
            &p(&format!("{ca}.pem")),
        ]);
    }
    let sans: Vec<String> = topo
        .backends()
        .iter()
        .map(|b| format!("IP:{}", b.addr))
        .chain(["DNS:backends.test".to_string()])
        .collect();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=backends.test",
        "-CA",
        &p("backends-ca.pem"),
        "-CAkey",
        &p("backends-ca.key"),
        "-addext",
        &format!("subjectAltName={}", sans.join(",")),
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-keyout",
        &p("backends.key"),
        "-out",
        &p("backends.pem"),
    ]);
}

fn health_of(sw: &Switcher) -> Vec<(String, String)> {
    let st = sw.status().unwrap();
    service(&st, "tls")["colours"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["backends"].as_array().unwrap().clone())
        .map(|b| {
            (
                b["health"].as_str().unwrap_or("").to_string(),
                b["health_error"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn wait_all(sw: &Switcher, state: &str, error_part: &str) {
    let start = Instant::now();
    loop {
        let h = health_of(sw);
        if h.iter().all(|(s, e)| s == state && e.contains(error_part)) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not all {state} ({error_part:?}): {h:?}\n{}",
            sw.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn https_health_checks_verify_certificates_names_and_bodies() {
    require_root();
    let topo = served_topology().unwrap();
    let mut sw = Switcher::new(&topo, "").unwrap();
    let dir = sw.dir().join("tls");
    std::fs::create_dir_all(&dir).unwrap();
    certificates(&dir, &topo);
    let _servers = Servers(
        topo.backends()
            .iter()
            .map(|b| {
                Command::new("ip")
                    .args([
                        "netns", "exec", &b.ns, "openssl", "s_server", "-quiet", "-www",
                    ])
                    .args(["-accept", &PORT.to_string()])
                    .arg("-cert")
                    .arg(dir.join("backends.pem"))
                    .arg("-key")
                    .arg(dir.join("backends.key"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    let pool = |c: Colour| {
        topo.backends_of(c)
            .map(|b| format!("\"{}:{PORT}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let base = sw.config_text("");
    let config = |health: &str| {
        base.clone()
            + &format!(
            "[[service]]\nname = \"tls\"\nvip = \"{}:{PORT}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n\
             [service.health]\nkind = \"https\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 1\n{health}",
                bgswitch_tests::VIP,
                pool(Colour::Blue),
                pool(Colour::Green),
            )
    };
    let ca = |name: &str| format!("ca = \"{}\"\n", dir.join(format!("{name}.pem")).display());
    // Verified against the CA that signed them, for their IP addresses;
    // the body checked.
    sw.write_config(&config(&format!(
        "{}expect = \"s_server\"\n",
        ca("backends-ca")
    )))
    .unwrap();
    sw.start().unwrap();
    wait_all(&sw, "up", "");
    let text = sw.cli_ok(&["status", "tls"]).unwrap();
    assert!(text.contains("up"), "{text}");
    // Another CA: every backend down, saying why.
    sw.write_config(&config(&ca("other-ca"))).unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    wait_all(&sw, "down", "TLS");
    // The right CA, a DNS name the certificate carries, then one it does not.
    sw.write_config(&config(&format!(
        "{}sni = \"backends.test\"\n",
        ca("backends-ca")
    )))
    .unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    wait_all(&sw, "up", "");
    sw.write_config(&config(&format!(
        "{}sni = \"other.test\"\n",
        ca("backends-ca")
    )))
    .unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    wait_all(&sw, "down", "TLS");
    // No verification at all: up again, and the log says so loudly.
    sw.write_config(&config("insecure = true\n")).unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    wait_all(&sw, "up", "");
    assert!(sw.log().contains("do NOT verify"), "{}", sw.log_tail());
    // A body without the expected text.
    sw.write_config(&config(&format!(
        "{}expect = \"no such text\"\n",
        ca("backends-ca")
    )))
    .unwrap();
    sw.cli_ok(&["reload"]).unwrap();
    wait_all(&sw, "down", "does not contain");
    // An unreadable CA is a config error naming the key; nothing changes.
    sw.write_config(&config("ca = \"/nonexistent/ca.pem\"\n"))
        .unwrap();
    let out = sw.cli(&["reload"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("service[0] (tls).health.ca")
            && out.stderr.contains("/nonexistent/ca.pem"),
        "{out:?}"
    );
    sw.stop().unwrap();
}
