//! Every default path and bpffs name in one place.

/// The full binary (daemon, `top`, `simulate`, …) as packaged; the
/// client binary looks beside itself first (a build tree).
pub const FULL_BINARY: &str = "/usr/libexec/bgswitch/bgswitchd";
/// Its file name.
pub const FULL_BINARY_NAME: &str = "bgswitchd";

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/bgswitch/bgswitch.toml";
/// Default control socket.
pub const DEFAULT_SOCKET: &str = "/run/bgswitch/bgswitch.sock";
/// Default state directory (desired state, lock).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bgswitch";
/// Default bpffs mount point (the pin root).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Directory under the pin root that holds everything bgswitch pins.
pub const PIN_DIR: &str = "bgswitch";
/// The desired-state file in the state directory.
pub const STATE_FILE: &str = "state.json";
/// The journal of every change, one JSON line each.
pub const JOURNAL_FILE: &str = "journal.jsonl";
/// The journal's previous part, moved away by rotation (`history` reads it).
pub const JOURNAL_ROTATED_FILE: &str = "journal.1.jsonl";
/// The kernel tick rate measured at this boot (`BOOT_ID HZ`), so a restart
/// need not measure it again.
pub const TICK_RATE_FILE: &str = "tick-rate";
/// The lock file that keeps a second daemon out.
pub const LOCK_FILE: &str = "daemon.lock";
/// The `PATH` a user's check runs with (its environment is otherwise
/// clean), and where a bare program name in its `command` is looked up.
pub const CHECK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// This boot's id (the kernel's, random per boot).
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

use std::path::{Path, PathBuf};

/// `<bpffs>/bgswitch/v<LAYOUT_VERSION>`: pins of this layout version.
pub fn pin_root(bpffs: &Path) -> PathBuf {
    bpffs
        .join(PIN_DIR)
        .join(format!("v{}", bgswitch_common::LAYOUT_VERSION))
}

/// Where map `name` is pinned.
pub fn map_pin(bpffs: &Path, name: &str) -> PathBuf {
    pin_root(bpffs).join("maps").join(name)
}

/// Where the XDP link of interface `ifname` is pinned.
pub fn link_pin(bpffs: &Path, ifname: &str) -> PathBuf {
    pin_root(bpffs).join("links").join(ifname)
}
