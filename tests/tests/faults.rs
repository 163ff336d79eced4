//! Faults with traffic flowing: interfaces deleted and re-created or flapped,
//! a full or read-only state directory or a lost snapshot, a long journal,
//! foreign maps at the pin paths, pins removed by hand, and the daemon killed
//! in the middle of flips.

use std::{
    ffi::CString,
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bgswitch_tests::{
    http_get, ip,
    switcher::{default_services, require_root, served_topology, Switcher, HTTP_PORT},
    Topology, VIP,
};

fn setup() -> (Topology, Switcher) {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let sw = Switcher::new(&topo, &default_services(&topo)).expect("switcher");
    (topo, sw)
}

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

fn colour(body: &str) -> String {
    body.split_whitespace().next().unwrap_or("").to_string()
}

fn wait_log(sw: &Switcher, needle: &str, within: Duration) {
    let start = Instant::now();
    while !sw.log().contains(needle) {
        if start.elapsed() > within {
            let st = sw.cli(&["status"]);
            panic!(
                "log never said {needle:?}:\n{}\nstatus: {st:?}",
                sw.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn get_ok(topo: &Topology) -> String {
    let r = http_get(topo.client_ns(), web(), "/").expect("request through the VIP");
    colour(&r.body)
}

#[test]
fn a_flapped_or_recreated_interface_is_noticed_and_the_program_attached_again() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    assert_eq!(get_ok(&topo), "blue");
    let lb = topo.lb_ns().to_string();
    let cli = topo.client_ns().to_string();

    ip(&["-n", &lb, "link", "set", "lbb", "down"]).unwrap();
    wait_log(&sw, "lbb: link is down", Duration::from_secs(3));
    ip(&["-n", &lb, "link", "set", "lbb", "up"]).unwrap();
    wait_log(
        &sw,
        "lbb: link is up again; TC (tcx link) still attached",
        Duration::from_secs(3),
    );
    let start = Instant::now();
    while let Err(e) = http_get(&cli, web(), "/") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "traffic did not resume after the flap: {e:#}\n{}",
            sw.cli(&["status"]).map(|o| o.stdout).unwrap_or_default()
        );
    }
    eprintln!(
        "traffic resumed {:?} after the link came up",
        start.elapsed()
    );

    let old = sw.status().unwrap()["interfaces"].clone();
    // Delete the client-facing veth (both ends) and build it again.
    ip(&["-n", &lb, "link", "del", "lbc"]).unwrap();
    wait_log(
        &sw,
        "disappeared; the program will be attached again",
        Duration::from_secs(3),
    );
    ip(&[
        "-n", &lb, "link", "add", "lbc", "type", "veth", "peer", "name", "c0", "netns", &cli,
    ])
    .unwrap();
    ip(&["-n", &lb, "addr", "add", "198.18.0.1/24", "dev", "lbc"]).unwrap();
    ip(&["-n", &cli, "addr", "add", "198.18.0.2/24", "dev", "c0"]).unwrap();
    ip(&["-n", &lb, "link", "set", "lbc", "up"]).unwrap();
    ip(&["-n", &cli, "link", "set", "c0", "up"]).unwrap();
    ip(&[
        "-n",
        &cli,
        "route",
        "replace",
        "default",
        "via",
        "198.18.0.1",
    ])
    .unwrap();
    // The rebuilt veth keeps the kernel's default offloads, as the test
    // bed's did.
    wait_log(&sw, "lbc is back", Duration::from_secs(3));
    let start = Instant::now();
    loop {
        if let Ok(r) = http_get(&cli, web(), "/") {
            assert_eq!(colour(&r.body), "blue");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "no traffic after re-attach:\n{}",
            sw.log_tail()
        );
    }
    let new = sw.status().unwrap()["interfaces"].clone();
    let idx = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == "lbc")
            .map(|i| i["ifindex"].as_u64().unwrap())
    };
    assert_ne!(idx(&old), idx(&new), "status shows the new interface");
    assert!(idx(&new).is_some());
}

