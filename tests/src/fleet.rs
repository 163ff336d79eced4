//! Real etcd members for the fleet's tests and demo: Debian's `etcd` in a
//! network namespace of their own, linked to each load balancer's
//! namespace by a veth pair of its own (`198.19.200.4k+1` on the etcd side,
//! `198.19.200.4k+2` on the load balancer's), so one member is reached
//! from every host, and a host can be cut off alone. Members, data and
//! namespace go on drop.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    http_get,
    netns::{ip, ip_ns},
    topology::TempNetns,
};

/// First client port; member `i` listens on `CLIENT_PORT + 2 i` for clients
/// and on the port after it for its peers (on the namespace's loopback).
const CLIENT_PORT: u16 = 2379;

struct Member {
    name: String,
    child: Option<Child>,
}

/// An etcd cluster in a namespace of its own.
pub struct Etcd {
    ns: TempNetns,
    dir: PathBuf,
    members: Vec<Member>,
    /// The load balancers' namespaces linked to it, with the address of
    /// the etcd side of each link.
    links: Vec<(String, String)>,
    cluster: String,
}

impl Etcd {
    /// Starts `n` members (1 or 3) and waits until they serve.
    pub fn start(n: usize) -> Result<Self> {
        let ns = TempNetns::create()?;
        let dir = PathBuf::from("/run/bgswitch-test").join(format!("{}-etcd", ns.name()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut e = Self {
            cluster: (0..n)
                .map(|i| format!("m{i}=http://127.0.0.1:{}", CLIENT_PORT + 2 * i as u16 + 1))
                .collect::<Vec<_>>()
                .join(","),
            ns,
            dir,
            members: (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    child: None,
                })
                .collect(),
            links: Vec::new(),
        };
        for i in 0..n {
            e.start_member(i, true)?;
        }
        e.wait_healthy(Duration::from_secs(20))?;
        Ok(e)
    }

    fn start_member(&mut self, i: usize, new: bool) -> Result<()> {
        let client = CLIENT_PORT + 2 * i as u16;
        let peer = client + 1;
        let m = &mut self.members[i];
        let log = fs::File::create(self.dir.join(format!("{}.log", m.name)))?;
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name(), "etcd"])
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .args(["--listen-client-urls", &format!("http://0.0.0.0:{client}")])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &self.cluster])
            .args([
                "--initial-cluster-state",
                if new { "new" } else { "existing" },
            ])
            .args(["--initial-cluster-token", self.ns.name()])
            // Quick elections: the tests take a leader away.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's etcd-server; `cargo xtask setup` installs it)")?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until every running member answers `/health` with true.
    pub fn wait_healthy(&self, within: Duration) -> Result<()> {
        let start = Instant::now();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let addr = ([127, 0, 0, 1], CLIENT_PORT + 2 * i as u16);
            loop {
                if let Ok(r) = http_get(self.ns.name(), addr, "/health") {
                    if r.status == 200 && r.body.contains("true") {
                        break;
                    }
                }
                if start.elapsed() > within {
                    bail!(
                        "etcd member {} not healthy within {within:?}:\n{}",
                        m.name,
                        self.log(i)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Links the load balancer's namespace `lb_ns` to etcd; returns the
    /// client URLs of every member as seen from there.
    pub fn link(&mut self, lb_ns: &str) -> Result<Vec<String>> {
        let k = self.links.len();
        let (etcd_if, lb_if) = (format!("etcd{k}"), "etcd0".to_string());
        let ours = format!("198.19.200.{}", 4 * k + 1);
        let theirs = format!("198.19.200.{}", 4 * k + 2);
        ip(&[
            "link",
            "add",
            &etcd_if,
            "netns",
            self.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &lb_if,
            "netns",
            lb_ns,
        ])?;
        ip_ns(
            self.ns.name(),
            &["addr", "add", &format!("{ours}/30"), "dev", &etcd_if],
        )?;
        ip_ns(self.ns.name(), &["link", "set", &etcd_if, "up"])?;
        ip_ns(
            lb_ns,
            &["addr", "add", &format!("{theirs}/30"), "dev", &lb_if],
        )?;
        ip_ns(lb_ns, &["link", "set", &lb_if, "up"])?;
        self.links.push((lb_ns.to_string(), ours.clone()));
        Ok((0..self.members.len())
            .map(|i| format!("http://{ours}:{}", CLIENT_PORT + 2 * i as u16))
            .collect())
    }

    /// Cuts `lb_ns` off from etcd (its end of the link down), or joins it
    /// again.
    pub fn cut(&self, lb_ns: &str, off: bool) -> Result<()> {
        ip_ns(
            lb_ns,
            &["link", "set", "etcd0", if off { "down" } else { "up" }],
        )
    }

    /// Stops every member (SIGKILL: as a crash or a lost quorum looks to
    /// the hosts).
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }

    pub fn stop_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the stopped members again, on their data.
    pub fn restart(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i, false)?;
            }
        }
        self.wait_healthy(Duration::from_secs(20))
    }

    /// The member that leads now (from `/v3/maintenance/status`).
    pub fn leader(&self) -> Result<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let out = crate::netns::ns_exec(
                self.ns.name(),
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "2",
                    "-X",
                    "POST",
                    "-d",
                    "{}",
                    &format!(
                        "http://127.0.0.1:{}/v3/maintenance/status",
                        CLIENT_PORT + 2 * i as u16
                    ),
                ],
            )?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let (me, leader) = (
                v["header"]["member_id"].as_str().unwrap_or(""),
                v["leader"].as_str().unwrap_or("-"),
            );
            if me == leader {
                return Ok(i);
            }
        }
        bail!("no member leads")
    }

    /// A member's log (for failure messages).
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn ns(&self) -> &str {
        self.ns.name()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The `[fleet]` table for host `host` of cluster `cluster`.
pub fn fleet_table(endpoints: &[String], cluster: &str, host: &str) -> String {
    format!(
        "[fleet]\netcd = [{}]\ncluster = \"{cluster}\"\nhost = \"{host}\"\n",
        endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A standby load balancer beside a topology's active one, as a VRRP pair
/// has: a namespace of its own with its own `lbc` (to the client: the
/// client's `c1`) and `lbb` (to the bridge: port `swl2`), the active's
/// addresses and MACs on them (VRRP's virtual MAC), and the client's and
/// the switch's ends down until [`Standby::take_over`].
pub struct Standby {
    ns: TempNetns,
    client_ns: String,
    switch_ns: String,
    lb_ns: String,
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = crate::netns::ns_exec(ns, "cat", &[&format!("/sys/class/net/{dev}/address")])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Standby {
    pub fn create(topo: &crate::Topology) -> Result<Self> {
        use crate::topology::{
            BRIDGE_IF, LB_BACKEND_ADDR, LB_BACKEND_IF, LB_CLIENT_ADDR, LB_CLIENT_IF, PREFIX_LEN,
        };
        let ns = TempNetns::create()?;
        let s = Self {
            client_ns: topo.client_ns().to_string(),
            switch_ns: topo.switch_ns().to_string(),
            lb_ns: topo.lb_ns().to_string(),
            ns,
        };
        let me = s.ns.name();
        ip(&[
            "link",
            "add",
            "c1",
            "netns",
            &s.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            LB_CLIENT_IF,
            "netns",
            me,
        ])?;
        ip(&[
            "link",
            "add",
            "swl2",
            "netns",
            &s.switch_ns,
            "type",
            "veth",
            "peer",
            "name",
            LB_BACKEND_IF,
            "netns",
            me,
        ])?;
        ip_ns(&s.switch_ns, &["link", "set", "swl2", "master", BRIDGE_IF])?;
        for (dev, addr) in [
            (LB_CLIENT_IF, LB_CLIENT_ADDR),
            (LB_BACKEND_IF, LB_BACKEND_ADDR),
        ] {
            let mac = mac_of(&s.lb_ns, dev)?;
            ip_ns(me, &["link", "set", dev, "address", &mac])?;
            ip_ns(
                me,
                &["addr", "add", &format!("{addr}/{PREFIX_LEN}"), "dev", dev],
            )?;
            ip_ns(me, &["link", "set", dev, "up"])?;
        }
        crate::in_netns(me, || -> Result<()> {
            for (k, v) in [
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
                ("net/ipv4/conf/lbc/rp_filter", "0"),
                ("net/ipv4/conf/lbb/rp_filter", "0"),
            ] {
                fs::write(format!("/proc/sys/{k}"), v)?;
            }
            Ok(())
        })??;
        Ok(s)
    }

    /// The standby's namespace (its daemon runs there).
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The active fails and the standby takes its addresses: the active's
    /// links to the client and the switch go down, the standby's come up,
    /// the client's route follows (its link to the standby), and the
    /// standby announces its MAC to the bridge (an ARP request out of its
    /// backend link, as VRRP's gratuitous ARP would).
    pub fn take_over(&self) -> Result<()> {
        use crate::topology::{
            CLIENT_ADDR, CLIENT_IF, LB_CLIENT_ADDR, PREFIX_LEN, SWITCH_UPLINK_IF,
        };
        ip_ns(&self.switch_ns, &["link", "set", SWITCH_UPLINK_IF, "down"])?;
        ip_ns(&self.client_ns, &["link", "set", CLIENT_IF, "down"])?;
        ip_ns(&self.switch_ns, &["link", "set", "swl2", "up"])?;
        ip_ns(
            &self.client_ns,
            &[
                "addr",
                "add",
                &format!("{CLIENT_ADDR}/{PREFIX_LEN}"),
                "dev",
                "c1",
            ],
        )?;
        ip_ns(&self.client_ns, &["link", "set", "c1", "up"])?;
        ip_ns(
            &self.client_ns,
            &[
                "route",
                "replace",
                "default",
                "via",
                &LB_CLIENT_ADDR.to_string(),
                "dev",
                "c1",
            ],
        )?;
        // Any frame out of the standby's backend link teaches the bridge
        // where the (shared) MAC is now.
        let _ = crate::in_netns(self.ns.name(), || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            for host in 10..30u8 {
                let _ = s.send_to(b"x", (std::net::Ipv4Addr::new(198, 18, 1, host), 9));
            }
            Ok::<_, std::io::Error>(())
        });
        Ok(())
    }
}
