//! Hostile input on the control socket of the real daemon: random bytes,
//! mutated and unknown requests, oversized and truncated lines, stalled,
//! slow and non-reading clients, hundreds of clients at once, and users
//! outside the socket's group. Every one is refused or answered (never
//! hangs), the daemon keeps answering others promptly, no service changes
//! (colour, generation, last change), and refusals are logged.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    process::Command,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use bgswitch_tests::rng::Rng;
use bgswitch_tests::{
    switcher::{bgswitch_bin, default_services, require_root, Switcher, HTTP_PORT, UDP_PORT},
    Topology, TopologyOptions,
};
use serde_json::Value;

/// The daemon closes a connection without a complete request after this.
const DAEMON_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the daemon serves at once; more are refused.
const DAEMON_MAX_CLIENTS: usize = 64;
/// How fast `status` must answer while others misbehave.
const PROMPT: Duration = Duration::from_secs(2);
/// What the CLI says when the daemon closed the connection (after a
/// refusal) before the CLI could write its request.
const REASON_LOST: [&str; 3] = [
    "Broken pipe",
    "Connection reset",
    "closed the connection without answering",
];

/// A topology with servers and a running daemon; `top` goes before the
/// `[[service]]` tables (extra top-level keys).
fn setup(top: &str) -> (Topology, Switcher) {
    setup_edited(top, str::to_string)
}

/// `setup`, with the whole config text passed through `edit` first (for
/// keys the switcher's config already sets).
fn setup_edited(top: &str, edit: impl FnOnce(&str) -> String) -> (Topology, Switcher) {
    require_root();
    let mut topo = Topology::create(TopologyOptions::default()).expect("topology");
    topo.start_servers(HTTP_PORT, UDP_PORT).expect("servers");
    let services = format!("{top}\n{}", default_services(&topo));
    let mut sw = Switcher::new(&topo, &services).expect("switcher");
    sw.write_config(&edit(&sw.config_text(&services)))
        .expect("write the config");
    sw.start().expect("daemon starts");
    (topo, sw)
}

/// What must not change: per service (name, active colour, generation,
/// last change).
fn snapshot(sw: &Switcher) -> Vec<(String, String, u64, String)> {
    let st = sw.status().expect("status --json");
    st["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["active"].as_str().unwrap_or_default().to_string(),
                s["generation"].as_u64().expect("generation"),
                s["last_change"].to_string(),
            )
        })
        .collect()
}

/// `status` through the CLI answers, and quickly; returns how long it took.
fn prompt_status(sw: &Switcher) -> Duration {
    let t = Instant::now();
    let out = sw.cli(&["status"]).expect("run the CLI");
    let took = t.elapsed();
    assert_eq!(
        out.code,
        0,
        "status must answer: {out:?}\n{}",
        sw.log_tail()
    );
    assert!(
        took < PROMPT,
        "status took {took:?} while other clients misbehave"
    );
    took
}

fn connect(sw: &Switcher) -> UnixStream {
    let s = UnixStream::connect(sw.socket()).expect("connect to the control socket");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads response lines until EOF (or the read timeout, which fails).
fn read_all(s: &UnixStream) -> Vec<String> {
    let mut r = BufReader::new(s);
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) => return out,
            Ok(_) => out.push(line),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("reading answers: {e} (after {} lines)", out.len()),
        }
    }
}

fn read_one(r: &mut BufReader<&UnixStream>) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => None,
        Ok(_) => Some(line),
        Err(e) => panic!("reading an answer: {e}"),
    }
}

/// A response line: `(ok, error text)`.
fn response(line: &str) -> (bool, String) {
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("the daemon's answer is not JSON ({e}): {line:?}"));
    let ok = v["ok"].as_bool().unwrap_or_else(|| panic!("no ok: {line}"));
    let err = v["error"].as_str().unwrap_or_default().to_string();
    if !ok {
        assert!(!err.trim().is_empty(), "a refusal must say why: {line}");
    }
    (ok, err)
}

