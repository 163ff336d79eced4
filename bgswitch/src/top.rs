//! `bgswitch top`: every service live, refreshed each second, over the
//! control socket (no privilege beyond the socket's group): the active
//! colour, per colour packets/s, new flows/s, live flows, backend RSTs/s
//! and unanswered SYNs, backend health, and the guards running (a watch or
//! a confirmation deadline with the time left, a canary share). `q`, Esc
//! or Ctrl-C quits. Rates come from the difference of two status answers.

use std::{
    collections::HashMap,
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use anyhow::bail;
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyModifiers},
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Paragraph, Row, Table},
    Frame,
};

use crate::{
    api::{ServiceStatus, Status},
    model::Colour,
};

/// Counters of one colour at one time.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    packets: u64,
    new_flows: u64,
    rsts: u64,
}

/// Runs the view until `q`; `fetch` asks the daemon for its status.
pub fn run(
    mut fetch: impl FnMut() -> anyhow::Result<Status>,
    every: Duration,
) -> anyhow::Result<i32> {
    if !std::io::stdout().is_terminal() {
        bail!("`bgswitch top` needs a terminal; for pipelines use `bgswitch status --json`");
    }
    let mut terminal = ratatui::init();
    let mut last: HashMap<(String, Colour), Sample> = HashMap::new();
    let result = (|| -> anyhow::Result<i32> {
        loop {
            let (status, error) = match fetch() {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            let mut rates: HashMap<(String, Colour), (f64, f64, f64)> = HashMap::new();
            if let Some(s) = &status {
                let now = Instant::now();
                for svc in &s.services {
                    for c in &svc.colours {
                        let key = (svc.name.clone(), c.colour);
                        let sample = Sample {
                            at: now,
                            packets: c.packets + c.reply_packets,
                            new_flows: c.new_flows,
                            rsts: c.backend_rsts,
                        };
                        if let Some(p) = last.get(&key) {
                            let dt = (now - p.at).as_secs_f64().max(1e-3);
                            let d = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                            rates.insert(
                                key.clone(),
                                (
                                    d(sample.packets, p.packets),
                                    d(sample.new_flows, p.new_flows),
                                    d(sample.rsts, p.rsts),
                                ),
                            );
                        }
                        last.insert(key, sample);
                    }
                }
            }
            terminal.draw(|f| draw(f, status.as_ref(), &rates, error.as_deref()))?;
            let deadline = Instant::now() + every;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                            return Ok(0);
                        }
                    }
                } else {
                    break;
                }
            }
        }
    })();
    ratatui::restore();
    result
}

fn guard(svc: &ServiceStatus) -> String {
    let now = crate::state::now_ms();
    let mut parts = Vec::new();
    if let Some(w) = &svc.watch {
        parts.push(format!(
            "watch {} {} s left",
            w.colour,
            w.until_ms.saturating_sub(now) / 1000
        ));
    }
    if let Some(c) = &svc.confirm {
        parts.push(format!(
            "CONFIRM {} within {} s",
            c.colour,
            c.deadline_ms.saturating_sub(now) / 1000
        ));
    }
    if svc.canary_percent > 0.0 {
        parts.push(format!(
            "canary {:.2}% → {}",
            svc.canary_percent,
            svc.active.other()
        ));
    }
    if !svc.preview.is_empty() {
        parts.push(format!("preview {}", svc.preview.len()));
    }
    if svc.rolled_back.is_some() {
        parts.push("ROLLED BACK".into());
    }
    parts.join(", ")
}

fn draw(
    f: &mut Frame,
    status: Option<&Status>,
    rates: &HashMap<(String, Colour), (f64, f64, f64)>,
    error: Option<&str>,
) {
    let area = f.area();
    let t = crate::state::now_ms() / 1000 % 86400;
    let title = format!(
        " bgswitch top — {:02}:{:02}:{:02} UTC — q quits ",
        t / 3600,
        t % 3600 / 60,
        t % 60
    );
    let Some(s) = status else {
        f.render_widget(
            Paragraph::new(format!(
                "the daemon does not answer: {}",
                error.unwrap_or("")
            ))
            .block(Block::bordered().title(title)),
            area,
        );
        return;
    };
    let header = Row::new([
        "SERVICE",
        "COLOUR",
        "PKT/S",
        "NEW/S",
        "LIVE",
        "RST/S",
        "UNANS.SYN",
        "HEALTH",
        "GUARDS",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let mut rows = Vec::new();
    for svc in &s.services {
        for c in &svc.colours {
            let (pps, nps, rps) = rates
                .get(&(svc.name.clone(), c.colour))
                .copied()
                .unwrap_or_default();
            let up = c
                .backends
                .iter()
                .filter(|b| b.health == crate::health::Health::Up)
                .count();
            let health = if svc.health_checks {
                format!("{up}/{} up", c.backends.len())
            } else {
                format!("{} (no checks)", c.backends.len())
            };
            let row = Row::new(vec![
                if c.colour == Colour::Blue {
                    svc.name.clone()
                } else {
                    String::new()
                },
                format!("{}{}", if c.active { "*" } else { " " }, c.colour),
                format!("{pps:.0}"),
                format!("{nps:.1}"),
                c.live_flows.to_string(),
                format!("{rps:.1}"),
                c.unanswered_syns.to_string(),
                health,
                if c.colour == Colour::Blue {
                    guard(svc)
                } else {
                    String::new()
                },
            ]);
            rows.push(if c.active {
                row.style(Style::default().add_modifier(Modifier::BOLD))
            } else {
                row
            });
        }
    }
    let widths = [
        Constraint::Length(16),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(14),
        Constraint::Min(20),
    ];
    let mut title = title;
    if let Some(fl) = &s.fleet {
        title += &format!(
            "— fleet {} ({}): etcd {} ",
            fl.cluster,
            fl.host,
            if fl.reachable { "ok" } else { "UNREACHABLE" }
        );
    }
    f.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(title)),
        area,
    );
}
