use bgswitch_common::DEFAULT_MAX_FLOWS;

use super::*;
use crate::paths;

const GOOD: &str = r#"
interfaces = ["eth0", "eth1"]
xdp_mode = "native"
state_dir = "/var/lib/bgswitch"
udp_idle_timeout = "45s"

[[service]]
name = "web"
vip = "198.19.0.10:80"
protocol = "tcp"
blue = ["198.18.1.11:8080", "198.18.1.12:8080"]
green = ["198.18.1.21:8080"]
"#;

fn check_err(text: &str, key: &str, reason_part: &str) {
    let e =
        parse(Path::new("/etc/bgswitch/bgswitch.toml"), text).expect_err("config must be refused");
    assert_eq!(e.file, "/etc/bgswitch/bgswitch.toml");
    assert_eq!(e.key, key, "{e}");
    assert!(e.reason.contains(reason_part), "{e}");
}

fn with_service(s: &str) -> String {
    format!("interfaces = [\"eth0\"]\n[[service]]\n{s}")
}

#[test]
fn good_config_parses_with_defaults() {
    let c = parse(Path::new("x.toml"), GOOD).unwrap();
    assert_eq!(c.interfaces, ["eth0", "eth1"]);
    assert_eq!(c.attach_of("eth0"), AttachSetting::Xdp);
    assert_eq!(c.max_flows, DEFAULT_MAX_FLOWS);
    assert_eq!(c.udp_idle_timeout, Duration::from_secs(45));
    assert_eq!(c.tcp_idle_timeout, Duration::from_secs(3600));
    assert_eq!(c.journal_max_size, 64 << 20);
    assert_eq!(c.socket, PathBuf::from(paths::DEFAULT_SOCKET));
    assert_eq!(c.bpffs, PathBuf::from(paths::DEFAULT_BPFFS));
    assert_eq!(c.services.len(), 1);
    let s = &c.services[0];
    assert_eq!(s.vip, "198.19.0.10:80".parse().unwrap());
    assert_eq!(s.protocol, Protocol::Tcp);
    assert_eq!(s.blue.len(), 2);
    assert_eq!(s.green, vec!["198.18.1.21:8080".parse().unwrap()]);
}

#[test]
fn journal_max_size_takes_binary_units_within_bounds() {
    for (text, n) in [("65536", 65536), ("512KiB", 512 << 10), ("1GiB", 1 << 30)] {
        let c = parse(
            Path::new("x.toml"),
            &format!("interfaces = [\"eth0\"]\njournal_max_size = \"{text}\""),
        )
        .unwrap();
        assert_eq!(c.journal_max_size, n, "{text}");
    }
    let c = parse(
        Path::new("x.toml"),
        "interfaces = [\"eth0\"]\njournal_max_size = 1048576",
    )
    .unwrap();
    assert_eq!(c.journal_max_size, 1 << 20, "bytes as an integer");
    check_err(
        "interfaces = [\"eth0\"]\njournal_max_size = -5",
        "journal_max_size",
        "not a size",
    );
    for (text, why) in [
        ("1KiB", "outside"),
        ("17GiB", "outside"),
        ("64MB", "not a size"),
        ("-1", "not a size"),
        ("MiB", "not a size"),
        ("99999999999999999999GiB", "not a size"),
    ] {
        check_err(
            &format!("interfaces = [\"eth0\"]\njournal_max_size = \"{text}\""),
            "journal_max_size",
            why,
        );
    }
}