/// Whether the daemon's own parser would take `line` as a request that may
/// change state (of a configured service, or the daemon itself): such lines
/// are never sent. Returns the command otherwise (None: not a request).
fn harmless(line: &[u8]) -> Result<Option<String>, ()> {
    let Ok(req) = serde_json::from_slice::<bgswitch::api::Request>(line) else {
        return Ok(None);
    };
    let v = serde_json::to_value(&req).unwrap();
    let cmd = v["cmd"].as_str().unwrap_or_default().to_string();
    let read_only = matches!(cmd.as_str(), "status" | "history");
    let service = v["service"].as_str().unwrap_or_default();
    if read_only || (!service.is_empty() && service != "web" && service != "echo") {
        Ok(Some(cmd))
    } else {
        Err(())
    }
}

/// Byte-level mutations of a request line (no newline inside).
fn mutate(rng: &mut Rng, template: &[u8]) -> Vec<u8> {
    let mut v = template.to_vec();
    for _ in 0..1 + rng.index(4) {
        let at = rng.index(v.len().max(1));
        match rng.index(7) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.index(8),
            1 if !v.is_empty() => {
                v.remove(at);
            }
            2 => v.insert(at.min(v.len()), rng.next_u64() as u8),
            3 => {
                let tokens: [&[u8]; 10] = [
                    b"\"", b"{", b"}", b"[", b"]", b":", b",", b"null", b"\\u0000", b"1e999",
                ];
                let t = tokens[rng.index(tokens.len())];
                let at = at.min(v.len());
                v.splice(at..at, t.iter().copied());
            }
            4 if v.len() > 2 => {
                let end = at + rng.index(v.len() - at);
                let chunk = v[at..end].to_vec();
                v.splice(end..end, chunk);
            }
            5 if !v.is_empty() => v.truncate(at),
            _ => {
                let at = at.min(v.len());
                v.splice(at..at, b"\"service\":\"nosuch\",".iter().copied());
            }
        }
    }
    for b in &mut v {
        if *b == b'\n' {
            *b = b' ';
        }
    }
    v
}

