//! The data plane's clock: flow times are kernel ticks (`jiffies`), and
//! the flow timeouts in `SETTINGS` are converted to them.

use std::time::Duration;

use aya::{
    maps::{Array, MapData},
    programs::{TestRun as _, TestRunOptions},
    Ebpf,
};
use bgswitch_common::{maps as names, Settings};

use super::{map_err, Dataplane, DataplaneError, Result};

/// The kernel's tick rate, once known in this process (see
/// `Clock::measure_hz`, `assume_hz`).
static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

/// The tick rates a kernel can be built with (CONFIG_HZ).
pub const CONFIG_HZ: [u64; 14] = [
    24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200,
];

/// Takes `hz` as the kernel's tick rate instead of measuring it (250 ms) at
/// the next `Dataplane::load`: a rate measured earlier in this boot (it is
/// fixed at boot). Refused (false) if it is not a rate a kernel can be
/// built with, or another is known already.
pub fn assume_hz(hz: u64) -> bool {
    CONFIG_HZ.contains(&hz) && *HZ.get_or_init(|| hz) == hz
}

/// The data plane's clock: flow times are kernel ticks (`jiffies`), which
/// the XDP program reads for ~2 ns. The clock program reads `jiffies` and
/// CLOCK_MONOTONIC side by side; the tick rate is measured from two such
/// readings 250 ms apart, once per process.
pub(super) struct Clock {
    out: Array<MapData, u64>,
    pub(super) hz: u64,
}

impl Clock {
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<Self> {
        let program: &mut aya::programs::SocketFilter = ebpf
            .program_mut(bgswitch_common::CLOCK_PROGRAM_NAME)
            .ok_or_else(|| {
                DataplaneError::Invalid(format!(
                    "no program {} in the object",
                    bgswitch_common::CLOCK_PROGRAM_NAME
                ))
            })?
            .try_into()?;
        program.load()?;
        let out = Array::try_from(
            ebpf.take_map(names::CLOCK)
                .ok_or(DataplaneError::MissingMap(names::CLOCK))?,
        )
        .map_err(map_err(names::CLOCK, "open"))?;
        let mut clock = Self { out, hz: 0 };
        clock.hz = clock.measure_hz(ebpf)?;
        Ok(clock)
    }

    /// `(jiffies, CLOCK_MONOTONIC ns)`, read together in the kernel.
    fn sample(&self, ebpf: &Ebpf) -> Result<(u64, u64)> {
        let program: &aya::programs::SocketFilter = ebpf
            .program(bgswitch_common::CLOCK_PROGRAM_NAME)
            .ok_or(DataplaneError::Invalid("the clock program is gone".into()))?
            .try_into()?;
        let frame = [0u8; 64];
        program.test_run(TestRunOptions {
            data_in: Some(&frame),
            repeat: 1,
            ..TestRunOptions::new()
        })?;
        let j = self.out.get(&0, 0).map_err(map_err(names::CLOCK, "get"))?;
        let ns = self.out.get(&1, 0).map_err(map_err(names::CLOCK, "get"))?;
        Ok((j, ns))
    }

    /// Ticks per second. Each sample reads `jiffies` and CLOCK_MONOTONIC in
    /// one program run, so a pair is consistent whatever the scheduler does
    /// to this thread; two pairs 250 ms apart give the rate to about one
    /// tick in 25 (at HZ 100), snapped to the nearest rate the kernel can
    /// be built with when within 3 % of it. Measured once per process (the
    /// rate is fixed at boot).
    fn measure_hz(&self, ebpf: &Ebpf) -> Result<u64> {
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, t0) = self.sample(ebpf)?;
        std::thread::sleep(Duration::from_millis(250));
        let (j1, t1) = self.sample(ebpf)?;
        if j1 <= j0 || t1 <= t0 {
            return Err(DataplaneError::Invalid(
                "the kernel tick (jiffies) did not advance in 250 ms".into(),
            ));
        }
        let measured = (j1 - j0) as f64 * 1e9 / (t1 - t0) as f64;
        let nearest = CONFIG_HZ
            .iter()
            .copied()
            .min_by(|a, b| {
                (*a as f64 - measured)
                    .abs()
                    .total_cmp(&(*b as f64 - measured).abs())
            })
            .unwrap_or(1000);
        let hz = if (nearest as f64 - measured).abs() <= 0.03 * nearest as f64 {
            nearest
        } else {
            measured.round() as u64
        };
        if !(10..=10_000).contains(&hz) {
            return Err(DataplaneError::Invalid(format!(
                "measured a kernel tick rate of {measured:.1} Hz, which cannot be right"
            )));
        }
        Ok(*HZ.get_or_init(|| hz))
    }

    /// A duration in ticks, rounded up.
    pub(super) fn ticks(&self, d: Duration) -> u64 {
        (d.as_nanos() * u128::from(self.hz)).div_ceil(1_000_000_000) as u64
    }
}

impl Dataplane {
    /// The refresh of flow entries and next hops, in ticks (see
    /// `Settings::refresh`).
    pub fn refresh_ticks(&self) -> u64 {
        self.clock
            .ticks(Duration::from_millis(bgswitch_common::REFRESH_MS))
            .max(1)
    }

    /// The kernel's tick rate (HZ), as measured at load.
    pub fn hz(&self) -> u64 {
        self.clock.hz
    }

    /// The data plane's clock now (`jiffies`).
    pub fn jiffies(&self) -> Result<u64> {
        Ok(self.clock.sample(&self.ebpf)?.0)
    }

    /// Sets the flow timeouts.
    pub fn set_settings(&mut self, udp_idle: Duration, tcp_idle: Duration) -> Result<()> {
        let refresh = self.refresh_ticks();
        // At least one tick longer than the refresh: a flow the per-CPU
        // cache serves (last seen at most `refresh` ago) is never idle.
        let s = Settings {
            udp_idle: self.clock.ticks(udp_idle).max(refresh + 1),
            tcp_idle: self.clock.ticks(tcp_idle).max(refresh + 1),
            refresh,
            cache_shift: 32 - self.cache_slots.trailing_zeros(),
            stateless: u8::from(self.any_stable()),
            backend_hops: u8::from(self.backend_hops),
            half_shift: (32 - self.half_buckets.trailing_zeros()) as u8,
            _pad: 0,
        };
        self.settings
            .set(0, s, 0)
            .map_err(map_err(names::SETTINGS, "set"))?;
        self.settings_now = Some(s);
        Ok(())
    }

    /// The `SETTINGS` entry as the program reads it.
    pub fn settings(&self) -> Result<Settings> {
        self.settings
            .get(&0, 0)
            .map_err(map_err(names::SETTINGS, "get"))
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
