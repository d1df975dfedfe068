//! `GET /metrics` (`docs/patroni-compat.md` §2.5): Prometheus text rendered by hand from the
//! snapshot, with Patroni's metric names (counters without `_total`), help texts and labels.

use std::fmt::Write;
use std::time::Instant;

use pgvigil_api::PgState;
use pgvigil_api::values::failover_priority;

use crate::snapshot::NodeSnapshot;

/// The `# Values:` legend Patroni prints for `patroni_postgres_state`.
const STATE_LEGEND: &str = "0=initdb, 1=initdb_failed, 2=custom_bootstrap, 3=custom_bootstrap_failed, \
4=creating_replica, 5=running, 6=starting, 7=bootstrap_starting, 8=start_failed, 9=restarting, \
10=restart_failed, 11=stopping, 12=stopped, 13=stop_failed, 14=crashed";

/// Renders the metrics page. `now` is accepted for symmetry with the health checks; every value
/// comes from the snapshot.
pub fn render_metrics(snap: &NodeSnapshot, _now: Instant) -> String {
    let s = &snap.status;
    let xlog = s.xlog.clone().unwrap_or_default();
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let mut out = Metrics {
        text: String::with_capacity(4096),
        labels: format!(
            "{{scope=\"{}\",name=\"{}\"}}",
            escape_label(&snap.scope),
            escape_label(&snap.name)
        ),
    };

    out.add(
        "patroni_version",
        "Patroni semver without periods.",
        "gauge",
        padded_version(snap.version()),
    );
    out.add(
        "patroni_postgres_running",
        "Value is 1 if Postgres is running, 0 otherwise.",
        "gauge",
        flag(s.state == "running"),
    );
    out.add(
        "patroni_postmaster_start_time",
        "Epoch seconds since Postgres started.",
        "gauge",
        epoch_seconds(s.postmaster_start_time.as_deref()),
    );
    out.add(
        "patroni_primary",
        "Value is 1 if this node is the leader, 0 otherwise.",
        "gauge",
        flag(s.role == "primary"),
    );
    out.add(
        "patroni_xlog_location",
        "Current location of the Postgres transaction log, 0 if this node is not the leader.",
        "counter",
        xlog.location.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_standby_leader",
        "Value is 1 if this node is the standby_leader, 0 otherwise.",
        "gauge",
        flag(s.role == "standby_leader"),
    );
    out.add(
        "patroni_replica",
        "Value is 1 if this node is a replica, 0 otherwise.",
        "gauge",
        flag(s.role == "replica"),
    );
    out.add(
        "patroni_sync_standby",
        "Value is 1 if this node is a sync standby, 0 otherwise.",
        "gauge",
        flag(s.sync_standby == Some(true)),
    );
    out.add(
        "patroni_quorum_standby",
        "Value is 1 if this node is a quorum standby, 0 otherwise.",
        "gauge",
        flag(s.quorum_standby == Some(true)),
    );
    out.add(
        "patroni_xlog_received_location",
        "Current location of the received Postgres transaction log, 0 if this node is not a replica.",
        "counter",
        xlog.received_location.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_xlog_replayed_location",
        "Current location of the replayed Postgres transaction log, 0 if this node is not a replica.",
        "counter",
        xlog.replayed_location.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_xlog_replayed_timestamp",
        "Current timestamp of the replayed Postgres transaction log, 0 if null.",
        "gauge",
        epoch_seconds(xlog.replayed_timestamp.as_deref()),
    );
    out.add(
        "patroni_xlog_paused",
        "Value is 1 if the Postgres xlog is paused, 0 otherwise.",
        "gauge",
        flag(xlog.paused == Some(true)),
    );
    if s.server_version.unwrap_or(0) >= 90600 {
        let state = s.replication_state.as_deref();
        out.add(
            "patroni_postgres_streaming",
            "Value is 1 if Postgres is streaming, 0 otherwise.",
            "gauge",
            flag(state == Some("streaming")),
        );
        out.add(
            "patroni_postgres_in_archive_recovery",
            "Value is 1 if Postgres is replicating from archive, 0 otherwise.",
            "gauge",
            flag(state == Some("in archive recovery")),
        );
    }
    out.add(
        "patroni_postgres_server_version",
        "Version of Postgres (if running), 0 otherwise.",
        "gauge",
        s.server_version.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_cluster_unlocked",
        "Value is 1 if the cluster is unlocked, 0 if locked.",
        "gauge",
        flag(s.cluster_unlocked == Some(true)),
    );
    out.add(
        "patroni_failsafe_mode_is_active",
        "Value is 1 if failsafe mode is active, 0 if inactive.",
        "gauge",
        flag(s.failsafe_mode_is_active == Some(true)),
    );
    out.add(
        "patroni_failsafe_mode_enabled",
        "Value is 1 if failsafe_mode is enabled, 0 otherwise.",
        "gauge",
        flag(snap.failsafe_mode_enabled),
    );
    let failsafe_member = snap
        .failsafe_members
        .as_ref()
        .is_some_and(|m| m.contains_key(&snap.name));
    out.add(
        "patroni_failsafe_member",
        "Value is 1 if this node is a member of failsafe, 0 otherwise.",
        "gauge",
        flag(failsafe_member),
    );
    out.add(
        "patroni_postgres_timeline",
        "Postgres timeline of this node (if running), 0 otherwise.",
        "gauge",
        s.timeline.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_dcs_last_seen",
        "Epoch timestamp when DCS was last contacted successfully by Patroni.",
        "gauge",
        s.dcs_last_seen.unwrap_or(0).to_string(),
    );
    out.add(
        "patroni_pending_restart",
        "Value is 1 if the node needs a restart, 0 otherwise.",
        "gauge",
        flag(s.pending_restart == Some(true)),
    );
    out.add(
        "patroni_is_paused",
        "Value is 1 if auto failover is disabled, 0 otherwise.",
        "gauge",
        flag(s.pause == Some(true)),
    );
    let state_index = match PgState::parse(&s.state) {
        Some(PgState::Unknown) | None => "-1".to_string(),
        Some(state) => state.metric_index().to_string(),
    };
    out.help(
        "patroni_postgres_state",
        "Numeric representation of Postgres state.",
    );
    let _ = writeln!(out.text, "# Values: {STATE_LEGEND}");
    out.sample("patroni_postgres_state", "gauge", state_index);
    out.add(
        "patroni_failover_priority",
        "Failover priority of this node.",
        "gauge",
        failover_priority(&snap.tags).to_string(),
    );
    out.text
}

