//! Project tasks: `cargo xtask setup | build | test | demo`.
//!
//! `setup` installs what is missing — Debian packages the tests use, the
//! nightly toolchain's `rust-src`, and bpf-linker built from crates.io against
//! the nightly toolchain's own LLVM — into lasting places, idempotently.
//! `test` and `demo` run `setup` first, so on a fresh machine (as root) they
//! are the only two commands needed.
//!
//! This crate depends on nothing of the project's own, so it compiles before
//! the BPF toolchain exists.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};

/// Where the BPF toolchain goes (bpf-linker and the LLVM symlinks it links
/// against). Overridable with BGSWITCH_TOOLCHAIN; bgswitch/build.rs reads the same.
const TOOLCHAIN_DEFAULT: &str = "/opt/bgswitch/toolchain";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages used by the tests and the demo, with a command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("ethtool", "ethtool"),
    // The smoke-test check of tests/tests/checks.rs (and of the README).
    ("curl", "curl"),
    // etcd-client's build compiles etcd's protobuf definitions.
    ("protobuf-compiler", "protoc"),
    // The fleet's tests and demo run their own etcd members.
    ("etcd-server", "etcd"),
    // promtool: the exposition and the alert rules are checked in the suite.
    ("prometheus", "promtool"),
    // The package's checks (tests/tests/package.rs: lintian, `man -w`).
    ("lintian", "lintian"),
    ("man-db", "man"),
    // `bgswitch top` in a terminal (tests/tests/operator.rs).
    ("tmux", "tmux"),
    // TLS backends and certificates for the HTTPS health checks' tests.
    ("openssl", "openssl"),
    // `nm`: tests/tests/binaries.rs reads the client binary's symbols
    // (the linker's package; named so the dependency is not implicit).
    ("binutils", "nm"),
];

#[derive(Parser)]
#[command(about = "bgswitch project tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (packages, rust-src, bpf-linker).
    Setup,
    /// Set up, then build the daemon/CLI with its XDP program.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, check formatting and lints, run the whole test suite.
    Test {
        /// Skip `cargo fmt --check` and clippy (host crates, then eBPF crates).
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Build (release) and write the Debian package:
    /// target/package/bgswitch_<version>_<arch>.deb (cargo-deb). `--dev`:
    /// from the debug build (what the suite checks).
    Package {
        #[arg(long)]
        dev: bool,
    },
    /// Build and write the man pages (bgswitch(8), one per subcommand) into
    /// target/man, and the bash, zsh and fish completions into
    /// target/completions.
    Man,
    /// Set up, build, and show a blue/green switch on a throwaway topology.
    /// `--fleet`: two load-balancer hosts following one flip through etcd.
    Demo {
        #[arg(long)]
        fleet: bool,
    },
    /// Set up, build (release) and run the benchmarks: writes bench/RESULTS.md
    /// and bench/results.json. `--quick`: correctness counters and gross
    /// ratios only (what `test` runs), results under target/bench-quick.
    Bench {
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build, and run the long proof runs: thousands of flips under
    /// HTTP and UDP load, and millions of hostile frames. Writes the pass
    /// table to target/soak/SOAK.md.
    Soak {
        /// Flips of each service under load (the suite's short run does 60).
        #[arg(long, default_value_t = 1000)]
        flips: u32,
        /// Generated and mutated frames through the XDP program.
        #[arg(long, default_value_t = 3_000_000)]
        frames: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match args.task {
        Task::Setup => setup(),
        Task::Build { release } => setup().and_then(|()| build(release)),
        Task::Test { no_lint, rest } => setup().and_then(|()| test(no_lint, &rest)),
        Task::Demo { fleet } => setup().and_then(|()| demo(fleet)),
        Task::Man => build(false).and_then(|()| man()),
        Task::Package { dev } => setup().and_then(|()| package(dev)),
        Task::Bench { quick } => setup().and_then(|()| bench(quick)),
        Task::Soak { flips, frames } => setup().and_then(|()| soak(flips, frames)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn toolchain_dir() -> PathBuf {
    env::var_os("BGSWITCH_TOOLCHAIN")
        .map_or_else(|| PathBuf::from(TOOLCHAIN_DEFAULT), PathBuf::from)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Runs a command, failing with its name if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    // The xtask has no libc dependency; `id -u` answers the same question.
    output(Command::new("id").arg("-u")).is_ok_and(|s| s.trim() == "0")
}

fn setup() -> Result<()> {
    install_packages()?;
    install_rust_src()?;
    install_bpf_linker()?;
    install_cargo_deb()?;
    Ok(())
}

/// cargo-deb (the Debian package of `package`), from crates.io into the
/// toolchain directory, when missing.
fn install_cargo_deb() -> Result<()> {
    let dir = toolchain_dir();
    if dir.join("bin/cargo-deb").is_file() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-deb {CARGO_DEB_VERSION} into {}",
        dir.display()
    );
    run(cargo()
        .args([
            "install",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
            "cargo-deb",
            "--root",
        ])
        .arg(&dir))
}

fn install_packages() -> Result<()> {
    ensure_packages(PACKAGES)
}

/// Installs with apt-get those of `packages` (name, a command it provides)
/// whose command is missing; nothing when all are there.
fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, cmd)| {
            !have(cmd)
                && !Path::new("/usr/sbin").join(cmd).is_file()
                && !Path::new("/sbin").join(cmd).is_file()
        })
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("packages {missing:?} are missing; run as root so they can be installed");
    }
    eprintln!("xtask: installing {missing:?} with apt-get");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn install_rust_src() -> Result<()> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]));
    let sysroot = match sysroot {
        Ok(s) => PathBuf::from(s.trim()),
        Err(_) => {
            eprintln!("xtask: installing the nightly toolchain");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            PathBuf::from(
                output(
                    Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]),
                )?
                .trim(),
            )
        }
    };
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The nightly toolchain's clippy, which lints the eBPF crates (a minimal
/// nightly install has none).
fn install_nightly_clippy() -> Result<()> {
    if output(Command::new("rustup").args(["run", "nightly", "cargo-clippy", "--version"])).is_ok()
    {
        return Ok(());
    }
    eprintln!("xtask: adding clippy to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "nightly"]))
}

/// Lints the crates built for the BPF target (the data plane, the bench's
/// programs, and bgswitch-common as they see it), which host-wide commands
/// leave out: nightly clippy with the target and `core` built from source.
fn clippy_ebpf() -> Result<()> {
    install_nightly_clippy()?;
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "clippy"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .args([
            "-p",
            "bgswitch-ebpf",
            "-p",
            "bgswitch-bench-ebpf",
            "-p",
            "bgswitch-common",
        ])
        .args(["--lib", "--bins", "--", "-D", "warnings"])
        .current_dir(workspace_root().join("bgswitch-ebpf")))
}

