//! The user's own checks (`[[service.check]]`) end to end, with the real
//! daemon on the served test bed: a shell script that requests through
//! each backend of the colour with curl gates a flip (a green still
//! serving the old release is refused, a fixed one flips), runs as the
//! configured user, is killed with its children at its timeout, rolls a
//! watched flip back when it fails mid-watch, and leaves no process behind
//! when the daemon is SIGKILLed during a run.

use std::{
    fs,
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bgswitch_tests::{
    http_get,
    switcher::{require_root, served_topology, service, Switcher, HTTP_PORT},
    Colour, HttpServer, Topology,
};

/// The smoke test of the README: `GET /checkout` through every backend of
/// the colour under test; each must answer 200 with a body naming that
/// colour (the test servers answer "COLOUR NAME"). It writes its uid and
/// niceness where the test reads them.
const SMOKE: &str = r#"#!/bin/sh
# A smoke test of the colour bgswitch is about to expose.
set -u
id -u > "$OUT/uid"
nice > "$OUT/nice"
for b in $(echo "$BGSWITCH_BACKENDS" | tr ',' ' '); do
    body=$(curl -sS --fail --max-time 2 "http://$b/checkout") || {
        echo "$b: request failed"; exit 2; }
    case "$body" in
        "$BGSWITCH_COLOUR "*) echo "$b: ok ($body)" ;;
        *) echo "$b: wrong body for $BGSWITCH_COLOUR: $body"; exit 1 ;;
    esac
done
"#;

/// Hangs: a child in the background and the script itself, each writing
/// its pid first.
const HANG: &str = r#"#!/bin/sh
sleep 300 &
echo $! > "$OUT/child.pid"
echo $$ > "$OUT/check.pid"
echo "started; waiting for ever"
sleep 301
"#;

/// Passes until the test creates `$OUT/fail`.
const FLAKY: &str = r#"#!/bin/sh
if [ -e "$OUT/fail" ]; then
    echo "checkout through $BGSWITCH_VIP: HTTP 500 from $BGSWITCH_COLOUR"
    exit 1
fi
echo ok
"#;

/// A served topology and a daemon whose "web" service (alone) has `checks`
/// (`[[service.check]]` tables); the scripts are written under the
/// switcher's directory, `$OUT` being a directory anyone may write.
struct Bed {
    topo: Topology,
    sw: Switcher,
    out: PathBuf,
}

fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    // The body of a check refers to $OUT: the daemon's clean environment
    // does not carry it, so it is written into the script.
    fs::write(
        &p,
        text.replace("$OUT", &dir.join("out").display().to_string()),
    )
    .unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn bed(checks: &dyn Fn(&Path) -> String) -> Bed {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let pool = |c: Colour| {
        topo.backends_of(c)
            .map(|b| format!("\"{}:{HTTP_PORT}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // The switcher's directory exists once it is made; write a first
    // config, then the one with the checks (their scripts live there).
    let mut sw = Switcher::new(&topo, "").expect("switcher");
    let out = sw.dir().join("out");
    fs::create_dir_all(&out).unwrap();
    fs::set_permissions(&out, fs::Permissions::from_mode(0o1777)).unwrap();
    let services = format!(
        "metrics_listen = \"{METRICS}\"\n\n[[service]]\nname = \"web\"\nvip = \"{}:{HTTP_PORT}\"\nprotocol = \"tcp\"\nblue = [{}]\ngreen = [{}]\n{}",
        bgswitch_tests::VIP,
        pool(Colour::Blue),
        pool(Colour::Green),
        checks(sw.dir())
    );
    sw.write_config(&sw.config_text(&services)).unwrap();
    sw.start().expect("daemon starts");
    Bed { topo, sw, out }
}

const METRICS: &str = "127.0.0.1:9479";

fn alive(pid: i32) -> bool {
    // A zombie is dead; the supervisor reaps what it kills.
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s[s.rfind(')')? + 1..]
                .split_whitespace()
                .next()
                .map(str::to_owned)
        })
        .is_some_and(|state| state != "Z")
}

fn read_pid(p: &Path, within: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(pid) = fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(start.elapsed() < within, "{} not written", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nobody_uid() -> u32 {
    let name = std::ffi::CString::new("nobody").unwrap();
    // SAFETY: getpwnam returns static storage or null; read at once.
    let p = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!p.is_null(), "no user nobody on this host");
    // SAFETY: non-null result.
    unsafe { (*p).pw_uid }
}

#[test]
fn a_smoke_test_refuses_a_flip_to_a_broken_green_and_allows_a_fixed_one() {
    let mut b = bed(&|dir| {
        format!(
            "[[service.check]]\nname = \"smoke\"\ncommand = [\"{}\"]\nwhen = [\"before-flip\"]\ntimeout = \"10s\"\n",
            script(dir, "smoke.sh", SMOKE).display()
        )
    });
    // Green's second backend still serves the old release.
    let g2 = b.topo.backend("g2").clone();
    b.topo.stop_server("g2").unwrap();
    let impostor = HttpServer::start(&g2.ns, (g2.addr, HTTP_PORT), "blue", "g2").unwrap();

    let out =
        b.sw.cli(&["flip", "web", "--reason", "release 43"])
            .unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("refusing to flip web to green")
            && out
                .stderr
                .contains("check 'smoke' against green: failed: exit status 1")
            && out.stderr.contains(&format!(
                "{}:{HTTP_PORT}: wrong body for green: blue g2",
                g2.addr
            ))
            && out.stderr.contains("--force"),
        "{out:?}"
    );
    let st = b.sw.status().unwrap();
    assert_eq!(service(&st, "web")["active"], "blue");
    // New flows still go to blue.
    let r = http_get(b.topo.client_ns(), (bgswitch_tests::VIP, HTTP_PORT), "/").unwrap();
    assert!(r.body.starts_with("blue "), "{}", r.body);
    // It ran as nobody (the default user), not as root.
    let uid: u32 = fs::read_to_string(b.out.join("uid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(uid, nobody_uid());
    // At nice 0, not at the daemon's raised priority (the unit's Nice=).
    let nice = fs::read_to_string(b.out.join("nice")).unwrap();
    assert_eq!(nice.trim(), "0");
    let stat = fs::read_to_string(format!("/proc/{}/stat", b.sw.pid().unwrap())).unwrap();
    let daemon_nice: i32 = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().nth(16))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(daemon_nice, bgswitch_tests::switcher::daemon_nice());
    assert!(
        daemon_nice < 0,
        "the test bed runs the daemon as the unit does"
    );
    // A canary share of green is gated the same way.
    let out =
        b.sw.cli(&["shift", "web", "--to", "green", "--percent", "10"])
            .unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("refusing to shift 10% of web to green"),
        "{out:?}"
    );
    // `bgswitch check` gives the same report and says so in its exit code.
    let out = b.sw.cli(&["check", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("check smoke") && out.stderr.contains("wrong body for green"),
        "{out:?}"
    );

    // Fixed: green's g2 serves the new release.
    drop(impostor);
    b.topo.start_server("g2").unwrap();
    let out = b.sw.cli(&["check", "web", "--colour", "green"]).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("passed"), "{out:?}");
    let msg =
        b.sw.cli_ok(&["flip", "web", "--reason", "release 43"])
            .unwrap();
    assert!(msg.contains("blue → green"), "{msg}");
    let r = http_get(b.topo.client_ns(), (bgswitch_tests::VIP, HTTP_PORT), "/").unwrap();
    assert!(r.body.starts_with("green "), "{}", r.body);

    // The journal keeps both decisions with their checks.
    let h: serde_json::Value =
        serde_json::from_str(&b.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let h = h.as_array().unwrap();
    let refused = h
        .iter()
        .find(|e| e["outcome"].as_str().unwrap_or("").starts_with("refused"))
        .expect("the refusal is journalled");
    assert_eq!(refused["checks"][0]["name"], "smoke");
    assert_eq!(refused["checks"][0]["result"], "failed");
    assert_eq!(refused["checks"][0]["code"], 1);
    let flip = h.last().unwrap();
    assert_eq!(flip["kind"], "flip");
    assert_eq!(flip["checks"][0]["result"], "passed");
    assert_eq!(flip["checks"][0]["phase"], "before-flip");

    // Status shows the last run and the runs by result.
    let st = b.sw.status().unwrap();
    let c = &service(&st, "web")["checks"][0];
    assert_eq!(c["name"], "smoke");
    assert_eq!(c["last"]["result"], "passed");
    assert_eq!(c["runs"]["failed"], 3);
    assert_eq!(c["runs"]["passed"], 2);
    let m = http_get(
        b.topo.lb_ns(),
        METRICS.parse::<SocketAddrV4>().unwrap(),
        "/metrics",
    )
    .unwrap()
    .body;
    for series in [
        "bgswitch_check_runs_total{service=\"web\",check=\"smoke\",result=\"failed\"} 3",
        "bgswitch_check_runs_total{service=\"web\",check=\"smoke\",result=\"passed\"} 2",
        "bgswitch_check_runs_total{service=\"web\",check=\"smoke\",result=\"timeout\"} 0",
        "bgswitch_check_last_passed{service=\"web\",check=\"smoke\"} 1",
        "bgswitch_check_duration_seconds{service=\"web\",check=\"smoke\"} ",
    ] {
        assert!(m.contains(series), "no {series} in\n{m}");
    }

    // --force skips the checks, and the journal says so.
    b.topo.stop_server("b1").unwrap();
    let _impostor = HttpServer::start(
        &b.topo.backend("b1").ns.clone(),
        (b.topo.backend("b1").addr, HTTP_PORT),
        "green",
        "b1",
    )
    .unwrap();
    let out = b.sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1, "{out:?}");
    b.sw.cli_ok(&["flip", "web", "--force"]).unwrap();
    let h: serde_json::Value =
        serde_json::from_str(&b.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["forced"], true);
    assert_eq!(last["checks"][0]["result"], "skipped");
}

#[test]
fn a_hanging_check_is_killed_at_its_timeout_with_its_children() {
    let mut b = bed(&|dir| {
        format!(
            "[[service.check]]\nname = \"hang\"\ncommand = [\"{}\"]\ntimeout = \"1s\"\nuser = \"nobody\"\n",
            script(dir, "hang.sh", HANG).display()
        )
    });
    let start = Instant::now();
    let out = b.sw.cli(&["flip", "web"]).unwrap();
    let took = start.elapsed();
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("check 'hang' against green: timed out after 1.0 s")
            && out.stderr.contains("started; waiting for ever"),
        "{out:?}"
    );
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    for f in ["check.pid", "child.pid"] {
        let pid = read_pid(&b.out.join(f), Duration::from_secs(1));
        assert!(!alive(pid), "{f} ({pid}) survived the timeout");
    }
    assert_eq!(service(&b.sw.status().unwrap(), "web")["active"], "blue");
    b.sw.stop().unwrap();
}

