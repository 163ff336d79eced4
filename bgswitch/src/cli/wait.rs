//! The long waits after a change (`--wait` on a watch, `--wait-drained`,
//! `--fleet-wait`) and how they report as they go (`Progress`: a line on a
//! terminal, plain lines otherwise, JSON events with `--json`).

use std::{path::Path, time::Duration};

use anyhow::anyhow;

use super::{call, exit};
use crate::{api::Request, model::Colour};

/// How a long wait reports as it goes: on a terminal one line rewritten
/// in place; otherwise a plain line when what it says changes (at most
/// every 10 s); with `--json` one JSON event per line on stdout, for
/// pipelines.
pub struct Progress {
    mode: ProgressMode,
    said: Option<(std::time::Instant, String)>,
}

enum ProgressMode {
    Tty,
    Plain,
    Json,
}

impl Progress {
    pub fn new(json: bool) -> Self {
        use std::io::IsTerminal as _;
        Self {
            mode: if json {
                ProgressMode::Json
            } else if std::io::stderr().is_terminal() {
                ProgressMode::Tty
            } else {
                ProgressMode::Plain
            },
            said: None,
        }
    }

    /// How it stands now (`text` for people, `event` for pipelines).
    pub fn update(&mut self, text: &str, event: serde_json::Value) {
        match self.mode {
            ProgressMode::Json => println!("{event}"),
            ProgressMode::Tty => eprint!("\r{text}\x1b[K"),
            ProgressMode::Plain => {
                let due = self.said.as_ref().is_none_or(|(at, last)| {
                    last != text && at.elapsed() >= Duration::from_secs(10)
                });
                if due {
                    eprintln!("{text}");
                    self.said = Some((std::time::Instant::now(), text.to_string()));
                }
            }
        }
    }

    /// The end of the wait: said once, on stdout (stderr for `failed`).
    pub fn finish(&mut self, text: &str, event: serde_json::Value, failed: bool) {
        match self.mode {
            ProgressMode::Json => println!("{event}"),
            ProgressMode::Tty | ProgressMode::Plain => {
                if matches!(self.mode, ProgressMode::Tty) && self.said.is_none() {
                    eprint!("\r\x1b[K");
                }
                if failed {
                    eprintln!("bgswitch: error: {text}");
                } else {
                    println!("{text}");
                }
            }
        }
    }
}

/// One service's status, as a wait polls it.
pub(crate) fn service_status(
    socket: &Path,
    service: &str,
) -> anyhow::Result<crate::api::ServiceStatus> {
    let resp = call(
        socket,
        &Request::Status {
            service: Some(service.to_string()),
        },
    )?;
    resp.status
        .and_then(|s| s.services.into_iter().next())
        .ok_or_else(|| {
            anyhow!(
                "no status for {service}: {}",
                resp.error.as_deref().unwrap_or("")
            )
        })
}

