//! The data plane's own log messages (rare events, at most one per kind
//! and CPU a second; see `bgswitch-ebpf/src/events.rs`) copied into the
//! daemon's log, each "ifindex N" named.

use crate::dataplane;

/// The daemon's logger for the data plane's own messages: the process's
/// logger, with each "ifindex N" the program reports followed by the
/// interface's name (the program only knows the index).
pub(super) struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        log::logger().enabled(m)
    }

    fn log(&self, r: &log::Record) {
        let text = name_ifindexes(&r.args().to_string(), dataplane::ifname);
        log::logger().log(
            &log::Record::builder()
                .args(format_args!("{text}"))
                .level(r.level())
                .target(r.target())
                .module_path(r.module_path())
                .file(r.file())
                .line(r.line())
                .build(),
        );
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// `text` with " (name)" after every "ifindex N" whose name `name` knows.
fn name_ifindexes(text: &str, name: impl Fn(u32) -> Option<String>) -> String {
    const WORD: &str = "ifindex ";
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(i) = rest.find(WORD) {
        let after = &rest[i + WORD.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        out.push_str(&rest[..i + WORD.len() + digits]);
        if let Some(n) = after[..digits].parse().ok().and_then(&name) {
            out.push_str(&format!(" ({n})"));
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// Copies the data plane's own messages (rare events, at most one per kind
/// and CPU a second; see `bgswitch-ebpf/src/events.rs`) into the daemon's
/// log as they arrive.
pub(super) async fn kernel_log_loop(
    mut fd: tokio::io::unix::AsyncFd<aya_log::EbpfLogger<KernelLog>>,
) {
    loop {
        let Ok(mut ready) = fd.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::name_ifindexes;

    #[test]
    fn kernel_messages_name_the_interfaces_they_index() {
        let name = |i: u32| (i == 5).then(|| "lbb".to_string());
        assert_eq!(
            name_ifindexes("leaves through ifindex 5, which", name),
            "leaves through ifindex 5 (lbb), which"
        );
        assert_eq!(
            name_ifindexes("ifindex 7 and ifindex 5", name),
            "ifindex 7 and ifindex 5 (lbb)"
        );
        assert_eq!(name_ifindexes("ifindex 5", name), "ifindex 5 (lbb)");
        assert_eq!(name_ifindexes("no index here", name), "no index here");
        assert_eq!(
            name_ifindexes("ends with ifindex ", name),
            "ends with ifindex "
        );
        assert_eq!(
            name_ifindexes("ifindex x, ifindex 55", name),
            "ifindex x, ifindex 55"
        );
    }
}