/// Builds bpf-linker from crates.io against nightly's own libLLVM (no system
/// LLVM, no prebuilt download), unless a working one is already installed.
fn install_bpf_linker() -> Result<()> {
    let dir = toolchain_dir();
    let linker = dir.join("bin").join("bpf-linker");
    if linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or_else(|| anyhow!("cannot read nightly's LLVM version from `rustc -vV`"))?
        .to_string();
    let sysroot = PathBuf::from(
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?
            .trim(),
    );
    let libdir = sysroot.join("lib");
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .ok_or_else(|| anyhow!("no libLLVM.so.{major}* in {}", libdir.display()))?;
    let prefix = dir.join(format!("llvm-{major}"));
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib).with_context(|| format!("creating {}", plib.display()))?;
    let file_name = lib.file_name().expect("file has a name").to_owned();
    for name in [std::ffi::OsString::from("libLLVM.so"), file_name] {
        let link = plib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)
            .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} into {} (about 2 minutes, once)",
        dir.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&dir)
        .env("LLVM_PREFIX", &prefix))
}

/// Builds both binaries, then links the client (`bgswitch`) again as a
/// static PIE over cargo's dynamic one: a flip is a whole process, and
/// without the dynamic loader's work (mapping libc and libgcc_s, their
/// relocations and symbol lookups) the process starts in about 0.3 ms less.
/// `cargo rustc` passes `crt-static` to the binary's own compilation alone
/// (the crates it links are the ones `cargo build` just compiled: no second
/// build of them) and keeps its result apart in `deps/`, so a later plain
/// `cargo build` puts the dynamic client back, and this puts the static
/// one back without linking again. The client uses nothing of glibc's that
/// loads modules at run time (no NSS lookups): `tests/tests/binaries.rs`
/// checks it is static. The static libraries it takes (glibc's `libc.a`,
/// gcc's `libgcc_eh.a`) come with the packages every link here needs
/// already (libc6-dev for `crt1.o`, gcc's libgcc-dev).
fn build(release: bool) -> Result<()> {
    let profile: &[&str] = if release { &["--release"] } else { &[] };
    run(cargo()
        .args(["build", "--package", "bgswitch"])
        .args(profile))?;
    run(cargo()
        .args(["rustc", "--package", "bgswitch", "--bin", "bgswitch"])
        .args(profile)
        .args(["--", "-C", "target-feature=+crt-static"]))
}

fn test(no_lint: bool, rest: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the suite attaches XDP programs and creates network namespaces: run it as root");
    }
    build(false)?;
    if !no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
        // The default members: every crate built for the host.
        run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
        clippy_ebpf()?;
    }
    // The Debian package of the debug build, which tests/tests/package.rs
    // lints, installs and runs.
    package(true)?;
    let bin = workspace_root().join("target/debug/bgswitch");
    run(cargo()
        .args(["test", "--workspace", "--exclude", "bgswitch-ebpf"])
        .args(rest)
        .env("BGSWITCH_BIN", &bin))?;
    bench(true)
}