/// Unmounts a tmpfs lazily when dropped.
struct Mount(CString);
impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: valid path.
        unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
    }
}

fn mount_tmpfs(path: &std::path::Path, opts: &str) -> Mount {
    std::fs::create_dir_all(path).unwrap();
    let p = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let t = CString::new("tmpfs").unwrap();
    let o = CString::new(opts).unwrap();
    // SAFETY: valid C strings.
    let rc = unsafe { libc::mount(t.as_ptr(), p.as_ptr(), t.as_ptr(), 0, o.as_ptr().cast()) };
    assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    Mount(p)
}

/// Every line of the journal parses (a cut-off line would not), and their count.
fn whole_lines(journal: &std::path::Path) -> usize {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "journal ends mid-line"
    );
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("padding")).collect();
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l).expect("a whole journal line");
    }
    lines.len()
}

/// A journal longer than `journal_max_size` is moved aside once the
/// snapshot has all of it (the daemon does it: disk use stays bounded);
/// `history` reads both parts, and a restart after a kill replays what came
/// after the move.
#[test]
fn a_long_journal_is_rotated_once_snapshotted_and_history_and_restarts_keep_every_change() {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let services = format!(
        "journal_max_size = \"16KiB\"\n\n{}",
        default_services(&topo)
    );
    let mut sw = Switcher::new(&topo, &services).expect("switcher");
    sw.start().unwrap();
    let journal = sw.state_dir().join("journal.jsonl");
    let rotated = sw.state_dir().join("journal.1.jsonl");
    let mut flips = 0;
    while std::fs::metadata(&journal).map_or(0, |m| m.len()) <= 16 << 10 {
        sw.cli_ok(&["flip", "web"]).unwrap();
        flips += 1;
        assert!(flips < 200, "the journal does not grow");
    }
    // Moved once changes paused for the snapshot (1 s) and a rotation
    // check came (every second).
    wait_log(&sw, "moved to journal.1.jsonl", Duration::from_secs(5));
    assert!(rotated.exists());
    let moved = whole_lines(&rotated);
    assert_eq!(moved, flips, "every flip's line moved");
    assert_eq!(whole_lines(&journal), 0, "a fresh journal");
    // Two more flips after the move, then a kill before any snapshot.
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    flips += 2;
    sw.kill();
    sw.start().unwrap();
    let want = if flips % 2 == 1 { "green" } else { "blue" };
    assert_eq!(sw.status().unwrap()["services"][0]["active"], want);
    assert_eq!(get_ok(&topo), want);
    let h: serde_json::Value =
        serde_json::from_str(&sw.cli_ok(&["history", "web", "--json"]).unwrap()).unwrap();
    let seqs: Vec<u64> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=flips as u64).collect::<Vec<_>>());
    sw.stop().unwrap();
}