#[test]
fn errors_name_file_key_and_reason() {
    check_err("", "interfaces", "at least one");
    check_err(
        "interfaces = [\"eth0\", \"eth0\"]",
        "interfaces[1]",
        "twice",
    );
    check_err(
        "interfaces = [\"eth0\"]\nxdp_mode = \"fast\"",
        "xdp_mode",
        "not one of",
    );
    check_err(
        "interfaces = [\"eth0\"]\nmax_flows = 10",
        "max_flows",
        "outside",
    );
    check_err(
        "interfaces = [\"eth0\"]\nudp_idle_timeout = \"10\"",
        "udp_idle_timeout",
        "no unit",
    );
    check_err(
        "interfaces = [\"eth0\"]\nbogus = 1",
        "line 2 column 1",
        "unknown field",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\n",
        ),
        "service[0] (a).green",
        "empty",
    );
    check_err(
        &with_service("name = \"a\"\nvip = \"1.2.3.4\"\nprotocol = \"tcp\"\n"),
        "service[0] (a).vip",
        "ADDRESS:PORT",
    );
    check_err(
        &with_service("name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"sctp\"\n"),
        "service[0] (a).protocol",
        "not tcp or udp",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:53\"\nprotocol = \"udp\"\nstateless = true\nblue = [\"1.2.3.5:53\"]\ngreen = [\"1.2.3.6:53\"]\n",
        ),
        "service[0] (a).stateless",
        "needs protocol = \"tcp\"",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nstateless = \"yes\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n",
        ),
        "line 6 column 13",
        "expected a boolean",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.5:80\"]\n",
        ),
        "service[0] (a).green[0]",
        "already a backend of a.blue",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.7:80\"]\ngreen = [\"1.2.3.8:80\"]\n",
        ),
        "service[1] (b).vip",
        "already the VIP of service 'a'",
    );
    check_err(
        &with_service("name = \"bad name\"\n"),
        "service[0].name",
        "must be",
    );
}

#[test]
fn a_backend_may_not_be_another_services_vip_nor_an_invalid_interface() {
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.9:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.9:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.7:80\"]\ngreen = [\"1.2.3.8:80\"]\n",
        ),
        "service[0] (a).blue[0]",
        "is the VIP of service 'b'",
    );
    for bad in ["eth0:1", "a b", "..", "a\\tb"] {
        check_err(
            &format!("interfaces = [\"{bad}\"]"),
            "interfaces[0]",
            "not a valid interface name",
        );
    }
    check_err(
        "interfaces = [\"eth0\"]\nname =",
        "line 2 column 7",
        "invalid TOML",
    );
}

#[test]
fn attach_is_global_or_per_interface_on_one_line_and_xdp_mode_is_its_older_name() {
    let c = parse(
        Path::new("t"),
        "attach = \"tc\"\ninterfaces = [\"eth0\", { name = \"veth1\", attach = \"xdp\" }, { name = \"tap0\" }]",
    )
    .unwrap();
    assert_eq!(c.interfaces, ["eth0", "veth1", "tap0"]);
    assert_eq!(c.attach_of("eth0"), AttachSetting::Tc);
    assert_eq!(c.attach_of("veth1"), AttachSetting::Xdp);
    assert_eq!(c.attach_of("tap0"), AttachSetting::Tc, "the global one");
    for (old, new) in [
        ("auto", AttachSetting::Auto),
        ("native", AttachSetting::Xdp),
        ("generic", AttachSetting::XdpGeneric),
    ] {
        let c = parse(
            Path::new("t"),
            &format!("xdp_mode = \"{old}\"\ninterfaces = [\"eth0\"]"),
        )
        .unwrap();
        assert_eq!(c.attach_of("eth0"), new, "xdp_mode = {old}");
    }
    let c = parse(
        Path::new("t"),
        "attach = \"xdp-generic\"\ninterfaces = [\"eth0\"]",
    )
    .unwrap();
    assert_eq!(c.attach_of("eth0"), AttachSetting::XdpGeneric);
    check_err(
        "attach = \"fast\"\ninterfaces = [\"eth0\"]",
        "attach",
        "not one of auto, xdp, xdp-generic, tc",
    );
    check_err(
        "interfaces = [{ name = \"eth0\", attach = \"native\" }]",
        "interfaces[0].attach",
        "not one of",
    );
    check_err(
        "attach = \"tc\"\nxdp_mode = \"native\"\ninterfaces = [\"eth0\"]",
        "xdp_mode",
        "alone (xdp_mode is its older name)",
    );
    check_err(
        "interfaces = [\"eth0\", { name = \"eth0\", attach = \"tc\" }]",
        "interfaces[1]",
        "twice",
    );
}

#[test]
fn same_vip_address_with_other_port_or_protocol_is_fine() {
    let text = with_service(
        "name = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[[service]]\nname = \"b\"\nvip = \"1.2.3.4:80\"\nprotocol = \"udp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n",
    );
    let c = parse(Path::new("x"), &text).unwrap();
    assert_eq!(c.services.len(), 2);
}

#[test]
fn the_packaged_example_config_is_valid() {
    let c = parse(
        Path::new("packaging/bgswitch.toml"),
        include_str!("../../../packaging/bgswitch.toml"),
    )
    .unwrap();
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.attach_of("eth0"), AttachSetting::Auto);
}

