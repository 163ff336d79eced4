//! What an operator installs beside the binary: shell completions and man
//! pages generated from the clap definitions (not hand-written, so they
//! cannot drift from the commands).

use std::process::Command;

fn bgswitch(args: &[&str]) -> std::process::Output {
    Command::new(bgswitch_tests::switcher::bgswitch_bin().unwrap())
        .args(args)
        .output()
        .unwrap()
}

/// The visible subcommands, as `bgswitch --help` lists them.
fn subcommands() -> Vec<String> {
    let help = String::from_utf8(bgswitch(&["--help"]).stdout).unwrap();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn completions_for_bash_zsh_and_fish_know_every_command_and_flag() {
    let subs = subcommands();
    assert!(
        subs.len() >= 14 && subs.contains(&"flip".into()),
        "{subs:?}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = bgswitch(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        for s in &subs {
            assert!(text.contains(s.as_str()), "{shell}: no {s}");
        }
        for flag in ["fleet-wait", "watch", "confirm-within", "colour"] {
            assert!(text.contains(flag), "{shell}: no --{flag}");
        }
        assert!(
            !text.contains("__check-supervise") && !text.contains("__man"),
            "{shell}: a hidden command is offered"
        );
    }
    let out = bgswitch(&["completions", "tcsh"]);
    assert!(!out.status.success());
    // bash can load it.
    let script = bgswitch(&["completions", "bash"]).stdout;
    let dir = std::env::temp_dir().join(format!("bgswitch-completion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("bgswitch"), &script).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p bgswitch",
            dir.join("bgswitch").display()
        ))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("bgswitch"));
}

