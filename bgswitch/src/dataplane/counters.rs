//! The program's counters, summed over CPUs: per colour, per backend, and
//! the global ones.

use bgswitch_common::{global, maps as names, BackendStats, ColourStats, MAX_BACKENDS};

use super::{map_err, services::backend_stat_id, Dataplane, Result};
use crate::model::Colour;

impl Dataplane {
    /// Counters of one colour of a service, summed over CPUs: its traffic
    /// the sum of its backend positions' counters (the program counts a
    /// packet once, in its backend's slot), its RSTs and SYN-ACKs its own.
    pub fn colour_stats(&self, id: u32, colour: Colour) -> Result<ColourStats> {
        let v = self
            .service_stats
            .get(&(id * 2 + colour.index()), 0)
            .map_err(map_err(names::SERVICE_STATS, "get"))?;
        let mut a = v.iter().fold(ColourStats::default(), |mut a, s| {
            a.backend_rsts += s.backend_rsts;
            a.syn_acks += s.syn_acks;
            a
        });
        for i in 0..MAX_BACKENDS {
            let b = self.backend_stats(backend_stat_id(id, colour, i))?;
            a.packets += b.packets;
            a.bytes += b.bytes;
            a.new_flows += b.new_flows;
            a.reply_packets += b.reply_packets;
            a.reply_bytes += b.reply_bytes;
        }
        Ok(a)
    }

    /// Counters of one backend, summed over CPUs.
    pub fn backend_stats(&self, stat_id: u32) -> Result<BackendStats> {
        let v = self
            .backend_stats
            .get(&stat_id, 0)
            .map_err(map_err(names::BACKEND_STATS, "get"))?;
        Ok(v.iter().fold(BackendStats::default(), |mut a, s| {
            a.packets += s.packets;
            a.bytes += s.bytes;
            a.new_flows += s.new_flows;
            a.reply_packets += s.reply_packets;
            a.reply_bytes += s.reply_bytes;
            a
        }))
    }

    /// One global counter (`bgswitch_common::global::NAMES`), summed over
    /// CPUs; `None` for a name that is not a counter.
    pub fn global_stat(&self, name: &str) -> Result<Option<u64>> {
        let i = global::NAMES.iter().position(|n| *n == name);
        Ok(match i {
            None => None,
            Some(i) => Some(
                self.global_stats
                    .get(&0, 0)
                    .map_err(map_err(names::GLOBAL_STATS, "get"))?
                    .iter()
                    .map(|c| c[i])
                    .sum(),
            ),
        })
    }

    /// The global counters, summed over CPUs, with their names.
    pub fn global_stats(&self) -> Result<Vec<(&'static str, u64)>> {
        let per_cpu = self
            .global_stats
            .get(&0, 0)
            .map_err(map_err(names::GLOBAL_STATS, "get"))?;
        Ok(global::NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, per_cpu.iter().map(|c| c[i]).sum()))
            .collect())
    }
}