#[test]
fn garbage_mutated_unknown_oversized_and_truncated_requests_are_refused_and_change_nothing() {
    let (_topo, sw) = setup("");
    let before = snapshot(&sw);
    let mut rng = Rng::from_state(0x6267_7377_c0de_0001);
    let started = Instant::now();

    // 1. Random bytes, 300 connections: one answer per line (and one for a
    //    trailing unterminated piece), every one a refusal with a reason.
    let mut random_answers = 0;
    for _ in 0..300 {
        let n = 1 + rng.index(2048);
        let mut data = rng.bytes(n);
        if rng.index(2) == 0 {
            data.push(b'\n');
        }
        if data.split(|b| *b == b'\n').any(|l| harmless(l) != Ok(None)) {
            continue; // a request after all (never seen); not random enough
        }
        let lines = data.iter().filter(|b| **b == b'\n').count();
        let want = lines + usize::from(!data.ends_with(b"\n"));
        let mut s = connect(&sw);
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let answers = read_all(&s);
        assert_eq!(
            answers.len(),
            want,
            "answers to {} random bytes",
            data.len()
        );
        for a in &answers {
            assert!(!response(a).0, "random bytes accepted: {a}");
        }
        random_answers += answers.len();
    }

    // 2. Mutated requests, pipelined 20 per connection.
    let templates: [&[u8]; 12] = [
        br#"{"cmd":"status"}"#,
        br#"{"cmd":"status","service":"nosuch"}"#,
        br#"{"cmd":"flip","service":"nosuch","to":"green","reason":"fuzz"}"#,
        br#"{"cmd":"rollback","service":"nosuch"}"#,
        br#"{"cmd":"history","service":"nosuch"}"#,
        br#"{"cmd":"flip","service":"nosuch","force":true,"watch_ms":1000}"#,
        br#"{"cmd":"shift","service":"nosuch","to":"green","percent":5}"#,
        br#"{"cmd":"preview","service":"nosuch","action":"add","cidr":"198.18.0.0/24"}"#,
        br#"{"cmd":"undo","service":"nosuch"}"#,
        br#"{"cmd":"confirm","service":"nosuch"}"#,
        br#"{"cmd":"status","service":null}"#,
        br#"[{"cmd":"status"}]"#,
    ];
    let (mut sent, mut accepted, mut refused, mut skipped) = (0, 0, 0, 0);
    for _ in 0..60 {
        let mut batch = Vec::new();
        let mut cmds = Vec::new();
        while cmds.len() < 20 {
            let t = templates[rng.index(templates.len())];
            let line = if rng.index(100) < 15 {
                t.to_vec()
            } else {
                mutate(&mut rng, t)
            };
            match harmless(&line) {
                Err(()) => skipped += 1,
                Ok(cmd) => {
                    batch.extend_from_slice(&line);
                    batch.push(b'\n');
                    cmds.push((cmd, line));
                }
            }
        }
        let s = connect(&sw);
        let mut w = &s;
        w.write_all(&batch).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let answers = read_all(&s);
        assert_eq!(answers.len(), cmds.len(), "one answer per request line");
        for ((cmd, line), a) in cmds.iter().zip(&answers) {
            let (ok, err) = response(a);
            sent += 1;
            if ok {
                accepted += 1;
                assert!(
                    matches!(cmd.as_deref(), Some("status" | "history")),
                    "only read-only requests may succeed: {:?} → {a}",
                    String::from_utf8_lossy(line)
                );
            } else {
                refused += 1;
                assert!(!err.is_empty());
            }
        }
    }

    // 3. Named cases.
    let ask = |data: &[u8], close_write: bool| -> Vec<String> {
        let s = connect(&sw);
        let writer = {
            let mut w = s.try_clone().unwrap();
            let data = data.to_vec();
            std::thread::spawn(move || {
                // The daemon may stop reading (oversized); a broken pipe is fine.
                let _ = w.write_all(&data);
                if close_write {
                    let _ = w.shutdown(std::net::Shutdown::Write);
                }
            })
        };
        let answers = read_all(&s);
        writer.join().unwrap();
        answers
    };
    let refused_with = |what: &str, answers: &[String], part: &str| {
        assert_eq!(answers.len(), 1, "{what}: {answers:?}");
        let (ok, err) = response(&answers[0]);
        assert!(!ok && err.contains(part), "{what}: {err}");
        println!("  {what:<52} refused: {}", truncate(&err, 90));
    };
    println!("named cases:");
    refused_with(
        "unknown command",
        &ask(b"{\"cmd\":\"format_disk\"}\n", true),
        "malformed request",
    );
    refused_with(
        "command in capitals",
        &ask(b"{\"cmd\":\"FLIP\",\"service\":\"web\"}\n", true),
        "malformed request",
    );
    refused_with(
        "unknown colour",
        &ask(
            b"{\"cmd\":\"flip\",\"service\":\"web\",\"to\":\"red\"}\n",
            true,
        ),
        "malformed request",
    );
    refused_with(
        "unknown field",
        &ask(b"{\"cmd\":\"status\",\"extra\":1}\n", true),
        "malformed request",
    );
    refused_with(
        "wrong type",
        &ask(
            b"{\"cmd\":\"flip\",\"service\":\"web\",\"force\":\"yes\"}\n",
            true,
        ),
        "malformed request",
    );
    refused_with(
        "unknown service",
        &ask(b"{\"cmd\":\"flip\",\"service\":\"nosuch\"}\n", true),
        "no service named",
    );
    refused_with("empty line", &ask(b"\n", true), "malformed request");
    refused_with(
        "invalid UTF-8",
        &ask(b"{\"cmd\":\"flip\",\"service\":\"w\xffeb\"}\n", true),
        "malformed request",
    );
    refused_with(
        "NUL in a name",
        &ask(b"{\"cmd\":\"flip\",\"service\":\"web\\u0000\"}\n", true),
        "no service named",
    );
    let mut deep = vec![b'['; 60_000];
    deep.push(b'\n');
    refused_with(
        "60 000 nested arrays",
        &ask(&deep, true),
        "malformed request",
    );
    let mut deep = b"{\"cmd\":\"status\",\"service\":".to_vec();
    for _ in 0..10_000 {
        deep.extend_from_slice(b"{\"a\":");
    }
    deep.push(b'\n');
    refused_with(
        "10 000 nested objects",
        &ask(&deep, true),
        "malformed request",
    );
    let mut long_name = b"{\"cmd\":\"flip\",\"service\":\"".to_vec();
    long_name.extend(std::iter::repeat_n(b'x', 60_000));
    long_name.extend_from_slice(b"\"}\n");
    refused_with(
        "60 000-character service name",
        &ask(&long_name, true),
        "no service named",
    );
    let answers = ask(
        b"{\"cmd\":\"status\",\"cmd\":\"flip\",\"service\":\"nosuch\"}\n",
        true,
    );
    assert_eq!(answers.len(), 1);
    println!(
        "  {:<52} answered: {}",
        "duplicate \"cmd\" key",
        truncate(&answers[0], 90)
    );
    response(&answers[0]);
    // Truncated: a valid flip without its newline, then EOF — not executed.
    refused_with(
        "flip without newline, then EOF",
        &ask(b"{\"cmd\":\"flip\",\"service\":\"web\"}", true),
        "not newline-terminated",
    );
    // The same, the client vanishing without shutting down its side.
    {
        let mut s = connect(&sw);
        s.write_all(b"{\"cmd\":\"flip\",\"service\":\"echo\"}")
            .unwrap();
        drop(s);
    }
    // Oversized: over 64 KiB with and without a newline, and a valid flip
    // whose reason makes the line too long — none is executed.
    let mut big = vec![b'a'; 70 * 1024];
    big.push(b'\n');
    refused_with("70 KiB line", &ask(&big, true), "too long");
    let mut flip = b"{\"cmd\":\"flip\",\"service\":\"web\",\"reason\":\"".to_vec();
    flip.extend(std::iter::repeat_n(b'x', 66 * 1024));
    flip.extend_from_slice(b"\"}\n");
    refused_with("valid flip, 66 KiB long", &ask(&flip, true), "too long");
    let huge = vec![b' '; 1024 * 1024];
    refused_with(
        "1 MiB without newline, connection kept open",
        &ask(&huge, false),
        "too long",
    );
    // A valid request padded to just under the limit is served.
    let mut padded = b"{\"cmd\":\"status\"}".to_vec();
    padded.resize(60 * 1024, b' ');
    padded.push(b'\n');
    let answers = ask(&padded, true);
    assert_eq!(answers.len(), 1);
    assert!(response(&answers[0]).0, "a 60 KiB status request is served");
    // Good, bad, good on one connection: the bad one does not end it.
    let answers = ask(
        b"{\"cmd\":\"status\"}\n\x00\x01garbage\n{\"cmd\":\"status\"}\n",
        true,
    );
    let oks: Vec<bool> = answers.iter().map(|a| response(a).0).collect();
    assert_eq!(oks, [true, false, true], "{answers:?}");

    let took = prompt_status(&sw);
    let after = snapshot(&sw);
    assert_eq!(after, before, "nothing may change");
    let log = sw.log();
    for needle in [
        "malformed request refused",
        "oversized or truncated request refused",
    ] {
        assert!(log.contains(needle), "the log must say {needle:?}");
    }
    println!(
        "random bytes: 300 connections, {random_answers} refusals; mutated requests: {sent} sent \
         ({accepted} read-only answered, {refused} refused, {skipped} state-changing ones not sent); \
         status afterwards in {took:?}; all in {:?}; services unchanged: {after:?}",
        started.elapsed()
    );
}

