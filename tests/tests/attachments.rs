//! Correct wherever it is attached: the test bed as users' machines are —
//! veth pairs and a bridge with the kernel's default offloads, so TCP and
//! UDP arrive with partial checksums and TSO segments larger than the MTU —
//! served by the TC program `auto` chooses there; the XDP path on frames
//! with complete checksums, as a physical NIC delivers them; the two mixed
//! on one daemon; TC through a netlink filter, as kernels before 6.6 get
//! it; and a daemon started with `ip netns exec` (a private mount
//! namespace) whose pins outlive it.

use std::{
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bgswitch_tests::{
    clients::{http_download, http_upload},
    http_get,
    servers::bulk_pattern,
    switcher::{default_services, require_root, Switcher, HTTP_PORT, UDP_PORT},
    topology::{LB_BACKEND_IF, LB_CLIENT_IF},
    udp_request, Topology, TopologyOptions, VIP,
};

/// Several MB each way: thousands of segments, most of them TSO/GSO
/// aggregates on the veths.
const BULK: usize = 8 << 20;

fn web() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, HTTP_PORT)
}

fn echo() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, UDP_PORT)
}

fn colour(body: &str) -> String {
    body.split_whitespace().next().unwrap_or("").to_string()
}

/// A served topology with `opts` and a switcher whose config `edit` may
/// change (the attachment lines).
fn bed(opts: TopologyOptions, edit: impl FnOnce(&str) -> String) -> (Topology, Switcher) {
    require_root();
    let mut topo = Topology::create(opts).expect("topology");
    topo.start_servers(HTTP_PORT, UDP_PORT).expect("servers");
    let sw = Switcher::new(&topo, &default_services(&topo)).expect("switcher");
    let text = edit(&std::fs::read_to_string(sw.config_path()).unwrap());
    sw.write_config(&text).unwrap();
    (topo, sw)
}

/// Downloads and uploads of [`BULK`] bytes through the VIP, each checked
/// byte for byte, all served by `want` (a colour).
fn bulk_both_ways(topo: &Topology, want: &str) {
    bulk_through(topo, web(), want);
}

/// [`bulk_both_ways`] through the service at `vip`.
fn bulk_through(topo: &Topology, vip: SocketAddrV4, want: &str) {
    let cli = topo.client_ns();
    let data = bulk_pattern(BULK);
    for i in 0..2 {
        let d = http_download(cli, vip, BULK).expect("download through the VIP");
        assert!(
            d.backend.starts_with(&want[..1]),
            "download {i} from {}",
            d.backend
        );
        let u = http_upload(cli, vip, &data).expect("upload through the VIP");
        assert!(
            u.backend.starts_with(&want[..1]),
            "upload {i} to {}",
            u.backend
        );
        eprintln!(
            "{BULK} bytes down in {:?}, up in {:?}",
            d.elapsed, u.elapsed
        );
    }
}

/// The data plane's own counter `name`.
fn counter(sw: &Switcher, name: &str) -> u64 {
    sw.status().unwrap()["counters"][name].as_u64().unwrap_or(0)
}

#[test]
fn with_default_offloads_auto_takes_tc_and_bulk_transfers_arrive_whole_both_ways() {
    let (topo, mut sw) = bed(TopologyOptions::default(), str::to_string);
    sw.start().unwrap();
    let st = sw.status().unwrap();
    for i in 0..2 {
        assert_eq!(st["interfaces"][i]["mode"], "tc", "{st}");
        let why = st["interfaces"][i]["reason"].as_str().unwrap();
        assert!(why.starts_with("auto: a virtual device"), "{why}");
    }
    let redirected = counter(&sw, "redirect");
    bulk_both_ways(&topo, "blue");
    sw.cli_ok(&["flip", "web"]).unwrap();
    bulk_both_ways(&topo, "green");
    // UDP both ways, through the flip.
    let r = udp_request(topo.client_ns(), echo(), b"ping").unwrap();
    assert_eq!(colour(&r), "blue", "echo was not flipped: {r}");
    // The program forwarded it all (no MTU refusal of GSO aggregates, no
    // detour through the stack).
    let st = sw.status().unwrap();
    let c = &st["counters"];
    assert_eq!(c["fib_other"].as_u64().unwrap_or(0), 0, "{c}");
    assert!(
        c["redirect"].as_u64().unwrap() > redirected + 1000,
        "the TC program redirected the transfers: {c}"
    );
}

