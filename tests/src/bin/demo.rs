//! `cargo xtask demo`: a blue/green switch of live traffic on a throwaway
//! network-namespace topology — a client, the load-balancer host running
//! `bgswitch daemon`, two blue and two green backends with real HTTP servers
//! behind a bridge, every veth with the kernel's default offloads.
//! Everything is torn down at the end, on Ctrl-C and on failure.
//!
//! `--fleet`: two load-balancer hosts (each its own test bed) whose daemons
//! share one desired state through a real etcd (Debian's) in a namespace
//! of its own: one flip, both follow.

use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Result};
use bgswitch_tests::{
    fleet::{fleet_table, Etcd},
    http_get,
    switcher::{default_services, served_topology, Switcher, HTTP_PORT},
    KeepAliveClient, VIP,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

fn step(title: &str) -> Result<()> {
    check_interrupt()?;
    println!("\n\x1b[1m== {title}\x1b[0m");
    Ok(())
}

fn requests(ns: &str, n: usize) -> Result<()> {
    let vip = SocketAddrV4::new(VIP, HTTP_PORT);
    for _ in 0..n {
        check_interrupt()?;
        let r = http_get(ns, vip, "/")?;
        println!("  GET http://{vip}/ (new connection) → {}", r.body.trim());
    }
    Ok(())
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let fleet = std::env::args().any(|a| a == "--fleet");
    match if fleet { run_fleet() } else { run() } {
        Ok(()) => println!("\ndemo finished; topology removed."),
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    step("Building the topology: client, load balancer, 2 blue + 2 green backends behind a bridge (network namespaces)")?;
    let topo = served_topology()?;
    println!(
        "  veth pairs with the kernel's default offloads, as containers and VMs have (partial checksums, TSO): `attach = \"auto\"` serves them with TC"
    );
    for b in topo.backends() {
        println!(
            "  {} ({}) serves HTTP on {}:{HTTP_PORT}",
            b.name, b.colour, b.addr
        );
    }
    let mut sw = Switcher::new(&topo, &default_services(&topo))?;
    println!(
        "  VIP {VIP}:{HTTP_PORT} on the load balancer (namespace {})",
        topo.lb_ns()
    );

    step("Starting `bgswitch daemon` on the load balancer")?;
    println!("  config {}:", sw.config_path().display());
    for line in std::fs::read_to_string(sw.config_path())?.lines() {
        println!("    {line}");
    }
    sw.start()?;
    let cli = topo.client_ns().to_string();

    step("Client → VIP: every new connection reaches blue")?;
    requests(&cli, 4)?;
    let mut long = KeepAliveClient::connect(&cli, SocketAddrV4::new(VIP, HTTP_PORT))?;
    println!(
        "  keep-alive connection opened → {}",
        long.get("/")?.body.trim()
    );

    step("bgswitch flip web --reason 'release 2'")?;
    print!(
        "  {}",
        sw.cli_ok(&["flip", "web", "--reason", "release 2"])?
    );
    requests(&cli, 4)?;
    println!(
        "  keep-alive connection opened before the flip → {} (drains on blue)",
        long.get("/")?.body.trim()
    );

    step("bgswitch status")?;
    for line in sw.cli_ok(&["status", "web"])?.lines() {
        println!("  {line}");
    }
    drop(long);

    step("bgswitch rollback web")?;
    print!("  {}", sw.cli_ok(&["rollback", "web"])?);
    requests(&cli, 4)?;

    step("bgswitch status (after rollback)")?;
    std::thread::sleep(Duration::from_millis(100));
    for line in sw.cli_ok(&["status", "web"])?.lines() {
        println!("  {line}");
    }

    step("Tearing down")?;
    sw.stop()?;
    drop(sw);
    drop(topo);
    Ok(())
}

fn run_fleet() -> Result<()> {
    step("Starting etcd (Debian's etcd-server) in a network namespace of its own")?;
    let mut etcd = Etcd::start(1)?;
    let mut hosts = Vec::new();
    for name in ["lb1", "lb2"] {
        step(&format!(
            "Building load-balancer host {name}: client, load balancer, 2 blue + 2 green backends behind a bridge, linked to etcd"
        ))?;
        let topo = served_topology()?;
        let endpoints = etcd.link(topo.lb_ns())?;
        let mut sw = Switcher::new(
            &topo,
            &format!(
                "{}\n{}",
                default_services(&topo),
                fleet_table(&endpoints, "demo", name)
            ),
        )?;
        sw.start()?;
        println!(
            "  {name}: bgswitch daemon running, [fleet] etcd = {endpoints:?}, cluster \"demo\""
        );
        hosts.push((name, topo, sw));
    }
    // Both hosts report (their lease) within a second.
    std::thread::sleep(Duration::from_millis(1500));
    for (name, topo, _) in &hosts {
        println!("\n  clients of {name}:");
        requests(topo.client_ns(), 2)?;
    }

    step("bgswitch status --fleet (on lb2)")?;
    for line in hosts[1].2.cli_ok(&["status", "--fleet"])?.lines() {
        println!("  {line}");
    }

    step("On lb1: bgswitch flip web --reason 'release 2' --fleet-wait 5s")?;
    for line in hosts[0]
        .2
        .cli_ok(&["flip", "web", "--reason", "release 2", "--fleet-wait", "5s"])?
        .lines()
    {
        println!("  {line}");
    }
    for (name, topo, _) in &hosts {
        println!("\n  clients of {name}:");
        requests(topo.client_ns(), 2)?;
    }

    step("bgswitch history web (on lb2: the fleet's journal)")?;
    for line in hosts[1].2.cli_ok(&["history", "web"])?.lines() {
        println!("  {line}");
    }

    step("bgswitch status --fleet (on lb1)")?;
    for line in hosts[0].2.cli_ok(&["status", "--fleet"])?.lines() {
        println!("  {line}");
    }

    step("Tearing down")?;
    for (_, topo, mut sw) in hosts {
        sw.stop()?;
        drop(sw);
        drop(topo);
    }
    etcd.stop();
    Ok(())
}