fn truncate(s: &str, n: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[test]
fn stalled_slow_and_non_reading_clients_do_not_block_others() {
    let (_topo, sw) = setup("");
    let before = snapshot(&sw);
    let t0 = Instant::now();
    // Half a line, then nothing.
    let mut half = connect(&sw);
    half.write_all(b"{\"cmd\":\"sta").unwrap();
    // Connected, silent.
    let silent = connect(&sw);
    // Sends requests, never reads the answers: the daemon's writes to it
    // block once its buffer is full.
    let deaf = connect(&sw);
    deaf.set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let (mut deaf_sent, mut deaf_partial) = (0u64, false);
    'fill: while deaf_sent < 100_000 {
        let line = b"{\"cmd\":\"status\"}\n";
        let mut done = 0;
        while done < line.len() {
            match (&deaf).write(&line[done..]) {
                Ok(n) => done += n,
                Err(_) => {
                    deaf_partial = done > 0;
                    break 'fill;
                }
            }
        }
        deaf_sent += 1;
    }
    // A slow writer: one byte every 50 ms.
    let slow = {
        let mut s = connect(&sw);
        std::thread::spawn(move || {
            let t = Instant::now();
            for b in b"{\"cmd\":\"status\"}\n" {
                s.write_all(&[*b]).unwrap();
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut r = BufReader::new(&s);
            let line = read_one(&mut r).expect("the slow client gets its answer");
            (response(&line).0, t.elapsed())
        })
    };
    // Meanwhile others are served promptly.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        worst = worst.max(prompt_status(&sw));
    }
    let (slow_ok, slow_took) = slow.join().unwrap();
    assert!(slow_ok, "the slow client's request is served");

    // Stalled clients can take every slot: the next client is then refused
    // at once with a clear reason (not left hanging) until the daemon cuts
    // the stalled ones off.
    let extra: Vec<UnixStream> = (0..DAEMON_MAX_CLIENTS + 6)
        .map(|_| {
            let mut s = connect(&sw);
            let _ = s.write_all(b"{\"cmd\":\"sta");
            s
        })
        .collect();
    let t = Instant::now();
    let out = sw.cli(&["status"]).unwrap();
    let full_took = t.elapsed();
    assert_ne!(out.code, 0, "all slots are taken: {out:?}");
    assert!(
        out.stderr.contains("too many control connections")
            || REASON_LOST.iter().any(|m| out.stderr.contains(m)),
        "{}",
        out.stderr
    );
    assert!(full_took < PROMPT, "refused in {full_took:?}");

    // The stalled clients are cut off after the daemon's request timeout.
    let cut_off = |s: &UnixStream, what: &str| {
        s.set_read_timeout(Some(DAEMON_REQUEST_TIMEOUT + Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 256];
        let n = bgswitch_tests::retry_eintr(|| (&*s).read(&mut buf));
        let at = t0.elapsed();
        assert!(
            matches!(n, Ok(0)) || matches!(&n, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{what}: the daemon must close a stalled connection, got {n:?} after {at:?}"
        );
        assert!(
            at >= DAEMON_REQUEST_TIMEOUT - Duration::from_secs(1),
            "{what}: closed after {at:?}, before the request timeout"
        );
        at
    };
    let half_closed = cut_off(&half, "half a line");
    let silent_closed = cut_off(&silent, "silent client");
    drop(half);
    drop(silent);
    // Two slots are free again.
    let recovered = prompt_status(&sw);
    let extra_refused = extra
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            matches!((&**s).read(&mut buf), Ok(n) if n > 0)
        })
        .count();
    drop(extra);
    let log = sw.log();
    assert!(
        log.contains("no complete request within"),
        "the log must say a stalled client was cut off"
    );
    // Drain the non-reading client: how many answers did the daemon keep
    // for it? (Today all of them: it waits on such a client as long as it
    // lives — see clients_that_never_read_are_cut_off_like_clients_that_never_write.
    // Cutting it off would be fine too.)
    deaf.shutdown(std::net::Shutdown::Write).unwrap();
    deaf.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let deaf_answers = read_all(&deaf).len() as u64;
    let after = snapshot(&sw);
    assert_eq!(after, before, "nothing may change");
    prompt_status(&sw);
    println!(
        "while a half-line, a silent and a non-reading client ({deaf_sent} requests sent) stalled: \
         20 × status, slowest {worst:?}; slow writer answered after {slow_took:?}; with {} more \
         half-line clients ({extra_refused} of them refused) status was refused in {full_took:?}; \
         half-line client closed after {half_closed:?}, silent one after {silent_closed:?}, then \
         status answered in {recovered:?}; non-reading client got {deaf_answers} answers when it \
         finally read",
        DAEMON_MAX_CLIENTS + 6
    );
    assert!(
        deaf_answers <= deaf_sent + u64::from(deaf_partial),
        "at most one answer per request of the non-reading client"
    );
}