#[test]
fn a_full_or_unwritable_state_directory_refuses_changes_and_changes_nothing() {
    let (topo, mut sw) = setup();
    let state = sw.state_dir();
    let m = mount_tmpfs(&state, "size=64k");
    sw.start().unwrap();
    let journal = state.join("journal.jsonl");
    sw.cli_ok(&["flip", "web", "--reason", "with room"])
        .unwrap();
    assert_eq!(get_ok(&topo), "green");
    // Pad the journal (readers skip a line that is no entry) so that the next
    // line crosses into a page the full file system cannot give: its write
    // is cut short, and the journal must still end with a whole line.
    let len = std::fs::metadata(&journal).unwrap().len() as usize;
    let pad = 4096 - (len % 4096) - 200;
    let mut padding = format!("padding {}", "x".repeat(pad - 9)).into_bytes();
    padding.push(b'\n');
    std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &padding))
        .unwrap();
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let before = std::fs::read(&journal).unwrap();
    let out = sw.cli(&["flip", "web", "--reason", "disk full"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("No space left") && out.stderr.contains("nothing changed"),
        "{}",
        out.stderr
    );
    assert_eq!(
        std::fs::read(&journal).unwrap(),
        before,
        "the cut-off line is removed again"
    );
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "green");
    assert_eq!(get_ok(&topo), "green", "data plane unchanged");
    std::fs::remove_file(&filler).unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    assert_eq!(get_ok(&topo), "blue");
    assert_eq!(whole_lines(&journal), 2);

    // Unwritable journal: a directory is in its way (root ignores permission
    // bits).
    let aside = state.join("journal.aside");
    std::fs::rename(&journal, &aside).unwrap();
    std::fs::create_dir(&journal).unwrap();
    let out = sw.cli(&["flip", "web"]).unwrap();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("nothing changed"), "{}", out.stderr);
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "blue");
    assert_eq!(get_ok(&topo), "blue");
    std::fs::remove_dir(&journal).unwrap();
    std::fs::rename(&aside, &journal).unwrap();

    // An unwritable snapshot changes nothing a client sees: changes are
    // journalled, acknowledged and kept across a crash.
    let tmp = state.join("state.json.tmp");
    std::fs::create_dir(&tmp).unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    assert_eq!(get_ok(&topo), "green");
    wait_log(&sw, "snapshot: ", Duration::from_secs(15));
    assert!(
        std::fs::read_to_string(state.join("state.json"))
            .unwrap()
            .contains("\"active\": \"blue\""),
        "the snapshot could not be written"
    );
    sw.kill();
    // (A daemon starts only with a snapshot it could write.)
    std::fs::remove_dir(&tmp).unwrap();
    sw.start().unwrap();
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "green");
    assert_eq!(get_ok(&topo), "green");
    assert!(sw.log().contains("replayed from"), "{}", sw.log_tail());
    sw.cli_ok(&["rollback", "web"]).unwrap();
    assert_eq!(get_ok(&topo), "blue");
    assert_eq!(whole_lines(&journal), 4);
    // Changes paused: the periodic snapshot (written off the loop) follows
    // within about a second and includes them.
    let snapshot = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(state.join("state.json")).unwrap()).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while snapshot()["journal_seq"] != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "no snapshot of the rollback: {}",
            snapshot()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(snapshot()["services"]["web"]["active"], "blue");
    // SIGTERM right after a change (well inside the second the snapshot
    // waits for): the daemon writes the snapshot on its way out.
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.stop().unwrap();
    let saved = snapshot();
    assert_eq!(saved["services"]["web"]["active"], "green", "{saved}");
    assert_eq!(saved["journal_seq"], 5);

    // The snapshot lost beside its journal: no start afresh on blue (which
    // would flip every service back); the data plane keeps forwarding.
    let backup = std::fs::read(state.join("state.json")).unwrap();
    std::fs::remove_file(state.join("state.json")).unwrap();
    let (code, err) = sw.start_expect_failure().unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("state.json is missing") && err.contains("refusing to guess"),
        "{err}"
    );
    assert_eq!(get_ok(&topo), "green", "traffic untouched");
    std::fs::write(state.join("state.json"), backup).unwrap();
    sw.start().unwrap();
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "green");
    assert_eq!(get_ok(&topo), "green");
    drop(sw);
    drop(m);
}