/// Backends on other ports than the VIP's, through TC: the L4 checksum
/// takes the port change as well as the address. `complete`: senders
/// compute their checksums (as a NIC-like path would), so receivers verify
/// what TC wrote; else they stay partial (the stack fills them in late).
fn tc_rewrites_ports(complete: bool) {
    let (web80, echo53) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
    let opts = TopologyOptions {
        like_physical_nics: complete,
        ..TopologyOptions::default()
    };
    let (topo, mut sw) = bed(opts, |t| {
        t.replace("attach = \"auto\"", "attach = \"tc\"")
            .replace(
                &format!("vip = \"{VIP}:{HTTP_PORT}\""),
                &format!("vip = \"{web80}\""),
            )
            .replace(
                &format!("vip = \"{VIP}:{UDP_PORT}\""),
                &format!("vip = \"{echo53}\""),
            )
    });
    assert_ne!(HTTP_PORT, 80);
    assert_ne!(UDP_PORT, 53);
    sw.start().unwrap();
    assert_eq!(sw.status().unwrap()["interfaces"][0]["mode"], "tc");
    bulk_through(&topo, web80, "blue");
    sw.cli_ok(&["flip", "web"]).unwrap();
    bulk_through(&topo, web80, "green");
    let r = udp_request(topo.client_ns(), echo53, b"ping").unwrap();
    assert_eq!(colour(&r), "blue", "{r}");
    assert_eq!(counter(&sw, "fib_other"), 0);
}

#[test]
fn tc_rewrites_ports_of_frames_with_partial_checksums() {
    tc_rewrites_ports(false);
}

#[test]
fn tc_rewrites_ports_of_frames_with_complete_checksums() {
    tc_rewrites_ports(true);
}

#[test]
fn the_xdp_path_serves_frames_with_complete_checksums_as_from_physical_nics() {
    let opts = TopologyOptions {
        like_physical_nics: true,
        ..TopologyOptions::default()
    };
    let (topo, mut sw) = bed(opts, |t| t.replace("attach = \"auto\"", "attach = \"xdp\""));
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["interfaces"][0]["mode"], "native", "{st}");
    assert_eq!(st["interfaces"][1]["mode"], "native", "{st}");
    bulk_both_ways(&topo, "blue");
    sw.cli_ok(&["flip", "web"]).unwrap();
    let r = http_get(topo.client_ns(), web(), "/").unwrap();
    assert_eq!(colour(&r.body), "green");
    assert_eq!(counter(&sw, "fib_other"), 0);
}