#[test]
fn a_man_page_for_bgswitch_and_for_each_command() {
    let dir = std::env::temp_dir().join(format!("bgswitch-man-{}", std::process::id()));
    let out = bgswitch(&["__man", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let mut want = vec!["bgswitch.8".to_string()];
    want.extend(subcommands().iter().map(|s| format!("bgswitch-{s}.8")));
    for page in &want {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH "),
            "{page}: not roff"
        );
        assert!(
            text.contains(".SH NAME") && text.contains(".SH SYNOPSIS"),
            "{page}"
        );
    }
    let flip = std::fs::read_to_string(dir.join("bgswitch-flip.8")).unwrap();
    assert!(
        flip.contains("bgswitch flip") && flip.contains("fleet\\-wait"),
        "{flip}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The documented exit codes, each from a real situation.
#[test]
fn exit_codes_tell_a_pipeline_what_happened() {
    use bgswitch_tests::switcher::{
        default_services, require_root, served_topology, Switcher, HEALTH, HTTP_PORT,
    };
    require_root();
    let mut topo = served_topology().unwrap();
    let mut services = default_services(&topo);
    let at = services
        .find("\n\n[[service]]\nname = \"echo\"")
        .expect("echo service");
    services.insert_str(at, &format!("\n{HEALTH}"));
    let mut sw = Switcher::new(&topo, &services).unwrap();
    sw.start().unwrap();
    let up = |sw: &Switcher| {
        let start = std::time::Instant::now();
        while sw.cli(&["flip", "web", "--to", "blue"]).unwrap().code != 0
            || bgswitch_tests::switcher::service(&sw.status().unwrap(), "web")["colours"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["pool_healthy"] != true)
        {
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    up(&sw);
    // 2: a wrong command line; 1: refused; 5: no daemon there.
    assert_eq!(sw.cli(&["flip"]).unwrap().code, 2);
    assert_eq!(sw.cli(&["flip", "nosuch"]).unwrap().code, 1);
    let out = bgswitch(&["--socket", "/run/bgswitch-test/no-such.sock", "status"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    // 0: a watch that passes, waited for; with --json, one event a line.
    let out = sw.cli(&["flip", "web", "--watch", "2s", "--wait"]).unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("the watch passed"), "{out:?}");
    // (Not a terminal: the progress is plain lines on stderr.)
    assert!(out.stderr.contains("watching green"), "{out:?}");
    let out = sw
        .cli(&["flip", "web", "--watch", "2s", "--wait", "--json"])
        .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert_eq!(events[0]["event"], "changed", "{events:?}");
    assert_eq!(events[0]["change"]["to"], "blue");
    assert!(events
        .iter()
        .any(|e| e["event"] == "watch" && e["left_s"].is_u64()));
    assert_eq!(events.last().unwrap()["event"], "watch_passed");
    sw.cli_ok(&["flip", "web", "--to", "blue"]).unwrap();
    // 3: a watch that rolls back (green's backends go down mid-watch).
    sw.cli_ok(&["flip", "web", "--to", "blue"]).unwrap();
    let sock = sw.socket();
    let waiter = std::thread::spawn(move || {
        Command::new(bgswitch_tests::switcher::bgswitch_bin().unwrap())
            .arg("--socket")
            .arg(&sock)
            .args(["flip", "web", "--watch", "60s", "--wait"])
            .output()
            .unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    for g in ["g1", "g2"] {
        topo.stop_server(g).unwrap();
    }
    let out = waiter.join().unwrap();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ROLLED BACK"),
        "{out:?}"
    );
    // 4: a wait that runs out (a keep-alive connection holds blue).
    for g in ["g1", "g2"] {
        topo.start_server(g).unwrap();
    }
    up(&sw);
    let mut held = bgswitch_tests::KeepAliveClient::connect(
        topo.client_ns(),
        (bgswitch_tests::VIP, HTTP_PORT),
    )
    .unwrap();
    held.get("/").unwrap();
    let out = sw
        .cli(&["flip", "web", "--wait-drained", "--timeout", "1s", "--json"])
        .unwrap();
    assert_eq!(out.code, 4, "{out:?}");
    let events: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "draining" && e["live_flows"].as_u64() >= Some(1)),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["event"], "drain_timed_out");
    drop(held);
    sw.stop().unwrap();
}

/// A tmux session, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn capture(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let screen = self.capture();
            if ok(&screen) {
                return screen;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "{what}: not on the screen:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

#[test]
fn top_shows_a_flip_happen_in_a_terminal() {
    use bgswitch_tests::switcher::{default_services, require_root, served_topology, Switcher};
    require_root();
    let topo = served_topology().unwrap();
    let mut sw = Switcher::new(&topo, &default_services(&topo)).unwrap();
    sw.start().unwrap();
    let bin = bgswitch_tests::switcher::bgswitch_bin().unwrap();
    let tmux = Tmux(format!("bgswitch-top-{}", std::process::id()));
    let status = Command::new("tmux")
        .args(["new-session", "-d", "-s", &tmux.0, "-x", "160", "-y", "30"])
        .arg(format!(
            "{} --socket {} top --interval 200ms",
            bin.display(),
            sw.socket().display()
        ))
        .status()
        .expect("tmux (`cargo xtask setup` installs it)");
    assert!(status.success());
    let screen = tmux.wait_for("web on blue", |s| {
        s.contains("bgswitch top") && s.contains("web") && s.contains("*blue")
    });
    assert!(
        screen.contains("PKT/S") && screen.contains("echo"),
        "{screen}"
    );
    sw.cli_ok(&["flip", "web"]).unwrap();
    tmux.wait_for("web on green", |s| s.contains("*green"));
    sw.cli_ok(&["flip", "web", "--watch", "60s"]).unwrap();
    tmux.wait_for("the watch", |s| {
        s.contains("watch blue") && s.contains("s left")
    });
    Command::new("tmux")
        .args(["send-keys", "-t", &tmux.0, "q"])
        .status()
        .unwrap();
    let start = std::time::Instant::now();
    while tmux.alive() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "top did not quit on q"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    sw.stop().unwrap();
}
