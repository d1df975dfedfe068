//! The pure part of the operator endpoints (`docs/patroni-compat.md` §2.6): body validation with
//! Patroni's messages and status codes, the `PATCH /config` merge, the switchover feasibility
//! rules that do not need the network, and the interpretation of the DCS while a switchover is
//! polled. The handlers in `routes.rs` add the I/O.

mod config_patch;
mod failover;
mod restart;
mod values;

pub use config_patch::{deep_compare, patch_config};
pub use failover::*;
pub use restart::validate_restart;
pub use values::*;

/// What the validators' tests share: a fixed "now" and JSON bodies.
#[cfg(test)]
mod fixtures {
    use chrono::{DateTime, TimeZone, Utc};
    use serde_json::{Map, Value};

    pub fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap()
    }

    pub fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }
}