#[test]
fn one_daemon_mixes_xdp_and_tc_and_a_flow_enters_on_one_and_leaves_on_the_other() {
    // The client's side stands in for a physical NIC (XDP); the backends'
    // side is veths with default offloads (TC).
    let opts = TopologyOptions {
        like_physical_nics: true,
        ..TopologyOptions::default()
    };
    let (topo, mut sw) = bed(opts, |t| {
        t.replace(
            &format!("interfaces = [\"{LB_CLIENT_IF}\", \"{LB_BACKEND_IF}\"]"),
            &format!(
                "interfaces = [{{ name = \"{LB_CLIENT_IF}\", attach = \"xdp\" }}, {{ name = \"{LB_BACKEND_IF}\", attach = \"tc\" }}]"
            ),
        )
    });
    sw.start().unwrap();
    let st = sw.status().unwrap();
    let mode = |name: &str| {
        st["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .map(|i| i["mode"].as_str().unwrap().to_string())
    };
    assert_eq!(mode(LB_CLIENT_IF).as_deref(), Some("native"), "{st}");
    assert_eq!(mode(LB_BACKEND_IF).as_deref(), Some("tc"), "{st}");
    let text = sw.cli_ok(&["status"]).unwrap();
    assert!(
        text.contains(&format!("{LB_CLIENT_IF}: XDP native: configured")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{LB_BACKEND_IF}: TC (tcx link): configured")),
        "{text}"
    );
    bulk_both_ways(&topo, "blue");
    sw.cli_ok(&["flip", "web"]).unwrap();
    bulk_both_ways(&topo, "green");
    let r = udp_request(topo.client_ns(), echo(), b"ping").unwrap();
    assert_eq!(colour(&r), "blue", "{r}");
}

#[test]
fn tc_through_a_netlink_filter_serves_survives_a_restart_and_detaches() {
    let (topo, mut sw) = bed(TopologyOptions::default(), |t| {
        t.replace("attach = \"auto\"", "attach = \"tc\"")
    });
    let env = [("BGSWITCH_TC_NETLINK", "1")];
    sw.start_with_env(&env).unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["interfaces"][0]["mode"], "tc-netlink", "{st}");
    let cli = topo.client_ns();
    assert_eq!(colour(&http_get(cli, web(), "/").unwrap().body), "blue");
    sw.cli_ok(&["flip", "web"]).unwrap();
    // The filter stays without a daemon, and the next one takes it over.
    sw.kill();
    assert_eq!(colour(&http_get(cli, web(), "/").unwrap().body), "green");
    sw.start_with_env(&env).unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["interfaces"][0]["adopted"], true, "{st}");
    sw.cli_ok(&["rollback", "web"]).unwrap();
    assert_eq!(
        colour(&http_get(cli, web(), "/").unwrap().body),
        "blue",
        "the new daemon's program switches"
    );
    bulk_both_ways(&topo, "blue");
    // Detached: the VIP is nobody's (the filter is gone with it).
    sw.cli_ok(&["detach"]).unwrap();
    sw.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(
        http_get(cli, web(), "/").is_err(),
        "the VIP still answers after detach"
    );
}

#[test]
fn a_daemon_run_with_ip_netns_exec_keeps_its_pins_where_they_outlive_it() {
    require_root();
    let mut topo = Topology::create(TopologyOptions::default()).expect("topology");
    topo.start_servers(HTTP_PORT, UDP_PORT).expect("servers");
    // No bpffs mounted before: the daemon (in the private mount namespace
    // `ip netns exec` gives it) must mount one where it outlives it.
    let mut sw = Switcher::new_unmounted(&topo, &default_services(&topo)).expect("switcher");
    sw.start().unwrap();
    let st = sw.status().unwrap();
    let pins = &st["pins"];
    assert_eq!(pins["outlive_daemon"], true, "{st}");
    assert!(
        pins["note"]
            .as_str()
            .unwrap()
            .starts_with("mounted by this daemon in the mount namespace of"),
        "{pins}"
    );
    assert!(
        is_bpffs(&sw.bpffs()),
        "the bpffs is mounted where the test (outside the private namespace) sees it"
    );
    sw.cli_ok(&["flip", "web"]).unwrap();
    let cli = topo.client_ns().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed, cli) = (stop.clone(), ok.clone(), failed.clone(), cli.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http_get(&cli, web(), "/") {
                    Ok(r) if colour(&r.body) == "green" => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    sw.kill();
    let before = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        ok.load(Ordering::Relaxed) > before,
        "traffic flows while no daemon runs"
    );
    assert!(
        std::fs::read_dir(sw.bpffs().join("bgswitch")).is_ok(),
        "the pins outlived the daemon"
    );
    sw.start().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["interfaces"][0]["adopted"], true, "{st}");
    // A new `ip netns exec` copies the mounts of where it was run from:
    // the restarted daemon sees the bpffs the first one mounted there.
    assert!(
        st["pins"]["note"]
            .as_str()
            .unwrap()
            .starts_with("mounted in the mount namespace of"),
        "the restarted daemon uses the bpffs mounted there: {st}"
    );
    assert_eq!(st["services"][0]["active"], "green");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no failed request\n{}",
        sw.log_tail()
    );
    assert!(ok.load(Ordering::Relaxed) > 20);
    // With no daemon, `bgswitch detach` run the same way (its own private
    // mount namespace) finds the pins where the daemon kept them.
    sw.kill();
    let bin = bgswitch_tests::switcher::bgswitch_bin().unwrap();
    let config = sw.config_path();
    let out = bgswitch_tests::ns_exec(
        topo.lb_ns(),
        &bin.to_string_lossy(),
        &[
            "--socket",
            "/nonexistent.sock",
            "detach",
            "--force",
            "--config",
            &config.to_string_lossy(),
        ],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("removed the pins"), "{text}");
    assert!(
        std::fs::read_dir(sw.bpffs().join("bgswitch")).is_err(),
        "the pins are gone"
    );
    assert!(
        http_get(&cli, web(), "/").is_err(),
        "the VIP still answers after detach"
    );
}

