//! `bgswitch simulate`: frames from a pcap through the XDP program (or the
//! TC one) with the host's configuration and saved state, without touching
//! live flows or counters.

use std::net::SocketAddrV4;

use bgswitch::simulate::{read_pcap, write_pcap, PcapFrame};
use bgswitch_tests::{
    switcher::{default_services, require_root, served_topology, Switcher, HTTP_PORT},
    VIP,
};
use etherparse::PacketBuilder;

fn tcp(src: SocketAddrV4, dst: SocketAddrV4, syn: bool, ack: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1, 1000);
    let b = match (syn, ack) {
        (true, false) => b.syn(),
        (true, true) => b.syn().ack(2),
        _ => b.ack(2),
    };
    let mut v = Vec::new();
    b.write(&mut v, b"").unwrap();
    v
}

#[test]
fn simulate_reports_colour_and_backend_and_touches_nothing_live() {
    require_root();
    let topo = served_topology().expect("topology with servers");
    let mut sw = Switcher::new(&topo, &default_services(&topo)).unwrap();
    sw.start().unwrap();
    sw.cli_ok(&["flip", "web"]).unwrap();
    let before = sw.status().unwrap();

    let client = SocketAddrV4::new("198.18.0.77".parse().unwrap(), 41000);
    let vip = SocketAddrV4::new(VIP, HTTP_PORT);
    let frames: Vec<PcapFrame> = [
        tcp(client, vip, true, false),
        tcp(client, vip, false, true),
        tcp(
            SocketAddrV4::new("10.9.9.9".parse().unwrap(), 1),
            SocketAddrV4::new("10.9.9.8".parse().unwrap(), 2),
            true,
            false,
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, data)| PcapFrame {
        ts_sec: i as u32,
        ts_frac: 0,
        data,
    })
    .collect();
    let dir = sw.dir().to_path_buf();
    let pcap = dir.join("in.pcap");
    write_pcap(std::fs::File::create(&pcap).unwrap(), &frames, false).unwrap();
    let out_path = dir.join("out.pcap");
    let cfg = sw.config_path().display().to_string();
    let text = sw
        .cli_ok(&[
            "simulate",
            "--config",
            &cfg,
            "--pcap",
            &pcap.display().to_string(),
            "--out",
            &out_path.display().to_string(),
            "--json",
        ])
        .unwrap();
    // Without --config: the running daemon's config (and its state).
    let again = sw
        .cli_ok(&["simulate", "--pcap", &pcap.display().to_string(), "--json"])
        .unwrap();
    assert_eq!(again, text);
    let o: serde_json::Value = serde_json::from_str(&text).unwrap();
    let o = o.as_array().unwrap();
    assert_eq!(o.len(), 3);
    assert_eq!(o[0]["direction"], "to_backend");
    assert_eq!(o[0]["service"], "web");
    assert_eq!(o[0]["colour"], "green", "the saved state says green");
    let backend = o[0]["backend"].as_str().unwrap().to_string();
    assert!(
        backend == "198.18.1.21:8080" || backend == "198.18.1.22:8080",
        "{backend}"
    );
    assert_eq!(o[0]["in"]["tcp_flags"], "SYN");
    assert_eq!(
        o[1]["backend"],
        backend.as_str(),
        "the flow's later packet follows its first"
    );
    assert_eq!(o[2]["direction"], "untouched");
    assert_eq!(o[2]["changed"], false);
    // Rewritten and untouched frames both pass here (no route to a
    // backend): the outcome tells them apart.
    assert_eq!(
        (o[0]["outcome"].as_str(), o[0]["verdict"].as_str()),
        (Some("rewritten"), Some("PASS"))
    );
    assert_eq!(
        (o[2]["outcome"].as_str(), o[2]["verdict"].as_str()),
        (Some("untouched"), Some("PASS"))
    );
    // The reply of that backend, simulated on its own, is not ours (the
    // simulation starts from an empty flow table and keeps nothing).
    let (out_frames, _) = read_pcap(std::fs::File::open(&out_path).unwrap()).unwrap();
    assert_eq!(out_frames.len(), 3);
    assert_eq!(
        &out_frames[0].data[30..34],
        &backend
            .split(':')
            .next()
            .unwrap()
            .parse::<std::net::Ipv4Addr>()
            .unwrap()
            .octets()
    );
    assert_eq!(out_frames[2].data, frames[2].data);
    let text = sw
        .cli_ok(&[
            "simulate",
            "web",
            "--config",
            &cfg,
            "--pcap",
            &pcap.display().to_string(),
        ])
        .unwrap();
    assert!(text.contains("web green → backend"), "{text}");
    assert!(
        text.lines().next().unwrap().contains("rewritten")
            && text.contains("handed to the kernel's stack, which forwards it (PASS)"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "only web's frames: {text}");
    // The same frames through the TC program: the same path, so the same
    // decisions and the same rewritten frames.
    let tc_out = dir.join("out-tc.pcap");
    let text = sw
        .cli_ok(&[
            "simulate",
            "--config",
            &cfg,
            "--pcap",
            &pcap.display().to_string(),
            "--out",
            &tc_out.display().to_string(),
            "--program",
            "tc",
            "--json",
        ])
        .unwrap();
    let t: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = t.as_array().unwrap();
    assert_eq!(t.len(), 3);
    for i in 0..3 {
        for key in [
            "outcome",
            "direction",
            "service",
            "colour",
            "backend",
            "changed",
        ] {
            assert_eq!(t[i][key], o[i][key], "frame {i}: {key}");
        }
        assert_eq!(t[i]["verdict"], "PASS", "no route here: the stack's");
    }
    let (tc_frames, _) = read_pcap(std::fs::File::open(&tc_out).unwrap()).unwrap();
    assert_eq!(
        tc_frames.iter().map(|f| &f.data).collect::<Vec<_>>(),
        out_frames.iter().map(|f| &f.data).collect::<Vec<_>>(),
        "the TC program rewrites the frames as the XDP one does"
    );
    // Nothing live changed.
    let after = sw.status().unwrap();
    for c in 0..2 {
        assert_eq!(
            before["services"][0]["colours"][c]["new_flows"],
            after["services"][0]["colours"][c]["new_flows"]
        );
        assert_eq!(
            before["services"][0]["colours"][c]["recorded_flows"],
            after["services"][0]["colours"][c]["recorded_flows"]
        );
    }
    // Bad input: a clear error, non-zero exit.
    std::fs::write(dir.join("bad.pcap"), b"definitely not a pcap file").unwrap();
    let out = sw
        .cli(&[
            "simulate",
            "--config",
            &cfg,
            "--pcap",
            &dir.join("bad.pcap").display().to_string(),
        ])
        .unwrap();
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("not a pcap file"), "{}", out.stderr);
}