#[test]
fn a_check_failing_mid_watch_rolls_the_flip_back() {
    let mut b = bed(&|dir| {
        format!(
            "[[service.check]]\nname = \"txn\"\ncommand = [\"{}\"]\nwhen = [\"during-watch\"]\ninterval = \"1s\"\ntimeout = \"5s\"\n",
            script(dir, "flaky.sh", FLAKY).display()
        )
    });
    b.sw.cli_ok(&["flip", "web", "--watch", "60s"]).unwrap();
    // It runs (and passes) during the watch.
    b.sw.wait_for(Duration::from_secs(5), "a passing run", |st| {
        service(st, "web")["checks"][0]["runs"]["passed"]
            .as_u64()
            .is_some_and(|n| n >= 2)
    });
    assert_eq!(service(&b.sw.status().unwrap(), "web")["active"], "green");
    fs::write(b.out.join("fail"), "").unwrap();
    let st = b.sw.wait_for(Duration::from_secs(5), "the rollback", |st| {
        service(st, "web")["active"] == "blue"
    });
    let why = service(&st, "web")["rolled_back"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("check 'txn' against green: failed: exit status 1")
            && why.contains("HTTP 500 from green"),
        "{why}"
    );
    let h: serde_json::Value =
        serde_json::from_str(&b.sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let last = h.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "auto_rollback");
    assert_eq!(last["checks"][0]["name"], "txn");
    assert_eq!(last["checks"][0]["phase"], "during-watch");
    let r = http_get(b.topo.client_ns(), (bgswitch_tests::VIP, HTTP_PORT), "/").unwrap();
    assert!(r.body.starts_with("blue "), "{}", r.body);
    b.sw.stop().unwrap();
}