#[test]
fn hundreds_of_concurrent_clients_are_answered_or_refused_clearly() {
    let (_topo, sw) = setup("");
    let before = snapshot(&sw);
    let t = Instant::now();
    // 200 connections held open at once.
    let conns: Vec<UnixStream> = (0..200).map(|_| connect(&sw)).collect();
    let barrier = Arc::new(Barrier::new(conns.len()));
    let handles: Vec<_> = conns
        .into_iter()
        .map(|s| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let _ = (&s).write_all(b"{\"cmd\":\"status\"}\n");
                let mut r = BufReader::new(&s);
                let line = read_one(&mut r).expect("an answer or a refusal, not silence");
                let (ok, err) = response(&line);
                (ok, err, s)
            })
        })
        .collect();
    let results: Vec<(bool, String, UnixStream)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    let answered = results.iter().filter(|r| r.0).count();
    let refused: Vec<String> = results
        .iter()
        .filter(|r| !r.0)
        .map(|r| r.1.clone())
        .collect();
    for e in &refused {
        assert!(e.contains("too many control connections"), "{e}");
    }
    let raw_took = t.elapsed();
    assert!(answered >= 1);
    assert!(
        answered <= DAEMON_MAX_CLIENTS,
        "{answered} served at once; the daemon's limit is {DAEMON_MAX_CLIENTS}"
    );
    drop(results);

    // 100 CLI processes at once.
    let t = Instant::now();
    let bin = bgswitch_bin().unwrap();
    let socket = sw.socket();
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let (bin, socket) = (bin.clone(), socket.clone());
            std::thread::spawn(move || {
                Command::new(bin)
                    .arg("--socket")
                    .arg(socket)
                    .args(["status", "--json"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    let (mut cli_ok, mut cli_refused, mut cli_reason_lost) = (0, 0, 0);
    for h in handles {
        let out = h.join().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            cli_ok += 1;
            let v: Value = serde_json::from_slice(&out.stdout).expect("status --json");
            assert!(v["services"].is_array());
        } else if stderr.contains("too many control connections") {
            cli_refused += 1;
        } else {
            // The daemon refused and closed before the CLI wrote its request;
            // the CLI reports the write error instead of the refusal (see
            // the_cli_reports_the_daemons_refusal_not_a_broken_pipe).
            assert!(
                REASON_LOST.iter().any(|m| stderr.contains(m)),
                "a CLI call failed otherwise: {stderr}"
            );
            cli_reason_lost += 1;
        }
    }
    let cli_took = t.elapsed();
    let took = prompt_status(&sw);
    assert_eq!(snapshot(&sw), before, "nothing may change");
    if !refused.is_empty() || cli_refused + cli_reason_lost > 0 {
        assert!(sw.log().contains("clients already connected; refusing one"));
    }
    println!(
        "200 connections at once: {answered} answered, {} refused (\"too many control \
         connections\") in {raw_took:?}; 100 concurrent CLI calls: {cli_ok} answered, \
         {cli_refused} refused with the reason, {cli_reason_lost} refused showing only a \
         write error, in {cli_took:?}; status afterwards in {took:?}",
        refused.len()
    );
}

/// Runs the CLI (`bgswitch --socket <ours> ARGS`) as `nobody` with group `regid` and
/// the supplementary `groups` (none if `None`), via setpriv(1).
fn as_nobody(sw: &Switcher, regid: &str, groups: Option<&str>, args: &[&str]) -> (i32, String) {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", &format!("--regid={regid}")]);
    match groups {
        Some(g) => c.arg(format!("--groups={g}")),
        None => c.arg("--clear-groups"),
    };
    let out = c
        .arg(bgswitch_bin().unwrap())
        .arg("--socket")
        .arg(sw.socket())
        .args(args)
        .output()
        .expect("setpriv (util-linux) runs the CLI as nobody");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `f` on a thread of its own whose credentials — that thread's only:
/// raw syscalls, not the libc wrappers that change every thread — are
/// `uid`:`gid` with no supplementary groups. The thread stays so and ends.
fn on_thread_as<T: Send>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain syscalls changing this thread's credentials.
                unsafe {
                    assert_eq!(
                        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()),
                        0
                    );
                    assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0);
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
                }
                f()
            })
            .join()
            .unwrap()
    })
}

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
const DAEMON_GID: u32 = 1;