struct Metrics {
    text: String,
    labels: String,
}

impl Metrics {
    fn add(&mut self, name: &str, help: &str, kind: &str, value: String) {
        self.help(name, help);
        self.sample(name, kind, value);
    }

    fn help(&mut self, name: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
    }

    fn sample(&mut self, name: &str, kind: &str, value: String) {
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        let _ = writeln!(self.text, "{name}{} {value}", self.labels);
    }
}

/// `4.1.5` → `040105`: each component zero-padded to two digits.
pub fn padded_version(version: &str) -> String {
    version.split('.').map(|part| format!("{part:0>2}")).collect()
}

/// Label values escaped as the exposition format requires (Patroni does not escape; names with
/// quotes or backslashes would break its output).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A PostgreSQL timestamp (`2024-09-23 16:57:57.123456+02:00`, also `+02` or `T`-separated) as
/// epoch seconds printed like a Python float (`1727103477.123456`, `1727103477.0`); `0` when
/// absent or unparsable.
pub fn epoch_seconds(timestamp: Option<&str>) -> String {
    let Some(parsed) = timestamp.and_then(parse_timestamp) else {
        return "0".into();
    };
    let micros = parsed.timestamp_micros();
    let (secs, frac) = (micros.div_euclid(1_000_000), micros.rem_euclid(1_000_000));
    if frac == 0 {
        format!("{secs}.0")
    } else {
        let frac = format!("{frac:06}");
        format!("{secs}.{}", frac.trim_end_matches('0'))
    }
}