/// The whole state directory lost (or `state_dir` changed) while the
/// pinned data plane forwards: the next daemon keeps each service's colour,
/// canary share and preview prefixes as the data plane has them, instead of
/// starting every service on blue.
#[test]
fn a_lost_state_directory_keeps_the_colours_the_running_data_plane_has() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.cli_ok(&["shift", "echo", "--to", "green", "--percent", "10"])
        .unwrap();
    assert_eq!(get_ok(&topo), "green");
    // The client previews the idle colour (blue).
    sw.cli_ok(&["preview", "web", "add", "198.18.0.2/32"])
        .unwrap();
    assert_eq!(get_ok(&topo), "blue");
    sw.stop().unwrap();
    std::fs::remove_dir_all(sw.state_dir()).unwrap();
    sw.start().unwrap();
    let st = sw.status().unwrap();
    let svc = |name: &str| {
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(svc("web")["active"], "green", "{st:#}");
    assert_eq!(svc("web")["preview"], serde_json::json!(["198.18.0.2/32"]));
    assert_eq!(svc("echo")["active"], "blue");
    assert_eq!(svc("echo")["canary_percent"], 10.0, "{st:#}");
    assert_eq!(get_ok(&topo), "blue", "the preview kept");
    assert!(
        sw.log().contains(
            "service web: not in the state, but the running data plane serves it on green and preview prefixes [198.18.0.2/32]: kept"
        ),
        "{}",
        sw.log_tail()
    );
    sw.cli_ok(&["preview", "web", "del", "198.18.0.2/32"])
        .unwrap();
    assert_eq!(get_ok(&topo), "green", "traffic kept its colour");
    // The adopted state is the daemon's own: it changes and persists.
    sw.cli_ok(&["flip", "web"]).unwrap();
    assert_eq!(get_ok(&topo), "blue");
    sw.kill();
    let measured = |sw: &Switcher| sw.log().matches("(measured earlier in this boot)").count();
    let before = measured(&sw);
    sw.start().unwrap();
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "blue");
    assert_eq!(get_ok(&topo), "blue");
    // The tick rate the start after the loss measured (and kept in the new
    // state directory) is taken, not measured again.
    assert_eq!(measured(&sw), before + 1, "{}", sw.log_tail());
}

/// Creates a small array map and pins it at `path` (raw bpf(2)).
fn pin_foreign_map(path: &std::path::Path) {
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4; // key size
    attr[2] = 4; // value size
    attr[3] = 1; // max entries
                 // SAFETY: BPF_MAP_CREATE with a zeroed attr.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_mut_ptr(), 128) };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 16];
    pin[0] = c.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN with a valid path and fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_mut_ptr(), 128) };
    assert_eq!(rc, 0, "pin: {}", std::io::Error::last_os_error());
    // SAFETY: closing the fd we created.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn foreign_or_removed_pins_are_refused_or_rebuilt_and_the_colour_kept() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.kill();
    let flows = sw.bpffs().join(format!(
        "bgswitch/v{}/maps/FLOWS",
        bgswitch_common::LAYOUT_VERSION
    ));
    std::fs::remove_file(&flows).unwrap();
    pin_foreign_map(&flows);
    let (code, err) = sw.start_expect_failure().unwrap();
    assert_ne!(code, 0);
    assert!(
        err.contains("does not match this bgswitch") && err.contains("bgswitch detach"),
        "{err}"
    );
    // The old program still switches, on the maps it holds.
    assert_eq!(get_ok(&topo), "green");
    // Remove the foreign pin by hand: the next daemon builds the map afresh.
    std::fs::remove_file(&flows).unwrap();
    sw.start().unwrap();
    assert_eq!(sw.status().unwrap()["services"][0]["active"], "green");
    assert_eq!(get_ok(&topo), "green");
    // Every pin removed by hand while running: a restart rebuilds, colour kept.
    std::fs::remove_dir_all(sw.bpffs().join("bgswitch")).unwrap();
    sw.kill();
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["active"], "green");
    assert_eq!(st["interfaces"][0]["adopted"], false);
    assert_eq!(get_ok(&topo), "green");
}

