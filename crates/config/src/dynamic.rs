//! The dynamic configuration (`docs/patroni-compat.md` §3.3): the DCS `config` key, or
//! `bootstrap.dcs` before the cluster exists. Values other implementations wrote are read
//! leniently: a bad value is a warning and the default is used, never an error. `bootstrap.dcs` in
//! the local file is checked strictly at load time instead (see `parse.rs`).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::error::ConfigError;
use crate::model::Config;
use crate::parse_pg::{KNOWN_PG_KEYS, LOCAL_ONLY_PG_KEYS, parse_role_overrides};
use crate::postgresql::RoleOverrides;
use crate::walk::{Ctx, Obj, as_bool, describe, parse_bool_str};
use crate::yaml::Origins;

/// `synchronous_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// `off`/`false` (default): asynchronous replication.
    #[default]
    Off,
    /// `on`/`true`: classic synchronous mode.
    On,
    /// `quorum`: quorum commit (`ANY n (...)`), PostgreSQL ≥ 10.
    Quorum,
}

impl SyncMode {
    /// Whether any synchronous mode is on.
    pub fn is_enabled(self) -> bool {
        self != SyncMode::Off
    }
}

/// `standby_cluster`: this cluster replicates from another one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StandbyClusterConfig {
    /// `host` of the remote primary (or a proxy).
    pub host: Option<String>,
    /// `port` of the remote primary.
    pub port: Option<u16>,
    /// `primary_slot_name` to stream from (only if set).
    pub primary_slot_name: Option<String>,
    /// `create_replica_methods` used to clone from the remote cluster.
    pub create_replica_methods: Vec<String>,
    /// `restore_command` for archive recovery.
    pub restore_command: Option<String>,
    /// `archive_cleanup_command`.
    pub archive_cleanup_command: Option<String>,
    /// `recovery_min_apply_delay`.
    pub recovery_min_apply_delay: Option<String>,
}

impl StandbyClusterConfig {
    /// A standby cluster is configured iff one of `host`, `port`, `restore_command` is set.
    pub fn is_active(&self) -> bool {
        self.host.as_deref().is_some_and(|h| !h.is_empty())
            || self.port.is_some()
            || self.restore_command.as_deref().is_some_and(|c| !c.is_empty())
    }

    /// `host:port` of the remote primary to stream from (`port` defaults to 5432, as libpq's),
    /// `None` for archive recovery only.
    pub fn remote(&self) -> Option<(String, u16)> {
        Some((self.host.clone()?, self.port.unwrap_or(5432)))
    }
}