/// `flip --watch D --wait`: polls the service until its watch ends; exit 0
/// when it passed, 3 when it rolled the flip (generation `flipped`) back.
/// Shows the time left and the watched colour's signals (new flows, backend
/// RSTs, unanswered SYNs, health) as it goes.
pub(crate) fn wait_watch(
    socket: &Path,
    service: &str,
    flipped: u64,
    progress: &mut Progress,
) -> anyhow::Result<i32> {
    loop {
        let s = service_status(socket, service)?;
        let s = &s;
        let rolled_back = s.last_change.as_ref().is_some_and(|c| {
            c.kind == crate::model::ChangeKind::AutoRollback && c.generation_before >= flipped
        });
        if rolled_back {
            let why = s.rolled_back.clone().unwrap_or_default();
            progress.finish(
                &format!("{service}: ROLLED BACK by the watch: {why}"),
                serde_json::json!({"event": "rolled_back", "service": service, "active": s.active, "why": why}),
                true,
            );
            return Ok(exit::ROLLED_BACK);
        }
        match &s.watch {
            Some(w) if s.generation >= flipped => {
                let left = w.until_ms.saturating_sub(crate::state::now_ms()) / 1000;
                let c = s.colours.iter().find(|c| c.colour == w.colour);
                let (new, rsts, unanswered) = c.map_or((0, 0, 0), |c| {
                    (c.new_flows, c.backend_rsts, c.unanswered_syns)
                });
                let health = c.map_or(String::new(), |c| {
                    if s.health_checks {
                        format!(
                            ", health {}/{} up",
                            c.backends
                                .iter()
                                .filter(|b| b.health == crate::health::Health::Up)
                                .count(),
                            c.backends.len()
                        )
                    } else {
                        String::new()
                    }
                });
                progress.update(
                    &format!(
                        "{service}: watching {} — {left} s left; {new} new flows, {rsts} backend RSTs, {unanswered} unanswered SYNs{health}",
                        w.colour
                    ),
                    serde_json::json!({"event": "watch", "service": service, "colour": w.colour, "left_s": left,
                        "new_flows": new, "backend_rsts": rsts, "unanswered_syns": unanswered}),
                );
            }
            _ => {
                let text = if s.generation != flipped {
                    format!(
                        "{service}: the watch ended (generation {} now: changed since the flip)",
                        s.generation
                    )
                } else {
                    format!("{service}: the watch passed; {} stays", s.active)
                };
                progress.finish(
                    &text,
                    serde_json::json!({"event": "watch_passed", "service": service, "active": s.active, "generation": s.generation}),
                    false,
                );
                return Ok(exit::SUCCESS);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the fleet until every live host has applied `generation` of
/// `service` (exit 0), or `within` passes (exit 1, naming those that
/// have not).
pub(crate) fn wait_fleet(
    socket: &Path,
    service: &str,
    generation: u64,
    within: Duration,
) -> anyhow::Result<i32> {
    let start = std::time::Instant::now();
    loop {
        let resp = call(socket, &Request::Fleet)?;
        let Some(f) = resp.fleet else {
            return Err(anyhow!(
                "--fleet-wait: {}",
                resp.error.as_deref().unwrap_or("no fleet status")
            ));
        };
        let behind = f.behind(service, generation);
        if behind.is_empty() {
            println!(
                "{service}: generation {generation} applied by every live host ({}) after {:.3} s",
                f.hosts.iter().filter(|h| h.live).count(),
                start.elapsed().as_secs_f64()
            );
            return Ok(0);
        }
        if start.elapsed() >= within {
            eprintln!(
                "bgswitch: error: {service}: generation {generation} not applied within {within:?} by: {}",
                behind.join(", ")
            );
            return Ok(exit::TIMED_OUT);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls status until `colour` of `service` has no live flows.
pub(crate) fn wait_drained(
    socket: &Path,
    service: &str,
    colour: Colour,
    timeout: Duration,
    progress: &mut Progress,
) -> anyhow::Result<i32> {
    let start = std::time::Instant::now();
    loop {
        let (live, untracked) = service_status(socket, service)?
            .colours
            .iter()
            .find(|c| c.colour == colour)
            .map(|c| (c.live_flows, c.untracked))
            .ok_or_else(|| anyhow!("no status for {service}'s {colour}"))?;
        let elapsed = start.elapsed().as_secs_f64();
        if live == 0 && !untracked {
            progress.finish(
                &format!("{service}: {colour} drained after {elapsed:.1}s"),
                serde_json::json!({"event": "drained", "service": service, "colour": colour, "after_s": elapsed}),
                false,
            );
            return Ok(0);
        }
        if start.elapsed() >= timeout {
            let text = if untracked {
                format!(
                    "{service}: {colour} may still have connections of its stateless period after {timeout:?} ({live} recorded live): it is drained once the transition is over, a TCP idle timeout after the change"
                )
            } else {
                format!("{service}: {live} flows still live on {colour} after {timeout:?}")
            };
            progress.finish(
                &text,
                serde_json::json!({"event": "drain_timed_out", "service": service, "colour": colour, "live_flows": live}),
                true,
            );
            return Ok(exit::TIMED_OUT);
        }
        progress.update(
            &format!(
                "{service}: draining {colour}: {live} live flow{}{} ({elapsed:.0} s)",
                if live == 1 { "" } else { "s" },
                if untracked { " (and its stateless period's)" } else { "" }
            ),
            serde_json::json!({"event": "draining", "service": service, "colour": colour, "live_flows": live, "elapsed_s": elapsed}),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