fn parse_timestamp(text: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    let text = text.trim();
    ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"]
        .iter()
        .find_map(|format| chrono::DateTime::parse_from_str(text, format).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvigil_api::rest::XlogInfo;

    #[test]
    fn versions_and_timestamps() {
        assert_eq!(padded_version("4.1.5"), "040105");
        assert_eq!(padded_version("2.0.2"), "020002");
        assert_eq!(epoch_seconds(None), "0");
        assert_eq!(epoch_seconds(Some("garbage")), "0");
        assert_eq!(epoch_seconds(Some("1970-01-01 00:00:10+00:00")), "10.0");
        assert_eq!(epoch_seconds(Some("1970-01-01 01:00:10.5+01")), "10.5");
        assert_eq!(
            epoch_seconds(Some("2024-09-23 16:57:57.123456+02:00")),
            "1727103477.123456"
        );
        assert_eq!(epoch_seconds(Some("2024-09-23T14:57:57.1+0000")), "1727103477.1");
    }

    fn sample_lines(text: &str) -> Vec<(String, String, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("sample has a value");
                let (name, labels) = series.split_once('{').expect("sample has labels");
                assert!(labels.ends_with('}'), "{l}");
                assert!(value.parse::<f64>().is_ok(), "value of {l}");
                (name.to_string(), labels.to_string(), value.to_string())
            })
            .collect()
    }

    #[test]
    fn renders_every_metric_with_labels() {
        let mut snap = NodeSnapshot::initial("batman", "pg1");
        snap.status.state = "running".into();
        snap.status.role = "replica".into();
        snap.status.server_version = Some(160004);
        snap.status.replication_state = Some("streaming".into());
        snap.status.timeline = Some(3);
        snap.status.xlog = Some(XlogInfo {
            received_location: Some(500),
            replayed_location: Some(400),
            replayed_timestamp: Some("2024-09-23 16:57:57.123456+02:00".into()),
            paused: Some(false),
            ..Default::default()
        });
        snap.status.sync_standby = Some(true);
        snap.tags.insert("failover_priority".into(), 3.into());
        snap.failsafe_mode_enabled = true;
        snap.failsafe_members = Some(serde_json::from_str(r#"{"pg1":"http://h/patroni"}"#).unwrap());
        let text = render_metrics(&snap, Instant::now());
        assert!(text.ends_with('\n'));
        let samples = sample_lines(&text);
        let get = |name: &str| {
            samples
                .iter()
                .find(|(n, _, _)| n == name)
                .unwrap_or_else(|| panic!("{name} missing"))
                .2
                .clone()
        };
        for (_, labels, _) in &samples {
            assert_eq!(labels, "scope=\"batman\",name=\"pg1\"}");
        }
        assert_eq!(samples.len(), 26);
        assert_eq!(get("patroni_version"), "040105");
        assert_eq!(get("patroni_postgres_running"), "1");
        assert_eq!(get("patroni_replica"), "1");
        assert_eq!(get("patroni_primary"), "0");
        assert_eq!(get("patroni_sync_standby"), "1");
        assert_eq!(get("patroni_xlog_received_location"), "500");
        assert_eq!(get("patroni_xlog_replayed_location"), "400");
        assert_eq!(get("patroni_xlog_replayed_timestamp"), "1727103477.123456");
        assert_eq!(get("patroni_postgres_streaming"), "1");
        assert_eq!(get("patroni_postgres_in_archive_recovery"), "0");
        assert_eq!(get("patroni_postgres_server_version"), "160004");
        assert_eq!(get("patroni_postgres_timeline"), "3");
        assert_eq!(get("patroni_postgres_state"), "5");
        assert_eq!(get("patroni_failsafe_mode_enabled"), "1");
        assert_eq!(get("patroni_failsafe_member"), "1");
        assert_eq!(get("patroni_failover_priority"), "3");
        assert_eq!(get("patroni_cluster_unlocked"), "1");
        assert!(text.contains("# TYPE patroni_xlog_location counter\n"));
        assert!(text.contains(
            "# HELP patroni_postgres_state Numeric representation of Postgres state.\n# Values: 0=initdb,"
        ));
        assert!(!text.contains("_total"));
        // Every sample is preceded by its HELP and TYPE lines.
        for (name, _, _) in &samples {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }

    #[test]
    fn old_servers_and_unknown_state() {
        let mut snap = NodeSnapshot::initial("b", "n\"1");
        snap.status.state = "unknown".into();
        let text = render_metrics(&snap, Instant::now());
        assert!(!text.contains("patroni_postgres_streaming"));
        assert!(text.contains("patroni_postgres_state{scope=\"b\",name=\"n\\\"1\"} -1\n"));
        assert!(text.contains("patroni_postgres_server_version{scope=\"b\",name=\"n\\\"1\"} 0\n"));
        snap.status.state = "stopped".into();
        assert!(
            render_metrics(&snap, Instant::now())
                .contains("patroni_postgres_state{scope=\"b\",name=\"n\\\"1\"} 12\n")
        );
    }
}