#[test]
fn health_tables() {
    let base = "interfaces = [\"eth0\"]\n[[service]]\nname = \"a\"\nvip = \"1.2.3.4:80\"\nprotocol = \"tcp\"\nblue = [\"1.2.3.5:80\"]\ngreen = [\"1.2.3.6:80\"]\n[service.health]\n";
    let c = parse(Path::new("x"), &format!("{base}kind = \"http\"\npath = \"/healthz\"\ninterval = \"250ms\"\ntimeout = \"100ms\"\nfall = 2\n")).unwrap();
    let h = c.services[0].health.clone().unwrap();
    assert_eq!(
        h.kind,
        HealthKind::Http {
            path: "/healthz".into(),
            status: (200, 399),
            host: None,
            expect: None,
            tls: None,
        }
    );
    assert_eq!(
        (h.interval, h.timeout, h.rise, h.fall),
        (Duration::from_millis(250), Duration::from_millis(100), 2, 2)
    );
    let c = parse(Path::new("x"), base).unwrap();
    assert_eq!(c.services[0].health.as_ref().unwrap().kind, HealthKind::Tcp);
    check_err(
        &format!("{base}kind = \"icmp\"\n"),
        "service[0] (a).health.kind",
        "not tcp, http or https",
    );
    check_err(
        &format!("{base}kind = \"http\"\nstatus = \"500-200\"\n"),
        "service[0] (a).health.status",
        "range",
    );
    check_err(
        &format!("{base}interval = \"1s\"\ntimeout = \"2s\"\n"),
        "service[0] (a).health.timeout",
        "longer",
    );
    check_err(
        &format!("{base}rise = 0\n"),
        "service[0] (a).health.rise",
        "outside",
    );
    check_err(
        &format!("{base}path = \"/x\"\n"),
        "service[0] (a).health.kind",
        "apply to kind",
    );
    check_err(
        "interfaces = [\"eth0\"]\nmetrics_listen = \"localhost\"\n",
        "metrics_listen",
        "ADDRESS:PORT",
    );
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert!(parse_duration("1d").is_err());
    assert!(parse_duration("s").is_err());
    assert!(parse_duration("9999h").is_err());
}

#[test]
fn ipv6_services_parse_beside_ipv4_ones() {
    let c = parse(
        Path::new("x.toml"),
        &format!(
            "{GOOD}\n[[service]]\nname = \"web6\"\nvip = \"[2001:db8::10]:443\"\nprotocol = \"tcp\"\n\
             blue = [\"[2001:db8:1::11]:8443\", \"[2001:db8:1::12]:8443\"]\n\
             green = [\"[2001:db8:1::21]:8443\"]\n\
             [service.health]\nkind = \"http\"\n\
             [[service]]\nname = \"dns6\"\nvip = \"[fd00::53]:53\"\nprotocol = \"udp\"\n\
             blue = [\"[fd00:1::53]:53\"]\ngreen = [\"[fd00:2::53]:5353\"]\n"
        ),
    )
    .unwrap();
    assert_eq!(c.services.len(), 3);
    let s = &c.services[1];
    assert_eq!(s.vip, "[2001:db8::10]:443".parse().unwrap());
    assert!(s.vip.is_ipv6() && s.blue.iter().chain(&s.green).all(|b| b.is_ipv6()));
    assert!(!s.stateless && !s.may_run_stateless());
    assert_eq!(c.services[2].protocol, Protocol::Udp);
    // The same port on another family's VIP is another service.
    parse(
        Path::new("x.toml"),
        &with_service(
            "name = \"a\"\nvip = \"198.19.0.10:80\"\nprotocol = \"tcp\"\nblue = [\"198.18.1.1:80\"]\ngreen = [\"198.18.1.2:80\"]\n\
             [[service]]\nname = \"b\"\nvip = \"[2001:db8::10]:80\"\nprotocol = \"tcp\"\nblue = [\"[2001:db8::1]:80\"]\ngreen = [\"[2001:db8::2]:80\"]\n",
        ),
    )
    .unwrap();
}