/// cargo-deb, installed from crates.io into the toolchain directory when
/// missing.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// `cargo xtask package [--dev]`: the binary (release, or the debug build
/// with --dev), its man pages and completions, then cargo-deb with the
/// metadata in bgswitch/Cargo.toml; the .deb goes to target/package/.
fn package(dev: bool) -> Result<()> {
    build(!dev)?;
    man()?;
    install_cargo_deb()?;
    let tool = toolchain_dir().join("bin/cargo-deb");
    let out = workspace_root().join("target/package");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut c = Command::new(&tool);
    c.current_dir(workspace_root())
        .args(["deb", "--package", "bgswitch", "--no-build", "--output"])
        .arg(&out);
    if dev {
        c.args(["--profile", "dev"]);
    }
    run(&mut c)
}

/// `cargo xtask man`: the man pages and completions, generated by the
/// built binary from its own clap definitions.
fn man() -> Result<()> {
    let root = workspace_root();
    let bin = root.join("target/debug/bgswitch");
    run(Command::new(&bin).arg("__man").arg(root.join("target/man")))?;
    let dir = root.join("target/completions");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (shell, file) in [
        ("bash", "bgswitch"),
        ("zsh", "_bgswitch"),
        ("fish", "bgswitch.fish"),
    ] {
        let out = Command::new(&bin).args(["completions", shell]).output()?;
        if !out.status.success() {
            bail!(
                "bgswitch completions {shell}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::write(dir.join(file), out.stdout)?;
        println!("{}", dir.join(file).display());
    }
    Ok(())
}

fn demo(fleet: bool) -> Result<()> {
    if !is_root() {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    build(false)?;
    let bin = workspace_root().join("target/debug/bgswitch");
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--package",
            "bgswitch-tests",
            "--bin",
            "bgswitch-demo",
        ])
        .args(
            fleet
                .then_some("--")
                .into_iter()
                .chain(fleet.then_some("--fleet")),
        )
        .env("BGSWITCH_BIN", &bin))
}

/// Packages the benchmarks use (nftables DNAT, HAProxy and wrk for the
/// comparisons), with a command each provides; installed only when missing.
const BENCH_PACKAGES: &[(&str, &str)] = &[
    ("nftables", "nft"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("ethtool", "ethtool"),
];

/// `cargo xtask bench [--quick]`: the benchmark suite (crate `bench`). Full:
/// release builds, every part, bench/RESULTS.md and bench/results.json.
/// Quick (run by `test`): debug builds, correctness counters and gross ratios
/// only, never absolute times; results under target/bench-quick.
fn bench(quick: bool) -> Result<()> {
    if !is_root() {
        bail!("the benchmarks attach XDP programs and create network namespaces: run them as root");
    }
    let wanted: &[(&str, &str)] = if quick {
        &BENCH_PACKAGES[..1]
    } else {
        BENCH_PACKAGES
    };
    ensure_packages(wanted)?;
    let root = workspace_root();
    let profile = if quick { "debug" } else { "release" };
    build(!quick)?;
    let mut b = cargo();
    b.args(["build", "--package", "bgswitch-bench"]);
    if !quick {
        b.arg("--release");
    }
    run(&mut b)?;
    let out = if quick {
        root.join("target/bench-quick")
    } else {
        root.join("bench")
    };
    let mut c = Command::new(root.join("target").join(profile).join("bgswitch-bench"));
    c.current_dir(&root).arg("--out").arg(&out).env(
        "BGSWITCH_BIN",
        root.join("target").join(profile).join("bgswitch"),
    );
    if quick {
        c.arg("--quick");
    }
    run(&mut c)
}

/// `cargo xtask soak`: the long versions of the flip-under-load and hostile
/// frame tests, with their output kept in target/soak/.
fn soak(flips: u32, frames: u64) -> Result<()> {
    if !is_root() {
        bail!("the soak attaches XDP programs and creates network namespaces: run it as root");
    }
    build(false)?;
    let dir = workspace_root().join("target/soak");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bin = workspace_root().join("target/debug/bgswitch");
    let out = cargo()
        .args(["test", "--package", "bgswitch-tests"])
        .args(["--test", "flip_under_load", "--test", "xdp_fuzz"])
        .args(["--", "--nocapture", "--test-threads", "1"])
        .env("BGSWITCH_BIN", &bin)
        .env("BGSWITCH_SOAK_FLIPS", flips.to_string())
        .env("BGSWITCH_FUZZ_FRAMES", frames.to_string())
        .output()
        .context("running the soak")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report = format!(
        "# bgswitch soak\n\n`cargo xtask soak --flips {flips} --frames {frames}`: {}\n\n```text\n{}\n```\n",
        if out.status.success() { "PASSED" } else { "FAILED" },
        text.lines()
            .filter(|l| !l.starts_with("warning: bgswitch@"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let path = dir.join("SOAK.md");
    std::fs::write(&path, report).with_context(|| format!("writing {}", path.display()))?;
    println!("{text}");
    println!("xtask: soak report in {}", path.display());
    if !out.status.success() {
        bail!("the soak failed; see {}", path.display());
    }
    Ok(())
}