#[test]
fn a_daemon_killed_during_a_check_leaves_no_process_behind() {
    let mut b = bed(&|dir| {
        format!(
            "[[service.check]]\nname = \"hang\"\ncommand = [\"{}\"]\ntimeout = \"60s\"\n",
            script(dir, "hang.sh", HANG).display()
        )
    });
    let sock = b.sw.socket();
    let bin = bgswitch_tests::switcher::bgswitch_bin().unwrap();
    let mut client = std::process::Command::new(bin)
        .args(["--socket"])
        .arg(&sock)
        .args(["check", "web"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let check = read_pid(&b.out.join("check.pid"), Duration::from_secs(10));
    let child = read_pid(&b.out.join("child.pid"), Duration::from_secs(10));
    assert!(alive(check) && alive(child));
    // The loop answers other requests while a check runs.
    let t = Instant::now();
    let st = b.sw.status().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(service(&st, "web")["checks"][0]["running"], true);
    b.sw.cli_ok(&["rollback", "web"]).unwrap_err();
    b.sw.kill();
    let start = Instant::now();
    while (alive(check) || alive(child)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(check) && !alive(child),
        "the check ({check}: {}) or its child ({child}: {}) survived a SIGKILL of the daemon",
        alive(check),
        alive(child)
    );
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn a_check_the_host_cannot_run_is_a_config_error_naming_file_and_key() {
    let b = bed(&|dir| {
        format!(
            "[[service.check]]\nname = \"smoke\"\ncommand = [\"{}\"]\n",
            script(dir, "smoke.sh", SMOKE).display()
        )
    });
    let good = fs::read_to_string(b.sw.config_path()).unwrap();
    let key = "service[0] (web).check[0] (smoke)";
    // Root may execute it, the check's user may not.
    let private = b.sw.dir().join("private.sh");
    fs::write(&private, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o744)).unwrap();
    for (command, user, want) in [
        (
            "/nonexistent/smoke".to_string(),
            "nobody",
            format!("{key}.command: /nonexistent/smoke does not exist"),
        ),
        (
            private.display().to_string(),
            "nobody",
            format!(
                "{key}.command: {} is not executable by user nobody",
                private.display()
            ),
        ),
        (
            "no-such-program-bgswitch".to_string(),
            "nobody",
            format!("{key}.command: 'no-such-program-bgswitch' is not found in"),
        ),
        (
            "/bin/true".to_string(),
            "no-such-user-bgswitch",
            format!("{key}.user: user 'no-such-user-bgswitch' does not exist"),
        ),
    ] {
        let bad = good.replace(
            &format!("command = [\"{}\"]", b.sw.dir().join("smoke.sh").display()),
            &format!("command = [\"{command}\"]\nuser = \"{user}\""),
        );
        assert_ne!(bad, good);
        b.sw.write_config(&bad).unwrap();
        let out = b.sw.cli(&["reload"]).unwrap();
        assert_eq!(out.code, 1, "{out:?}");
        assert!(
            out.stderr
                .contains(&b.sw.config_path().display().to_string())
                && out.stderr.contains(&want)
                && out.stderr.contains("the running state is unchanged"),
            "want {want:?} in {out:?}"
        );
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", b.topo.lb_ns()])
            .arg(bgswitch_tests::switcher::bgswitch_bin().unwrap())
            .args(["daemon", "--check", "--config"])
            .arg(b.sw.config_path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&want),
            "{out:?}"
        );
    }
    // The daemon kept its config: the check still gates.
    b.sw.write_config(&good).unwrap();
    let out = b.sw.cli(&["check", "web"]).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
}