#[test]
fn ipv6_services_keep_one_family_and_the_flow_table() {
    let v6 = |extra: &str, blue: &str, green: &str| {
        with_service(&format!(
            "name = \"a\"\nvip = \"[2001:db8::10]:443\"\nprotocol = \"tcp\"\n{extra}blue = [{blue}]\ngreen = [{green}]\n"
        ))
    };
    check_err(
        &v6("", "\"[2001:db8:1::11]:8443\"", "\"198.18.1.21:8443\""),
        "service[0] (a).green[0]",
        "198.18.1.21:8443 is IPv4 but the VIP [2001:db8::10]:443 is IPv6: one address family",
    );
    check_err(
        &with_service(
            "name = \"a\"\nvip = \"198.19.0.10:80\"\nprotocol = \"tcp\"\nblue = [\"198.18.1.1:80\", \"[2001:db8::1]:80\"]\ngreen = [\"198.18.1.2:80\"]\n",
        ),
        "service[0] (a).blue[1]",
        "is IPv6 but the VIP 198.19.0.10:80 is IPv4",
    );
    check_err(
        &v6(
            "stateless = true\n",
            "\"[2001:db8:1::11]:8443\"",
            "\"[2001:db8:1::21]:8443\"",
        ),
        "service[0] (a).stateless",
        "IPv6 services use the flow table; stateless periods are IPv4-only",
    );
    // `stateless = false` says nothing the default does not.
    parse(
        Path::new("x.toml"),
        &v6(
            "stateless = false\n",
            "\"[2001:db8:1::11]:8443\"",
            "\"[2001:db8:1::21]:8443\"",
        ),
    )
    .unwrap();
    for (bad, why) in [
        ("\"2001:db8:1::11:8443\"", "ADDRESS:PORT"),
        ("\"[::ffff:198.18.1.1]:80\"", "IPv4-mapped"),
        ("\"[fe80::1]:80\"", "link-local"),
        ("\"[ff02::1]:80\"", "unicast"),
        ("\"[::]:80\"", "unicast"),
    ] {
        check_err(
            &v6("", bad, "\"[2001:db8:1::21]:8443\""),
            "service[0] (a).blue[0]",
            why,
        );
    }
    check_err(
        &v6("", "\"[2001:db8:1::11]:8443\"", "\"[2001:db8:1::11]:8443\""),
        "service[0] (a).green[0]",
        "already a backend of a.blue",
    );
}

const SVC: &str = "name = \"web\"\nvip = \"198.19.0.10:80\"\nprotocol = \"tcp\"\nblue = [\"198.18.1.11:8080\"]\ngreen = [\"198.18.1.21:8080\"]\n";

#[test]
fn checks_parse_with_their_defaults() {
    let text = with_service(&format!(
        "{SVC}[[service.check]]\nname = \"checkout\"\ncommand = [\"/usr/local/bin/smoke\", \"--fast\"]\n\
         [[service.check]]\nname = \"login\"\ncommand = [\"curl\"]\nwhen = [\"during-watch\"]\n\
         timeout = \"5s\"\ninterval = \"2s\"\nuser = \"bgswitch-check\"\n"
    ));
    let c = parse(Path::new("x.toml"), &text).unwrap();
    let checks = &c.services[0].checks;
    assert_eq!(checks.len(), 2);
    let a = &checks[0];
    assert_eq!(a.name, "checkout");
    assert_eq!(a.command, ["/usr/local/bin/smoke", "--fast"]);
    assert!(a.before_flip && a.during_watch);
    assert_eq!(a.timeout, Duration::from_secs(30));
    assert_eq!(a.interval, Duration::from_secs(10));
    assert_eq!(a.user, "nobody");
    let b = &checks[1];
    assert!(!b.before_flip && b.during_watch);
    assert_eq!(
        (b.timeout, b.interval),
        (Duration::from_secs(5), Duration::from_secs(2))
    );
    assert_eq!(b.user, "bgswitch-check");
    assert_eq!(
        c.services[0]
            .checks_in(crate::model::CheckPhase::BeforeFlip)
            .count(),
        1
    );
}

