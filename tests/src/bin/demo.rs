//! `cargo xtask demo`: a blue/green switch of live traffic on a throwaway
//! network-namespace topology — a client, the load-balancer host running
//! `bgswitch daemon`, two blue and two green backends with real HTTP servers
//! behind a bridge, every veth with the kernel's default offloads.
//! Everything is torn down at the end, on Ctrl-C and on failure.

use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Result};
use bgswitch_tests::{
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
    match run() {
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