#[test]
fn a_daemon_of_a_new_map_layout_takes_over_the_links_of_an_older_one() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    sw.kill();
    // Make the pins look like an older layout's: same links, older directory.
    let root = sw.bpffs().join("bgswitch");
    let current = root.join(format!("v{}", bgswitch_common::LAYOUT_VERSION));
    let older = root.join("v0");
    std::fs::rename(&current, &older).unwrap();
    // The old program keeps forwarding while no daemon runs.
    assert_eq!(get_ok(&topo), "green");
    sw.start().unwrap();
    wait_log(
        &sw,
        "took over the link of map layout v0",
        Duration::from_secs(5),
    );
    assert!(!older.exists(), "the older layout's pins are removed");
    let st = sw.status().unwrap();
    assert_eq!(st["services"][0]["active"], "green");
    assert_eq!(st["interfaces"][0]["adopted"], true, "{st}");
    assert_eq!(get_ok(&topo), "green");
    sw.cli_ok(&["rollback", "web"]).unwrap();
    assert_eq!(get_ok(&topo), "blue", "the new program switches");
}

#[test]
fn sigkill_in_the_middle_of_flips_loses_nothing_and_each_flip_happens_whole_or_not() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, ok, failed, cli) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            topo.client_ns().to_string(),
        );
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http_get(&cli, web(), "/") {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request failed: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    let bin = bgswitch_tests::switcher::bgswitch_bin().unwrap();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut outcomes = Vec::new();
    for round in 0..10 {
        let before = sw.status().unwrap()["services"][0]["active"]
            .as_str()
            .unwrap()
            .to_string();
        let mut flip = std::process::Command::new(&bin)
            .arg("--socket")
            .arg(sw.socket())
            .args(["flip", "web", "--reason", &format!("round {round}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_micros(seed % 15_000));
        sw.kill();
        let _ = flip.wait();
        sw.start().unwrap();
        let st = sw.status().unwrap();
        let after = st["services"][0]["active"].as_str().unwrap().to_string();
        // Whole or not at all: the saved colour is the one traffic follows.
        for _ in 0..3 {
            assert_eq!(
                get_ok(&topo),
                after,
                "round {round}: data plane and saved state disagree"
            );
        }
        outcomes.push(if after == before {
            "not applied"
        } else {
            "applied"
        });
    }
    // The decisive window, made wide on purpose: the journal has the flip,
    // the data plane has not moved yet. The next daemon must finish it.
    let st = sw.status().unwrap();
    let before = st["services"][0]["active"].as_str().unwrap().to_string();
    let generation = st["services"][0]["generation"].as_u64().unwrap();
    sw.kill();
    sw.start_with_env(&[("BGSWITCH_FAULT_DELAY_COMMIT_MS", "1500")])
        .unwrap();
    let mut flip = std::process::Command::new(&bin)
        .arg("--socket")
        .arg(sw.socket())
        .args(["flip", "web"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal = sw.state_dir().join("journal.jsonl");
    let want = format!("\"generation\":{},", generation + 1);
    let t = Instant::now();
    while !std::fs::read_to_string(&journal).unwrap().contains(&want) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the journal never recorded the flip"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(get_ok(&topo), before, "the data plane has not moved yet");
    sw.kill();
    let _ = flip.wait();
    sw.start().unwrap();
    let after = sw.status().unwrap()["services"][0]["active"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(
        after, before,
        "the saved flip is completed by the next daemon"
    );
    for _ in 0..3 {
        assert_eq!(get_ok(&topo), after);
    }
    outcomes.push("killed between journal and data plane: completed at restart");

    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    eprintln!(
        "kill outcomes: {outcomes:?}; {} requests ok",
        ok.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request failed\n{}",
        sw.log_tail()
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
}

#[test]
fn a_dead_backend_fails_only_its_own_connections_and_new_flows_avoid_it() {
    require_root();
    let mut topo = served_topology().expect("topology with servers");
    let services = default_services(&topo).replacen(
        "\n\n[[service]]\nname = \"echo\"",
        "\n[service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\nrise = 1\nfall = 2\n\n[[service]]\nname = \"echo\"",
        1,
    );
    let mut sw = Switcher::new(&topo, &services).unwrap();
    sw.start().unwrap();
    let cli = topo.client_ns().to_string();
    // Keep-alive connections spread over both blue backends.
    let mut conns = Vec::new();
    for _ in 0..12 {
        let mut c = bgswitch_tests::KeepAliveClient::connect(&cli, web()).unwrap();
        let who = c.get("/").unwrap().backend;
        conns.push((c, who));
    }
    assert!(conns.iter().any(|(_, w)| w == "b1") && conns.iter().any(|(_, w)| w == "b2"));
    topo.stop_server("b1").unwrap();
    let start = Instant::now();
    loop {
        let st = sw.status().unwrap();
        if st["services"][0]["colours"][0]["backends"][0]["health"] == "down" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "b1 never marked down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (c, who) in &mut conns {
        let r = c.get("/");
        if who == "b1" {
            assert!(r.is_err(), "b1's connections fail, as they would anywhere");
        } else {
            assert_eq!(
                r.unwrap().backend,
                "b2",
                "b2's connections are not disturbed"
            );
        }
    }
    for _ in 0..20 {
        let r = http_get(&cli, web(), "/").unwrap();
        assert_eq!(r.backend, "b2", "new flows avoid the dead backend");
    }
    assert!(
        sw.log().contains("198.18.1.11:8080 is DOWN"),
        "{}",
        sw.log_tail()
    );
}

#[test]
fn a_route_through_an_interface_bgswitch_is_not_on_is_reported_in_the_log() {
    let (topo, mut sw) = setup();
    sw.start().unwrap();
    get_ok(&topo);
    // Host routes to the blue backends through an interface the daemon is
    // not attached to: the data plane rewrites, cannot forward, and says so
    // (once a second per CPU), through the daemon's log.
    let lb = topo.lb_ns().to_string();
    let invalidations =
        |sw: &Switcher| sw.status().unwrap()["counters"]["cache_invalidations"].as_u64();
    let before = invalidations(&sw).expect("status counts cache invalidations");
    ip(&[
        "-n",
        &lb,
        "link",
        "add",
        "bgsdummy0",
        "type",
        "veth",
        "peer",
        "name",
        "bgsdummy1",
    ])
    .unwrap();
    for dev in ["bgsdummy0", "bgsdummy1"] {
        ip(&["-n", &lb, "link", "set", dev, "up"]).unwrap();
    }
    let blue: Vec<String> = topo
        .backends_of(bgswitch_tests::Colour::Blue)
        .map(|b| b.addr.to_string())
        .collect();
    for b in &blue {
        ip(&[
            "-n",
            &lb,
            "route",
            "add",
            &format!("{b}/32"),
            "dev",
            "bgsdummy0",
        ])
        .unwrap();
        // With a neighbour entry (without one the stack would resolve it).
        ip(&[
            "-n",
            &lb,
            "neigh",
            "replace",
            b,
            "lladdr",
            "02:00:00:00:0e:01",
            "dev",
            "bgsdummy0",
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    let cli = topo.client_ns().to_string();
    // Fails: the frames leave through the dummy interface.
    let _ = http_get(&cli, web(), "/");
    wait_log(
        &sw,
        "data plane: the route towards 198.18.1.1",
        Duration::from_secs(10),
    );
    let line = sw
        .log()
        .lines()
        .find(|l| l.contains("data plane: the route towards"))
        .map(str::to_string)
        .unwrap();
    assert!(
        line.contains("which this program cannot send to")
            && line.contains("(bgsdummy0)")
            && line.contains("WARN"),
        "{line}"
    );
    println!("the daemon's log: {line}");
    let after = invalidations(&sw).unwrap();
    assert!(
        after > before,
        "the new link and routes invalidated the kept next hops: {before} -> {after}"
    );
    // Routes back: traffic flows again.
    for b in &blue {
        ip(&[
            "-n",
            &lb,
            "route",
            "del",
            &format!("{b}/32"),
            "dev",
            "bgsdummy0",
        ])
        .unwrap();
    }
    get_ok(&topo);
}
