//! Wiring bgswitch into monitoring: `/metrics` served by hyper in both
//! exposition formats (content negotiation, HEAD, keep-alive, refusals),
//! the Prometheus text clean for Debian's `promtool check metrics`, and the
//! alert rules of `packaging/` passing `promtool check rules` and their own
//! unit tests (`promtool test rules`).

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use bgswitch_tests::{
    ns_exec,
    switcher::{default_services, require_root, served_topology, Switcher},
};

fn packaging() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("packaging")
}

fn promtool(args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let mut c = Command::new("promtool")
        .args(args)
        .current_dir(packaging())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `cargo xtask setup` installs it)");
    if let Some(input) = stdin {
        c.stdin.take().unwrap().write_all(input).unwrap();
    }
    c.wait_with_output().unwrap()
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "prometheus-rules.yml"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 8 rules found"),
        "{out:?}"
    );
    let out = promtool(&["test", "rules", "prometheus-rules.test.yml"], None);
    assert!(out.status.success(), "{out:?}");
}

const METRICS: &str = "127.0.0.1:9480";

/// `curl ARGS` in the load balancer's namespace: (headers, body, stderr).
fn curl(ns: &str, args: &[&str]) -> (String, String, String) {
    let mut full = vec!["-sS", "--max-time", "5", "-D", "/dev/stderr"];
    full.extend_from_slice(args);
    let out = ns_exec(ns, "curl", &full).expect("curl");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        err.clone(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

#[test]
fn metrics_are_served_in_both_formats_and_the_text_format_is_clean_for_promtool() {
    require_root();
    let topo = served_topology().unwrap();
    let mut sw = Switcher::new(
        &topo,
        &format!(
            "metrics_listen = \"{METRICS}\"\n\n{}",
            default_services(&topo)
        ),
    )
    .unwrap();
    sw.start().unwrap();
    let url = format!("http://{METRICS}/metrics");
    let lb = topo.lb_ns();

    // The Prometheus text format when asked for: clean for promtool.
    let (head, text, _) = curl(lb, &["-H", "Accept: text/plain;version=0.0.4", &url]);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE bgswitch_packets_total counter"),
        "{text}"
    );
    let out = promtool(&["check", "metrics"], Some(text.as_bytes()));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {out:?}"
    );

    // OpenMetrics otherwise (as Prometheus itself asks first).
    let (head, om, _) = curl(lb, &[&url]);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.trim_end().ends_with("# EOF"), "{om}");
    assert!(om.contains("# TYPE bgswitch_packets counter"), "{om}");
    for l in om.lines().filter(|l| l.starts_with("# HELP ")) {
        assert!(l.ends_with('.') && !l.ends_with(".."), "{l}");
    }
    for series in [
        "bgswitch_interface_serving{interface=\"lbc\"} 1",
        "bgswitch_interface_serving{interface=\"lbb\"} 1",
        "bgswitch_automatic_rollback{service=\"web\"} 0",
    ] {
        assert!(om.contains(series), "no {series} in\n{om}");
    }

    // HEAD: the headers, no body.
    let (head, body, _) = curl(lb, &["-I", &url]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: "),
        "{head}"
    );
    assert!(
        body.trim().is_empty() || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );

    // Keep-alive: two requests on one connection.
    let out = ns_exec(
        lb,
        "curl",
        &[
            "-sS",
            "-v",
            "-o",
            "/dev/null",
            &url,
            "-o",
            "/dev/null",
            &url,
        ],
    )
    .unwrap();
    let v = String::from_utf8_lossy(&out.stderr);
    assert!(v.contains("Re-using existing connection"), "{v}");

    // Anything else is refused, saying what is allowed.
    let (head, _, _) = curl(lb, &["-X", "POST", &url]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    let (head, _, _) = curl(lb, &[&format!("http://{METRICS}/")]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    sw.stop().unwrap();
}
