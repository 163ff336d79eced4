//! The Debian package (`cargo xtask package`; the suite builds it from the
//! debug build before the tests): its contents, lintian with no errors, and
//! the package installed for real — the unit verified by systemd, the
//! socket group made, the man pages found — whose binary runs the demo's
//! flip. Purged again at the end, also on failure.

use std::{path::PathBuf, process::Command};

use bgswitch_tests::switcher::{
    default_services, require_root, served_topology, Switcher, HTTP_PORT,
};

fn deb() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target/package");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: run `cargo xtask package --dev` (cargo xtask test does)",
                dir.display()
            )
        })
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("bgswitch_") && n.ends_with(".deb"))
        })
        .expect("a bgswitch_<version>_<arch>.deb in target/package")
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Purges the package when dropped.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "bgswitch"]).output();
    }
}

#[test]
fn the_package_is_lint_clean_installs_and_its_binary_flips() {
    require_root();
    let deb = deb();
    let deb = deb.to_str().unwrap();
    let (ok, contents) = run("dpkg-deb", &["-c", deb]);
    assert!(ok, "{contents}");
    let help = String::from_utf8(
        Command::new(bgswitch_tests::switcher::bgswitch_bin().unwrap())
            .arg("--help")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    let mut want = vec![
        "./usr/sbin/bgswitch".to_string(),
        "./usr/libexec/bgswitch/bgswitchd".into(),
        "./lib/systemd/system/bgswitch.service".into(),
        "./etc/bgswitch/bgswitch.toml".into(),
        "./usr/share/man/man8/bgswitch.8.gz".into(),
        "./usr/share/bash-completion/completions/bgswitch".into(),
        "./usr/share/zsh/vendor-completions/_bgswitch".into(),
        "./usr/share/fish/vendor_completions.d/bgswitch.fish".into(),
        "./usr/share/doc/bgswitch/README.md".into(),
        "./usr/share/doc/bgswitch/grafana-dashboard.json".into(),
        "./usr/share/doc/bgswitch/prometheus-rules.yml".into(),
        "./usr/share/doc/bgswitch/copyright".into(),
        "./usr/share/doc/bgswitch/changelog.Debian.gz".into(),
    ];
    want.extend(
        commands
            .iter()
            .map(|c| format!("./usr/share/man/man8/bgswitch-{c}.8.gz")),
    );
    for w in &want {
        assert!(
            contents.lines().any(|l| l.ends_with(w.as_str())),
            "{w} not in the package:\n{contents}"
        );
    }
    let (_, conffiles) = run("dpkg-deb", &["-I", deb, "conffiles"]);
    assert!(
        conffiles.contains("/etc/bgswitch/bgswitch.toml"),
        "{conffiles}"
    );

    // lintian: no errors (warnings are shown in the failure message only).
    let (_, lint) = run("lintian", &["--tag-display-limit", "0", deb]);
    let errors: Vec<&str> = lint.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{lint}");

    // Installed for real.
    let installed = Installed;
    let (ok, out) = run("dpkg", &["-i", deb]);
    assert!(ok, "dpkg -i: {out}");
    let (ok, out) = run(
        "systemd-analyze",
        &["verify", "/lib/systemd/system/bgswitch.service"],
    );
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
    let unit = std::fs::read_to_string("/lib/systemd/system/bgswitch.service").unwrap();
    assert!(
        unit.contains("ExecStart=/usr/sbin/bgswitch daemon"),
        "{unit}"
    );
    let (ok, out) = run("getent", &["group", "bgswitch"]);
    assert!(ok, "the socket group: {out}");
    let (ok, out) = run("man", &["-w", "bgswitch-flip"]);
    assert!(
        ok && out.contains("/usr/share/man/man8/bgswitch-flip.8.gz"),
        "{out}"
    );

    // The packaged binary runs the demo's flip.
    // SAFETY: this test binary runs this one test; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("BGSWITCH_BIN", "/usr/sbin/bgswitch") };
    let topo = served_topology().unwrap();
    let mut sw = Switcher::new(&topo, &default_services(&topo)).unwrap();
    sw.start().unwrap();
    let get = || {
        bgswitch_tests::http_get(topo.client_ns(), (bgswitch_tests::VIP, HTTP_PORT), "/")
            .unwrap()
            .body
    };
    assert!(get().starts_with("blue "));
    let msg = sw
        .cli_ok(&["flip", "web", "--reason", "release 2"])
        .unwrap();
    assert!(msg.contains("blue → green"), "{msg}");
    assert!(get().starts_with("green "));
    sw.stop().unwrap();
    drop(sw);
    drop(installed);
    assert!(!std::path::Path::new("/usr/sbin/bgswitch").exists());
    assert!(!std::path::Path::new("/usr/libexec/bgswitch/bgswitchd").exists());
}
