//! One data plane, one controller: commands find the daemon through the
//! config, nothing removes a live daemon's data plane behind its back, a
//! second daemon cannot take over the first one's, `undo` steps back
//! through history, input that cannot mean what the user thinks is refused
//! or explained, and `daemon --check` validates a config without touching
//! anything.

use std::{
    net::SocketAddrV4,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bgswitch_tests::{
    http_get,
    switcher::{bgswitch_bin, served_and_started as setup, Switcher, HTTP_PORT},
    VIP,
};

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

fn colour(body: &str) -> &str {
    body.split_whitespace().next().unwrap_or("")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `bgswitch ARGS` as a user would type it: no --socket, no
/// BGSWITCH_SOCKET; the socket comes from the config, if any.
fn bgswitch(args: &[&str]) -> Out {
    let out = Command::new(bgswitch_bin().unwrap())
        .args(args)
        .env_remove("BGSWITCH_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

#[test]
fn detach_finds_the_daemon_through_the_config_and_never_removes_a_live_data_plane() {
    let (topo, mut sw) = setup();
    let config = sw.config_path().display().to_string();
    // The socket is not the default one: the config says where.
    assert_ne!(sw.socket(), Path::new("/run/bgswitch/bgswitch.sock"));
    let st = bgswitch(&["--config", &config, "status", "--json"]);
    assert_eq!(
        st.code, 0,
        "status through the config's socket: {}",
        st.stderr
    );
    // Pointed at a socket nobody listens on, detach finds the data plane
    // held by the daemon and removes nothing, even with --force.
    let pid = sw.pid().unwrap();
    for force in [false, true] {
        let mut args = vec![
            "--socket",
            "/nonexistent.sock",
            "--config",
            &config,
            "detach",
        ];
        if force {
            args.push("--force");
        }
        let out = bgswitch(&args);
        assert_eq!(out.code, 1, "{}{}", out.stdout, out.stderr);
        assert!(
            out.stderr
                .contains(&format!("bgswitch daemon (pid {pid}) holds the data plane")),
            "{}",
            out.stderr
        );
    }
    assert!(
        sw.bpffs().join("bgswitch").exists(),
        "the pins are all there"
    );
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "blue"
    );
    sw.cli_ok(&["flip", "web"]).unwrap();
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "green"
    );
    // Through the config, detach reaches the daemon, which detaches and exits.
    let out = bgswitch(&["--config", &config, "detach"]);
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(sw.wait_exit(Duration::from_secs(10)).unwrap(), Some(0));
    assert!(!sw.bpffs().join("bgswitch").exists(), "pins removed");
    // A config naming no socket that answers: the error says where it looked.
    let out = bgswitch(&["--config", &config, "status"]);
    assert_eq!(out.code, 5, "no daemon answers: the documented exit code");
    assert!(
        out.stderr.contains("no bgswitch daemon answers at")
            && out.stderr.contains(&format!("the `socket` of {config}")),
        "{}",
        out.stderr
    );
}

#[test]
fn a_second_daemon_on_the_same_data_plane_is_refused_naming_the_first() {
    let (topo, sw) = setup();
    // Its own state directory and socket, the same bpffs: before, it adopted
    // the first one's links and both wrote the same maps.
    let other = sw.dir().join("second");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(sw.config_path())
        .unwrap()
        .replace(
            &format!("socket = \"{}\"", sw.socket().display()),
            &format!("socket = \"{}\"", other.join("s.sock").display()),
        )
        .replace(
            &format!("state_dir = \"{}\"", sw.state_dir().display()),
            &format!("state_dir = \"{}\"", other.join("state").display()),
        );
    let config2 = other.join("bgswitch.toml");
    std::fs::write(&config2, &text).unwrap();
    assert!(text.contains("second/s.sock") && text.contains("second/state"));
    let mut second = Command::new("ip")
        .args(["netns", "exec", topo.lb_ns()])
        .arg(bgswitch_bin().unwrap())
        .args(["daemon", "--config"])
        .arg(&config2)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a second daemon that starts is killed and fails the test.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second daemon started on the first one's data plane");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    let pid = sw.pid().unwrap();
    assert!(
        err.contains(&format!("held by another bgswitch daemon (pid {pid})")),
        "{err}"
    );
    assert!(!other.join("s.sock").exists(), "it never served");
    // The first one still serves and switches alone.
    sw.cli_ok(&["flip", "web"]).unwrap();
    assert_eq!(
        colour(&http_get(topo.client_ns(), web(), "/").unwrap().body),
        "green"
    );
    let log = sw.log();
    assert!(!log.contains("adopted"), "{log}");
}

#[test]
fn undo_steps_back_through_history_and_changes_say_what_they_changed() {
    let (topo, sw) = setup();
    let cli = topo.client_ns();
    let out = sw
        .cli_ok(&["shift", "web", "--to", "green", "--percent", "25"])
        .unwrap();
    assert!(
        out.contains("canary 0.00% → 25.00% of new flows to green"),
        "{out}"
    );
    let out = sw
        .cli_ok(&["preview", "web", "add", "0.0.0.0/0", "--force"])
        .unwrap();
    assert!(out.contains("web: preview add 0.0.0.0/0"), "{out}");
    assert_eq!(colour(&http_get(cli, web(), "/").unwrap().body), "green");
    // Two undos: the /0, then the canary share — the second does not put
    // back what the first took away (it did, as a toggle).
    let u1 = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(u1.contains("undo: preview del 0.0.0.0/0"), "{u1}");
    let u2 = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(
        u2.contains("undo: canary 25.00% → 0.00% of new flows to green"),
        "{u2}"
    );
    let st = sw.status().unwrap();
    let svc = &st["services"][0];
    assert_eq!(svc["canary_percent"].as_f64().unwrap_or(0.0), 0.0, "{svc}");
    assert_eq!(svc["preview"].as_array().map_or(0, Vec::len), 0, "{svc}");
    for _ in 0..10 {
        assert_eq!(colour(&http_get(cli, web(), "/").unwrap().body), "blue");
    }
    let out = sw.cli(&["undo", "web"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nothing to undo"), "{}", out.stderr);
    // A flip, then undo: back on blue, the message saying so.
    sw.cli_ok(&["flip", "web"]).unwrap();
    let u = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(u.contains("undo: green → blue"), "{u}");
    // The steps survive a restart (they are part of the journalled state).
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.cli_ok(&["preview", "web", "add", "198.18.0.2/32"])
        .unwrap();
    let mut sw = sw;
    sw.kill();
    sw.start().unwrap();
    let u = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(u.contains("preview del 198.18.0.2/32"), "{u}");
    let u = sw.cli_ok(&["undo", "web"]).unwrap();
    assert!(u.contains("green → blue"), "{u}");
}

#[test]
fn input_that_cannot_mean_what_the_user_thinks_is_refused_or_explained() {
    let (_topo, sw) = setup();
    let gen = |sw: &Switcher| sw.status().unwrap()["services"][0]["generation"].clone();
    let before = gen(&sw);
    let cases: [(&[&str], &str); 4] = [
        (
            &["preview", "web", "add", "2001:db8::/32"],
            "could never match",
        ),
        (&["preview", "web", "add", "0.0.0.0/0"], "--force"),
        (
            &["shift", "web", "--to", "green", "--percent", "10.005"],
            "at most two decimals",
        ),
        (
            &["preview", "web", "add", "198.18.0.0/33"],
            "is not a prefix",
        ),
    ];
    for (args, why) in cases {
        let out = sw.cli(args).unwrap();
        assert_eq!(out.code, 1, "{args:?}: {}", out.stdout);
        assert!(out.stderr.contains(why), "{args:?}: {}", out.stderr);
    }
    assert_eq!(gen(&sw), before, "nothing changed");
    // Host bits are cleared, and the answer says so.
    let out = sw
        .cli_ok(&["preview", "web", "add", "198.18.0.5/24"])
        .unwrap();
    assert!(
        out.contains("preview add 198.18.0.0/24")
            && out.contains("198.18.0.5/24 has host bits set: stored as 198.18.0.0/24"),
        "{out}"
    );
    let out = sw
        .cli_ok(&["shift", "web", "--to", "green", "--percent", "12.5"])
        .unwrap();
    assert!(out.contains("12.50% of new flows to green"), "{out}");
    // Requests are logged in words, not as Rust values.
    let log = sw.log();
    assert!(
        log.contains("preview add 2001:db8::/32 on web: refused: 2001:db8::/32 is an IPv6 prefix"),
        "{log}"
    );
    assert!(
        !log.contains("Preview {") && !log.contains("Some("),
        "{log}"
    );
}

#[test]
fn daemon_check_validates_a_config_and_touches_nothing() {
    let dir = std::env::temp_dir().join(format!("bgswitch-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |text: &str| {
        let p = dir.join("bgswitch.toml");
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let good = format!(
        "interfaces = [\"lo\"]\nsocket = \"{d}/s.sock\"\nstate_dir = \"{d}/state\"\nbpffs = \"{d}/bpf\"\n\n\
         [[service]]\nname = \"web\"\nvip = \"198.19.0.10:80\"\nprotocol = \"tcp\"\n\
         blue = [\"198.18.1.11:8080\"]\ngreen = [\"198.18.1.21:8080\", \"198.18.1.22:8080\"]\n",
        d = dir.display()
    );
    let out = bgswitch(&["daemon", "--check", "--config", &write(&good)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains(": ok"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains("service web: 198.19.0.10:80/tcp, blue 1 backend, green 2 backends"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("interface lo: "), "{}", out.stdout);
    for thing in ["state", "bpf", "s.sock"] {
        assert!(!dir.join(thing).exists(), "--check made {thing}");
    }
    // A bad key, a missing interface: exit 1 and the reason.
    let bad = good.replace("protocol = \"tcp\"", "protocol = \"sctp\"");
    let out = bgswitch(&["daemon", "--check", "--config", &write(&bad)]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("protocol"), "{}", out.stderr);
    let missing = good.replace("[\"lo\"]", "[\"nosuchif0\"]");
    let out = bgswitch(&["daemon", "--check", "--config", &write(&missing)]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("'nosuchif0' does not exist"),
        "{}",
        out.stderr
    );
    assert!(!dir.join("state").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