/// The dynamic configuration after defaults and the §3.4 timing rule.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicConfig {
    /// `ttl` (default 30, min 20): leader lease lifetime in seconds.
    pub ttl: u64,
    /// `loop_wait` (default 10, min 1): HA cycle period in seconds.
    pub loop_wait: u64,
    /// `retry_timeout` (default 10, min 3): deadline for DCS operations in seconds.
    pub retry_timeout: u64,
    /// `maximum_lag_on_failover` (default 1048576): bytes a replica may lag and still race.
    pub maximum_lag_on_failover: u64,
    /// `maximum_lag_on_syncnode` (default -1): bytes a sync standby may lag before being
    /// replaced; ≤ 0 disables.
    pub maximum_lag_on_syncnode: i64,
    /// `max_timelines_history` (default 0 = all): entries kept in `history`.
    pub max_timelines_history: u64,
    /// `primary_start_timeout` (alias `master_start_timeout`, default 300).
    pub primary_start_timeout: u64,
    /// `primary_stop_timeout` (alias `master_stop_timeout`, default 0).
    pub primary_stop_timeout: u64,
    /// `primary_race_backoff` (default 0).
    pub primary_race_backoff: u64,
    /// `synchronous_mode` (default off).
    pub synchronous_mode: SyncMode,
    /// `synchronous_mode_strict` (default false).
    pub synchronous_mode_strict: bool,
    /// `synchronous_node_count` (default 1, min 1).
    pub synchronous_node_count: u64,
    /// `failsafe_mode` (default false).
    pub failsafe_mode: bool,
    /// `check_timeline` (default false).
    pub check_timeline: bool,
    /// `pause` (default false): maintenance mode.
    pub pause: bool,
    /// `member_slots_ttl` (default 1800 s; units allowed: `30min`).
    pub member_slots_ttl: u64,
    /// `postgresql.use_pg_rewind` (default false; a local value overrides it).
    pub use_pg_rewind: bool,
    /// `postgresql.use_slots` (default true; only this dynamic value counts).
    pub use_slots: bool,
    /// `postgresql.parameters` as written (validated later by [`crate::effective_parameters`]).
    pub parameters: BTreeMap<String, Value>,
    /// `postgresql.pg_hba`.
    pub pg_hba: Option<Vec<String>>,
    /// `postgresql.pg_ident`.
    pub pg_ident: Option<Vec<String>>,
    /// `postgresql.parameters_<role>` / `pg_hba_<role>` / `pg_ident_<role>`.
    pub role_overrides: BTreeMap<String, RoleOverrides>,
    /// `postgresql.recovery_conf`.
    pub recovery_conf: BTreeMap<String, Value>,
    /// `slots` (also read: `permanent_slots`, `permanent_replication_slots`): permanent slots.
    pub permanent_slots: Map<String, Value>,
    /// `ignore_slots`: matchers of slots never dropped.
    pub ignore_slots: Vec<Value>,
    /// `standby_cluster`, when present and active.
    pub standby_cluster: Option<StandbyClusterConfig>,
    /// `pgvigil`: how fast a dead leader or synchronous standby is noticed (pgvigil only).
    pub liveness: crate::liveness::Liveness,
    /// The value as read, unadjusted (what is stored in the DCS).
    pub raw: Value,
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            ttl: 30,
            loop_wait: 10,
            retry_timeout: 10,
            maximum_lag_on_failover: 1_048_576,
            maximum_lag_on_syncnode: -1,
            max_timelines_history: 0,
            primary_start_timeout: 300,
            primary_stop_timeout: 0,
            primary_race_backoff: 0,
            synchronous_mode: SyncMode::Off,
            synchronous_mode_strict: false,
            synchronous_node_count: 1,
            failsafe_mode: false,
            check_timeline: false,
            pause: false,
            member_slots_ttl: 1800,
            use_pg_rewind: false,
            use_slots: true,
            parameters: BTreeMap::new(),
            pg_hba: None,
            pg_ident: None,
            role_overrides: BTreeMap::new(),
            recovery_conf: BTreeMap::new(),
            permanent_slots: Map::new(),
            ignore_slots: Vec::new(),
            standby_cluster: None,
            liveness: Default::default(),
            raw: Value::Object(Map::new()),
        }
    }
}

impl DynamicConfig {
    /// Reads a dynamic configuration (DCS `config` value) leniently: defaults for absent keys,
    /// a warning and the default for bad values, warnings for unknown keys, then the §3.4
    /// timing rule (with a warning when it changes something).
    pub fn from_json(v: &Value) -> (DynamicConfig, Vec<String>) {
        let mut ctx = Ctx::new(Origins::new("dynamic configuration"));
        ctx.lenient = true;
        let Some(map) = v.as_object() else {
            let d = DynamicConfig {
                raw: v.clone(),
                ..DynamicConfig::default()
            };
            let msg = format!(
                "dynamic configuration: expected a JSON object, found {}; using defaults",
                describe(v)
            );
            return (d, vec![msg]);
        };
        match parse_dynamic(Obj::new("", Some(map)), &mut ctx) {
            Ok(d) => (d, ctx.warnings),
            Err(e) => {
                let d = DynamicConfig {
                    raw: v.clone(),
                    ..DynamicConfig::default()
                };
                ctx.warnings.push(format!("{e}; using defaults"));
                (d, ctx.warnings)
            }
        }
    }
}