fn is_bpffs(path: &std::path::Path) -> bool {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs into a zeroed struct with a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == 0xcafe_4a11
}

/// Whether `iface` in namespace `ns` carries an XDP program (`ip link`
/// shows it).
fn has_xdp(ns: &str, iface: &str) -> bool {
    let out = bgswitch_tests::ns_exec(ns, "ip", &["link", "show", iface]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("xdp")
}

#[test]
fn what_an_earlier_daemon_left_in_another_mode_goes_once_the_new_mode_holds_the_interface() {
    // A daemon of an older map layout served the veths with XDP (which
    // loses traffic with default offloads); `auto` now takes TC there.
    let (topo, mut sw) = bed(TopologyOptions::default(), |t| {
        t.replace("attach = \"auto\"", "attach = \"xdp\"")
    });
    sw.start().unwrap();
    sw.kill();
    let lb = topo.lb_ns().to_string();
    assert!(has_xdp(&lb, LB_BACKEND_IF), "XDP left attached by its pin");
    let root = sw.bpffs().join("bgswitch");
    let older = root.join("v0");
    std::fs::rename(
        root.join(format!("v{}", bgswitch_common::LAYOUT_VERSION)),
        &older,
    )
    .unwrap();
    let text = std::fs::read_to_string(sw.config_path()).unwrap();
    sw.write_config(&text.replace("attach = \"xdp\"", "attach = \"auto\""))
        .unwrap();
    sw.start().unwrap();
    let st = sw.status().unwrap();
    assert_eq!(st["interfaces"][0]["mode"], "tc", "{st}");
    assert!(
        !has_xdp(&lb, LB_BACKEND_IF),
        "the older layout's XDP link is gone"
    );
    assert!(
        !has_xdp(&lb, LB_CLIENT_IF),
        "the older layout's XDP link is gone"
    );
    assert!(!older.exists(), "the older layout's pins are removed");
    assert!(sw.log().contains("removed the XDP native of map layout v0"));
    bulk_both_ways(&topo, "blue");
    // The same within one layout: XDP configured again, then auto.
    sw.kill();
    let text = std::fs::read_to_string(sw.config_path()).unwrap();
    sw.write_config(&text.replace("attach = \"auto\"", "attach = \"xdp\""))
        .unwrap();
    sw.start().unwrap();
    assert!(has_xdp(&lb, LB_BACKEND_IF));
    sw.kill();
    sw.write_config(&text).unwrap();
    sw.start().unwrap();
    assert!(
        !has_xdp(&lb, LB_BACKEND_IF),
        "the XDP link of this layout is gone"
    );
    assert!(sw
        .log()
        .contains("an earlier daemon served it with XDP native; now TC (tcx link)"));
    bulk_both_ways(&topo, "blue");
}