/// A raw client as `uid`:`gid` that connects and only reads: what does the
/// daemon say to it? `Err` if it cannot connect.
fn raw_as(sw: &Switcher, uid: u32, gid: u32) -> Result<Vec<String>, std::io::Error> {
    let path = sw.socket();
    on_thread_as(uid, gid, move || {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(read_all(&s))
    })
}

fn refused_by_daemon(answers: &[String]) {
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (ok, err) = response(&answers[0]);
    assert!(
        !ok && err.contains("not root nor in the socket group"),
        "{answers:?}"
    );
}

#[test]
fn users_outside_the_socket_group_are_refused_and_logged() {
    // Without socket_group only root may use the socket (mode 0660 root:root):
    // the kernel refuses nobody.
    let (_topo, sw) = setup("");
    let before = snapshot(&sw);
    let (code, text) = as_nobody(&sw, "nogroup", None, &["status"]);
    assert_ne!(code, 0, "nobody must be refused: {text}");
    assert!(
        text.contains("Permission denied")
            && text.contains("run this as root, or as a member of that group"),
        "a permission error says so, and what to do: {text}"
    );
    // `detach` refused that way is not taken for "no daemon": nothing is
    // removed behind the daemon's back, --force or not.
    let config = sw.config_path().display().to_string();
    let (code, text) = as_nobody(
        &sw,
        "nogroup",
        None,
        &["detach", "--force", "--config", &config],
    );
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("Permission denied"), "{text}");
    assert!(sw.bpffs().join("bgswitch").exists(), "the pins stay");
    let e = raw_as(&sw, NOBODY, NOGROUP).expect_err("nobody cannot connect");
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    println!(
        "socket 0660 root:root: nobody refused by the kernel: {}",
        text.trim()
    );
    // Were the socket's mode opened up, the daemon refuses by itself and
    // logs it.
    chmod(&sw.socket(), 0o666);
    refused_by_daemon(&raw_as(&sw, NOBODY, NOGROUP).expect("connects to a 0666 socket"));
    let mut reasons_shown = 0;
    let calls: [&[&str]; 3] = [&["status"], &["flip", "web"], &["reload"]];
    for i in 0..12 {
        let (code, text) = as_nobody(&sw, "nogroup", None, calls[i % 3]);
        assert_ne!(code, 0, "nobody must be refused: {text}");
        if text.contains("not root nor in the socket group") {
            reasons_shown += 1;
        } else {
            assert!(REASON_LOST.iter().any(|m| text.contains(m)), "{text}");
        }
    }
    let logged = sw.log().matches("refused nobody (uid 65534").count();
    assert!(logged >= 13, "every refusal is logged: {logged} of 13");
    println!(
        "socket 0666: nobody refused by the daemon 13 times, all logged; the CLI showed the \
         reason {reasons_shown} of 12 times (otherwise a write error)"
    );
    assert_eq!(snapshot(&sw), before, "nothing may change");
    drop(sw);

    // With socket_group: members (primary or supplementary) are served,
    // others refused.
    let (_topo, sw) = setup("socket_group = \"nogroup\"");
    let before = snapshot(&sw);
    let meta = std::fs::metadata(sw.socket()).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((meta.gid(), meta.mode() & 0o777), (NOGROUP, 0o660));
    let (code, text) = as_nobody(&sw, "nogroup", None, &["status"]);
    assert_eq!(code, 0, "a member of the socket group is served: {text}");
    let (code, text) = as_nobody(&sw, "daemon", Some("nogroup"), &["status"]);
    assert_eq!(code, 0, "a supplementary member is served: {text}");
    let (code, text) = as_nobody(&sw, "daemon", None, &["status"]);
    assert_ne!(code, 0, "not in the group: refused: {text}");
    assert!(text.contains("Permission denied"), "{text}");
    chmod(&sw.socket(), 0o666);
    refused_by_daemon(&raw_as(&sw, NOBODY, DAEMON_GID).expect("connects to a 0666 socket"));
    let (code, text) = as_nobody(&sw, "daemon", None, &["flip", "web"]);
    assert_ne!(code, 0, "not in the group: refused: {text}");
    assert!(sw.log().contains("refused nobody (uid 65534"));
    assert_eq!(snapshot(&sw), before, "nothing may change");
    prompt_status(&sw);
    println!(
        "socket_group = nogroup: members served, others refused (kernel, then daemon); logged"
    );
}

