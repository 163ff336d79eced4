//! The control socket's protocol: one JSON object per line each way.
//!
//! A client writes a [`Request`] line and reads a [`Response`] line; it may
//! send several requests on one connection. Lines longer than
//! [`MAX_REQUEST_BYTES`] are refused.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    dataplane::AttachMode,
    model::{Change, Colour},
};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A request to the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// New flows of `service` go to `to` (default: the other colour).
    Flip {
        service: String,
        #[serde(default)]
        to: Option<Colour>,
        /// Move open flows too.
        #[serde(default)]
        force: bool,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Back to the colour before the last flip.
    Rollback {
        service: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// The state of one or all services, interfaces and counters.
    Status {
        #[serde(default)]
        service: Option<String>,
    },
    /// Re-read the config file; a bad one changes nothing.
    Reload,
    /// Remove the XDP programs and every pin, then exit.
    Detach,
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// One line saying what went wrong (when `ok` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One line saying what happened (when `ok` is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self {
            ok: true,
            message: Some(message.into()),
            ..Self::default()
        }
    }
    pub fn error(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::default()
        }
    }
}

/// Everything `bgswitch status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub interfaces: Vec<InterfaceStatus>,
    /// Global data plane counters (passed, malformed, fragments, FIB outcomes, …).
    pub counters: BTreeMap<String, u64>,
    pub config: String,
    pub pid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub active: Colour,
    pub generation: u64,
    pub previous: Option<Colour>,
    pub colours: Vec<ColourStatus>,
    pub last_change: Option<Change>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColourStatus {
    pub colour: Colour,
    pub active: bool,
    pub backends: Vec<BackendStatus>,
    /// Open flows pinned to this colour, counted in the kernel's flow table.
    pub live_flows: u64,
    /// Flow records in the table (live or finished but not yet evicted).
    pub recorded_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub backend_rsts: u64,
    pub syn_acks: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    pub adopted: bool,
    pub fallback_reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_input_is_refused() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"flip","service":"web","to":"green"}"#).unwrap();
        assert_eq!(
            r,
            Request::Flip {
                service: "web".into(),
                to: Some(Colour::Green),
                force: false,
                reason: None
            }
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"flip"}"#,
            r#"{"cmd":"flip","service":"web","to":"red"}"#,
            r#"{"cmd":"status","extra":1}"#,
            r#"not json"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
