//! The flow table under pressure, told to the operator: packets of open
//! TCP connections that found no record (evicted by more open flows than
//! `max_flows`, or older than the table), and half-open records that never
//! completed (a SYN flood, or connection attempts nobody answered). Both
//! are counters in `status` and `/metrics` (`record_missing`, `half_open`,
//! `promoted`); this turns their growth into a warning at most once a
//! minute.

use std::time::{Duration, Instant};

use super::Daemon;

/// Fewest seconds between two warnings of one kind.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Half-open records that did not complete within one check, above which
/// they are worth a warning (honest handshakes complete within a check).
const FLOOD_WARN: u64 = 1000;

/// The counters as last read, and when each warning last went out.
#[derive(Default)]
pub(super) struct Pressure {
    last: Option<(u64, u64, u64)>,
    missing_warned: Option<Instant>,
    flood_warned: Option<Instant>,
}

impl Pressure {
    /// The warnings the counters' growth since the last reading calls for.
    /// `now` is when they were read.
    fn read(
        &mut self,
        missing: u64,
        half: u64,
        promoted: u64,
        now: Instant,
        max_flows: u32,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        let Some((m0, h0, p0)) = self.last.replace((missing, half, promoted)) else {
            return notes;
        };
        let due = |at: Option<Instant>| at.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        let lost = missing.saturating_sub(m0);
        if lost > 0 && due(self.missing_warned) {
            self.missing_warned = Some(now);
            notes.push(format!(
                "{lost} packet(s) of open TCP connections found no flow record in the last second \
                 (counter record_missing): their records were evicted, because more flows are \
                 open than max_flows = {max_flows}, or the connections are older than the table; \
                 such a connection goes to the active colour, which breaks it if it was draining \
                 on the other one: raise max_flows"
            ));
        }
        let stale = half
            .saturating_sub(h0)
            .saturating_sub(promoted.saturating_sub(p0));
        if stale >= FLOOD_WARN && due(self.flood_warned) {
            self.flood_warned = Some(now);
            notes.push(format!(
                "{stale} new TCP flows in the last second did not complete their handshake \
                 (counters half_open, promoted): a SYN flood, or clients nobody answers; they \
                 churn the half-open table only, established connections keep their records"
            ));
        }
        notes
    }
}

impl Daemon {
    /// Once a second: reads the counters and warns as `Pressure` says.
    pub(super) fn check_pressure(&mut self) {
        let dp = &self.dataplane;
        let get = |name: &str| dp.global_stat(name).ok().flatten().unwrap_or(0);
        let notes = self.pressure.read(
            get("record_missing"),
            get("half_open"),
            get("promoted"),
            Instant::now(),
            self.config.max_flows,
        );
        for note in notes {
            log::warn!("{note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_warned_once_a_minute_and_a_first_reading_is_only_a_baseline() {
        let t0 = Instant::now();
        let mut p = Pressure::default();
        assert!(
            p.read(500, 50_000, 0, t0, 1024).is_empty(),
            "the first reading"
        );
        let notes = p.read(501, 52_000, 10, t0 + Duration::from_secs(1), 1024);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].starts_with("1 packet(s)") && notes[0].contains("max_flows = 1024"));
        assert!(notes[1].starts_with("1990 new TCP flows"), "{notes:?}");
        // Within the minute: nothing, though both grew.
        assert!(p
            .read(600, 60_000, 20, t0 + Duration::from_secs(30), 1024)
            .is_empty());
        // Honest handshakes (all completed) and no missing record: nothing.
        let quiet = p.read(600, 70_000, 10_020, t0 + Duration::from_secs(120), 1024);
        assert!(quiet.is_empty(), "{quiet:?}");
        let again = p.read(601, 70_000, 10_020, t0 + Duration::from_secs(121), 1024);
        assert_eq!(again.len(), 1, "{again:?}");
    }
}