#[test]
fn the_cli_reports_the_daemons_refusal_not_a_broken_pipe() {
    let (_topo, sw) = setup("");
    chmod(&sw.socket(), 0o666);
    let mut shown = Vec::new();
    for _ in 0..10 {
        let (code, text) = as_nobody(&sw, "nogroup", None, &["status"]);
        assert_ne!(code, 0);
        shown.push(text.trim().to_string());
    }
    for t in &shown {
        assert!(
            t.contains("not root nor in the socket group"),
            "the CLI must show why it was refused; it said: {t}"
        );
    }
}

#[test]
fn clients_that_never_read_are_cut_off_like_clients_that_never_write() {
    let (_topo, sw) = setup("");
    // 64 clients that fill their socket with requests and never read.
    let deaf: Vec<UnixStream> = (0..DAEMON_MAX_CLIENTS)
        .map(|_| {
            let s = connect(&sw);
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        })
        .collect();
    std::thread::scope(|scope| {
        for s in &deaf {
            scope.spawn(move || {
                let mut w = s;
                for _ in 0..100_000 {
                    if w.write_all(b"{\"cmd\":\"status\"}\n").is_err() {
                        break;
                    }
                }
            });
        }
    });
    // A client that stops writing is cut off after the request timeout; one
    // that stops reading should be too.
    std::thread::sleep(DAEMON_REQUEST_TIMEOUT + Duration::from_secs(5));
    let out = sw.cli(&["status"]).unwrap();
    drop(deaf);
    assert_eq!(
        out.code,
        0,
        "{} s after 64 clients stopped reading, status must be served: {}",
        (DAEMON_REQUEST_TIMEOUT + Duration::from_secs(5)).as_secs(),
        out.stderr
    );
}

