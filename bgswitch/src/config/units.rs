//! The units a config value is written in: durations ("30s", "1h",
//! "250ms"), sizes (bytes, or KiB/MiB/GiB) and endpoints (address:port).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// Parses a size in bytes: "65536", "512KiB", "64MiB", "1GiB".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("'{text}' is not a size like 65536, 512KiB, 64MiB or 1GiB");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses "250ms", "1s", "1.5s", "2m", "1h".
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("'{text}' has no unit (ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 250ms, 30s, 5m, 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (ms, s, m, h)")),
    };
    if !secs.is_finite() || secs > 7.0 * 86400.0 {
        return Err(format!("'{text}' is longer than 7 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(super) fn endpoint(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!(
            "'{text}' is not ADDRESS:PORT (e.g. 198.18.1.11:8080, or [2001:db8::11]:8080 for IPv6)"
        )
    })?;
    if addr.port() == 0 {
        return Err(format!("'{text}': port 0 is not a service port"));
    }
    match addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() || a.is_broadcast() || a.is_multicast() => {
            Err(format!("'{text}': {a} cannot be a unicast endpoint"))
        }
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => {
            Err(format!("'{text}': {a} cannot be a unicast endpoint"))
        }
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Err(format!(
            "'{text}': {a} is an IPv4-mapped address, which never appears on the wire: \
             write the IPv4 address"
        )),
        IpAddr::V6(a) if a.is_unicast_link_local() => Err(format!(
            "'{text}': {a} is link-local: give a global or unique-local address (a \
             link-local one needs an interface, and forwarded packets cannot use it)"
        )),
        IpAddr::V6(_) if matches!(addr, SocketAddr::V6(v6) if v6.scope_id() != 0) => {
            Err(format!("'{text}': give the address without a zone (%…)"))
        }
        _ => Ok(addr),
    }
}