#[test]
fn bad_checks_are_refused_naming_the_key() {
    let k = |j: usize, key: &str| format!("service[0] (web).check[{j}].{key}");
    let one = |body: &str| with_service(&format!("{SVC}[[service.check]]\n{body}"));
    check_err(
        &one("command = [\"/bin/true\"]\n"),
        &k(0, "name"),
        "required",
    );
    check_err(
        &one("name = \"a b\"\ncommand = [\"/bin/true\"]\n"),
        &k(0, "name"),
        "1-64",
    );
    check_err(
        &one("name = \"a\"\n"),
        &k(0, "command"),
        "never through a shell",
    );
    check_err(
        &one("name = \"a\"\ncommand = []\n"),
        &k(0, "command"),
        "required",
    );
    check_err(
        &one("name = \"a\"\ncommand = [\"bin/smoke\"]\n"),
        &k(0, "command"),
        "absolute path or a bare program name",
    );
    check_err(
        &one("name = \"a\"\ncommand = [\"/bin/true\"]\nwhen = [\"after-flip\"]\n"),
        &k(0, "when"),
        "not before-flip or during-watch",
    );
    check_err(
        &one("name = \"a\"\ncommand = [\"/bin/true\"]\nwhen = []\n"),
        &k(0, "when"),
        "names no phase",
    );
    check_err(
        &one("name = \"a\"\ncommand = [\"/bin/true\"]\ntimeout = \"11m\"\n"),
        &k(0, "timeout"),
        "outside",
    );
    check_err(
        &one("name = \"a\"\ncommand = [\"/bin/true\"]\ninterval = \"500ms\"\n"),
        &k(0, "interval"),
        "outside",
    );
    for root in ["root", "0"] {
        check_err(
            &one(&format!(
                "name = \"a\"\ncommand = [\"/bin/true\"]\nuser = \"{root}\"\n"
            )),
            &k(0, "user"),
            "never run as root",
        );
    }
    check_err(
        &one("name = \"a\"\ncommand = [\"/bin/true\"]\nshell = true\n"),
        "line 11 column 1",
        "unknown field",
    );
    check_err(
        &with_service(&format!(
            "{SVC}[[service.check]]\nname = \"a\"\ncommand = [\"/bin/true\"]\n\
             [[service.check]]\nname = \"a\"\ncommand = [\"/bin/false\"]\n"
        )),
        &k(1, "name"),
        "also the name of check[0]",
    );
}

#[test]
fn a_fleet_table_parses_and_bad_ones_name_the_key() {
    let base = "interfaces = [\"eth0\"]\n";
    let c = parse(
        Path::new("x.toml"),
        &format!("{base}[fleet]\netcd = [\"http://10.0.0.5:2379\", \"http://10.0.0.6:2379\"]\ncluster = \"prod\"\nhost = \"lb1\"\n"),
    )
    .unwrap();
    let f = c.fleet.unwrap();
    assert_eq!(f.etcd.len(), 2);
    assert_eq!((f.cluster.as_str(), f.host.as_str()), ("prod", "lb1"));
    assert!(parse(Path::new("x.toml"), base).unwrap().fleet.is_none());
    for (body, key, reason) in [
        ("cluster = \"prod\"\n", "fleet.etcd", "client URLs"),
        ("etcd = [\"10.0.0.5:2379\"]\ncluster = \"prod\"\n", "fleet.etcd[0]", "not a URL"),
        ("etcd = [\"ftp://10.0.0.5:2379\"]\ncluster = \"prod\"\n", "fleet.etcd[0]", "not http://"),
        ("etcd = [\"https://10.0.0.5:2379\"]\ncluster = \"prod\"\n", "fleet.etcd[0]", "give `ca`"),
        (
            "etcd = [\"http://10.0.0.5:2379\"]\ncluster = \"prod\"\nca = \"/etc/ca.pem\"\n",
            "fleet.etcd[0]",
            "use https://",
        ),
        ("etcd = [\"http://10.0.0.5:2379\"]\n", "fleet.cluster", "required"),
        ("etcd = [\"http://10.0.0.5:2379\"]\ncluster = \"a/b\"\n", "fleet.cluster", "1-64"),
        ("etcd = [\"http://10.0.0.5:2379\"]\ncluster = \"p\"\nhost = \"\"\n", "fleet.host", "1-64"),
        (
            "etcd = [\"https://10.0.0.5:2379\"]\ncluster = \"p\"\nca = \"/ca\"\ncert = \"/c\"\n",
            "fleet.cert",
            "together",
        ),
        (
            "etcd = [\"http://10.0.0.5:2379\"]\ncluster = \"p\"\nuser = \"u\"\n",
            "fleet.user",
            "together",
        ),
        (
            "etcd = [\"http://10.0.0.5:2379\"]\ncluster = \"p\"\nuser = \"u\"\npassword_file = \"pw\"\n",
            "fleet.password_file",
            "absolute",
        ),
    ] {
        check_err(&format!("{base}[fleet]\n{body}"), key, reason);
    }
}