impl Config {
    /// Whether pg_rewind may be used: the local `postgresql.use_pg_rewind` if set, else the
    /// dynamic one.
    pub fn use_pg_rewind(&self, dynamic: &DynamicConfig) -> bool {
        self.postgresql.use_pg_rewind.unwrap_or(dynamic.use_pg_rewind)
    }

    /// The `pg_hba.conf` lines to manage, if any: local `postgresql.pg_hba`, else the dynamic one.
    pub fn pg_hba<'a>(&'a self, dynamic: &'a DynamicConfig) -> Option<&'a [String]> {
        self.postgresql.pg_hba.as_deref().or(dynamic.pg_hba.as_deref())
    }

    /// The `pg_ident.conf` lines to manage, if any: local, else dynamic.
    pub fn pg_ident<'a>(&'a self, dynamic: &'a DynamicConfig) -> Option<&'a [String]> {
        self.postgresql
            .pg_ident
            .as_deref()
            .or(dynamic.pg_ident.as_deref())
    }
}

/// Keys of the dynamic configuration besides `postgresql` that pgvigil understands.
const KNOWN_TOP: &[&str] = &[
    "ttl",
    "loop_wait",
    "retry_timeout",
    "maximum_lag_on_failover",
    "maximum_lag_on_syncnode",
    "max_timelines_history",
    "primary_start_timeout",
    "master_start_timeout",
    "primary_stop_timeout",
    "master_stop_timeout",
    "primary_race_backoff",
    "synchronous_mode",
    "synchronous_mode_strict",
    "synchronous_node_count",
    "failsafe_mode",
    "check_timeline",
    "pause",
    "member_slots_ttl",
    "slots",
    "permanent_slots",
    "permanent_replication_slots",
    "ignore_slots",
    "standby_cluster",
    "postgresql",
    "pgvigil",
];

/// Whether `key` is a top-level dynamic configuration key.
pub(crate) fn is_dynamic_key(key: &str) -> bool {
    KNOWN_TOP.contains(&key)
}