/// Fills the daemon's pinned flow table with `n` entries of a service id no
/// configured service has (they never match traffic) through
/// BPF_MAP_UPDATE_BATCH, so that a status must read a large table.
fn fill_flow_table(sw: &Switcher, n: u32) {
    use bgswitch_common::{FlowEntry, FlowKey4};
    let path = bgswitch::paths::map_pin(&sw.bpffs(), bgswitch_common::maps::FLOWS);
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    // SAFETY: a bpf(2) call with an attribute buffer of 128 bytes.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_mut_ptr(), 128) };
    assert!(
        fd >= 0,
        "BPF_OBJ_GET {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    const CHUNK: u32 = 65_536;
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        let keys: Vec<FlowKey4> = (done..done + count)
            .map(|i| FlowKey4 {
                src: (0xC613_0000u32 + i).to_be(),
                dst: 0x0a00_0001u32.to_be(),
                sport: 1234u16.to_be(),
                dport: 80u16.to_be(),
                proto: 6,
                ..Default::default()
            })
            .collect();
        let values: Vec<FlowEntry> = (0..count)
            .map(|_| FlowEntry {
                service: 200,
                ..Default::default()
            })
            .collect();
        // BPF_MAP_UPDATE_BATCH: in_batch, out_batch, keys, values, count,
        // map_fd, elem_flags, flags.
        let mut attr = [0u64; 16];
        attr[2] = keys.as_ptr() as u64;
        attr[3] = values.as_ptr() as u64;
        attr[4] = u64::from(count) | (fd as u64) << 32;
        // SAFETY: keys and values hold `count` entries each.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 26, attr.as_mut_ptr(), 128) };
        assert_eq!(
            rc,
            0,
            "BPF_MAP_UPDATE_BATCH: {}",
            std::io::Error::last_os_error()
        );
        done += count;
    }
    // SAFETY: closing the descriptor BPF_OBJ_GET gave us.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn a_status_reading_a_large_flow_table_does_not_hold_up_a_flip() {
    let (_topo, sw) = setup_edited("", |text| {
        assert!(text.contains("max_flows = 65536"));
        text.replace("max_flows = 65536", "max_flows = 1048576")
    });
    let filled = Instant::now();
    fill_flow_table(&sw, 1_000_000);
    let filled = filled.elapsed();
    let before = snapshot(&sw);

    // A status request (counting live flows reads the whole table), then a
    // flip at once: the flip is answered while the table is still being
    // read, so the status's answer is not there yet when the flip returns.
    let mut status = connect(&sw);
    status.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let t = Instant::now();
    let out = sw.cli_ok(&["flip", "web"]).unwrap();
    let flip_took = t.elapsed();
    status.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1];
    let early = (&status).read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the status answer was there before the flip returned ({early:?}): the flip waited \
         for the flow-table read"
    );
    status.set_nonblocking(false).unwrap();
    status
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let answer = read_one(&mut BufReader::new(&status)).expect("the status answer");
    let status_took = t.elapsed();
    assert!(response(&answer).0, "{answer}");
    let after = snapshot(&sw);
    assert_eq!(after[0].2, before[0].2 + 1, "the flip happened: {out:?}");
    println!(
        "1 000 000 flows written in {filled:?}; a flip during a status answered in {flip_took:?}, \
         the status in {status_took:?}"
    );
}