/// Reads a dynamic configuration mapping. In strict mode (bootstrap.dcs) bad types are errors;
/// in lenient mode they are warnings.
pub(crate) fn parse_dynamic(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<DynamicConfig, ConfigError> {
    let mut d = DynamicConfig {
        raw: Value::Object(o.object_ref().cloned().unwrap_or_default()),
        ..DynamicConfig::default()
    };
    let ttl = o.i64(ctx, "ttl")?.unwrap_or(30);
    let loop_wait = o.i64(ctx, "loop_wait")?.unwrap_or(10);
    let retry_timeout = o.i64(ctx, "retry_timeout")?.unwrap_or(10);
    let (t, l, r, notes) = timing_rule(ttl, loop_wait, retry_timeout);
    (d.ttl, d.loop_wait, d.retry_timeout) = (t, l, r);
    for note in notes {
        ctx.warn(&o.path, note);
    }
    if let Some(v) = o.u64(ctx, "maximum_lag_on_failover")? {
        d.maximum_lag_on_failover = v;
    }
    if let Some(v) = o.i64_min(ctx, "maximum_lag_on_syncnode", -1)? {
        d.maximum_lag_on_syncnode = v;
    }
    if let Some(v) = o.u64(ctx, "max_timelines_history")? {
        d.max_timelines_history = v;
    }
    let start = o.u64(ctx, "primary_start_timeout")?;
    let legacy_start = o.u64(ctx, "master_start_timeout")?;
    if let Some(v) = start.or(legacy_start) {
        d.primary_start_timeout = v;
    }
    let stop = o.u64(ctx, "primary_stop_timeout")?;
    let legacy_stop = o.u64(ctx, "master_stop_timeout")?;
    if let Some(v) = stop.or(legacy_stop) {
        d.primary_stop_timeout = v;
    }
    if let Some(v) = o.u64(ctx, "primary_race_backoff")? {
        d.primary_race_backoff = v;
    }
    if let Some(v) = o.raw("synchronous_mode") {
        let mode = match v {
            Value::String(s) if s.trim().eq_ignore_ascii_case("quorum") => Some(SyncMode::Quorum),
            Value::String(s) => parse_bool_str(s).map(|b| if b { SyncMode::On } else { SyncMode::Off }),
            other => as_bool(other).map(|b| if b { SyncMode::On } else { SyncMode::Off }),
        };
        match mode {
            Some(m) => d.synchronous_mode = m,
            None => {
                let msg = format!("expected on, off or quorum, found {}", describe(v));
                ctx.bad::<()>(&o.key_path("synchronous_mode"), msg)?;
            }
        }
    }
    d.synchronous_mode_strict = o.bool(ctx, "synchronous_mode_strict")?.unwrap_or(false);
    if let Some(v) = o.i64_min(ctx, "synchronous_node_count", 1)? {
        d.synchronous_node_count = v as u64;
    }
    d.failsafe_mode = o.bool(ctx, "failsafe_mode")?.unwrap_or(false);
    d.check_timeline = o.bool(ctx, "check_timeline")?.unwrap_or(false);
    d.pause = o.bool(ctx, "pause")?.unwrap_or(false);
    if let Some(v) = o.raw("member_slots_ttl") {
        match duration_secs(v) {
            Some(s) => d.member_slots_ttl = s,
            None => {
                let msg = format!(
                    "expected seconds or a duration such as 30min, found {}",
                    describe(v)
                );
                ctx.bad::<()>(&o.key_path("member_slots_ttl"), msg)?;
            }
        }
    }
    // Patroni 4's order: the oldest name first, the first non-empty one wins.
    for key in ["permanent_replication_slots", "permanent_slots", "slots"] {
        if let Some(m) = o.object(ctx, key)?
            && d.permanent_slots.is_empty()
        {
            d.permanent_slots = crate::slots::permanent_slots(ctx, &o.key_path(key), m)?;
        }
    }
    if let Some(v) = o.raw("ignore_slots") {
        match v {
            Value::Array(items) => {
                d.ignore_slots = crate::slots::ignore_slots(ctx, &o.key_path("ignore_slots"), items)?;
            }
            other => {
                let msg = format!("expected a list of slot matchers, found {}", describe(other));
                ctx.bad::<()>(&o.key_path("ignore_slots"), msg)?;
            }
        }
    }
    let sc = o.section(ctx, "standby_cluster")?;
    if sc.present() {
        let sc = parse_standby_cluster(sc, ctx)?;
        if sc.is_active() {
            // Patroni's `is_synchronous_mode` is false in a standby cluster: its leader is a
            // replica of the remote primary, nobody can commit here. Turning the mode off here
            // keeps every consumer (sync manager, switchover checks) consistent; `raw` keeps
            // what was written, so removing the section brings the mode back.
            d.synchronous_mode = SyncMode::Off;
            d.standby_cluster = Some(sc);
        }
    }
    let section = o.section(ctx, "pgvigil")?;
    d.liveness = crate::liveness::parse_liveness(section, ctx, d.ttl)?;
    let mut pg = o.section(ctx, "postgresql")?;
    d.use_pg_rewind = pg.bool(ctx, "use_pg_rewind")?.unwrap_or(false);
    d.use_slots = pg.bool(ctx, "use_slots")?.unwrap_or(true);
    d.parameters = pg.value_map(ctx, "parameters")?;
    d.pg_hba = pg.string_list(ctx, "pg_hba")?;
    d.pg_ident = pg.string_list(ctx, "pg_ident")?;
    d.role_overrides = parse_role_overrides(&mut pg, ctx)?;
    d.recovery_conf = pg.value_map(ctx, "recovery_conf")?;
    for key in pg.unknown_keys() {
        if LOCAL_ONLY_PG_KEYS.contains(&key) {
            pg.allow(&[key]);
            ctx.warn(
                &pg.key_path(key),
                "a local-only setting; ignored in the dynamic configuration",
            );
        } else if KNOWN_PG_KEYS.contains(&key) || pg.has_method_section(key) {
            pg.allow(&[key]);
        }
    }
    pg.finish(ctx);
    o.finish(ctx);
    Ok(d)
}

/// `standby_cluster` (`docs/patroni-compat.md` §4.11), with Patroni's validator's types.
fn parse_standby_cluster(mut o: Obj<'_>, ctx: &mut Ctx) -> Result<StandbyClusterConfig, ConfigError> {
    let port = match o.i64(ctx, "port")? {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        Some(p) => ctx.bad(&o.key_path("port"), format!("expected a port number, found {p}"))?,
        None => None,
    };
    let mut sc = StandbyClusterConfig {
        host: o.string(ctx, "host")?.filter(|h| !h.trim().is_empty()),
        port,
        primary_slot_name: o.string(ctx, "primary_slot_name")?.filter(|s| !s.is_empty()),
        create_replica_methods: o.string_list(ctx, "create_replica_methods")?.unwrap_or_default(),
        restore_command: o.string(ctx, "restore_command")?.filter(|c| !c.trim().is_empty()),
        archive_cleanup_command: o
            .string(ctx, "archive_cleanup_command")?
            .filter(|c| !c.trim().is_empty()),
        recovery_min_apply_delay: o.string(ctx, "recovery_min_apply_delay")?,
    };
    if sc.port.is_some() && sc.host.is_none() {
        // Patroni would let libpq pick its default (a local socket); a standby cluster streams
        // from another cluster, so a port alone is almost certainly a missing host. Refused
        // from the file; from etcd the section then streams from nowhere (archive recovery
        // only, if restore_command is set) rather than from a guessed address.
        ctx.bad::<()>(
            &o.key_path("host"),
            "the remote primary's host is required with port",
        )?;
        sc.port = None;
    }
    o.finish(ctx);
    Ok(sc)
}

/// Seconds from an integer or a PostgreSQL-style duration (`1800`, `30min`, `1h`, `500ms`).
pub(crate) fn duration_secs(v: &Value) -> Option<u64> {
    if let Some(n) = crate::walk::as_i64(v) {
        return u64::try_from(n).ok();
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.parse().ok()?;
    let factor_ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(num.checked_mul(factor_ms)?.div_ceil(1000))
}

/// §3.4: raise `loop_wait`, `retry_timeout`, `ttl` to their minimums (1, 3, 20), then make
/// `loop_wait + 2*retry_timeout <= ttl` hold, preferring to shorten `loop_wait`. Returns the
/// values to use and a note for every change.
pub(crate) fn timing_rule(ttl: i64, loop_wait: i64, retry_timeout: i64) -> (u64, u64, u64, Vec<String>) {
    let mut notes = Vec::new();
    let mut raise = |name: &str, value: i64, min: i64| {
        if value < min {
            notes.push(format!("{name}={value} is below the minimum {min}; using {min}"));
            min
        } else {
            value
        }
    };
    // i128: the sums below cannot overflow, whatever was configured.
    let mut loop_wait = i128::from(raise("loop_wait", loop_wait, 1));
    let mut retry_timeout = i128::from(raise("retry_timeout", retry_timeout, 3));
    let ttl = i128::from(raise("ttl", ttl, 20));
    let rule = "the rule loop_wait + 2*retry_timeout <= ttl is violated";
    if 1 + 2 * retry_timeout > ttl {
        let new_retry = (ttl - 1) / 2;
        notes.push(format!(
            "{rule} (ttl={ttl}); adjusting loop_wait from {loop_wait} to 1 and retry_timeout from {retry_timeout} to {new_retry}"
        ));
        loop_wait = 1;
        retry_timeout = new_retry;
    } else if loop_wait + 2 * retry_timeout > ttl {
        let new_loop = ttl - 2 * retry_timeout;
        notes.push(format!(
            "{rule} (ttl={ttl}, retry_timeout={retry_timeout}); adjusting loop_wait from {loop_wait} to {new_loop}"
        ));
        loop_wait = new_loop;
    }
    (ttl as u64, loop_wait as u64, retry_timeout as u64, notes)
}
