//! `pgvigilctl list`: the member table, built from the same `/cluster` document the REST API
//! serves, formatted like `patronictl list`.

use pgvigil_api::ClusterView;
use pgvigil_api::rest::{ClusterDocument, ClusterMemberInfo, cluster_document};
use serde_json::{Map, Value};

use crate::table::{Align, Table};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Pretty,
    Tsv,
    Json,
    Yaml,
    Topology,
}

const BASE_COLUMNS: [&str; 10] = [
    "Cluster",
    "Member",
    "Host",
    "Role",
    "State",
    "TL",
    "Receive LSN",
    "Receive Lag",
    "Replay LSN",
    "Replay Lag",
];

/// patronictl shows lags in whole MB, rounding half to even like Python's `round`.
fn lag_mb(lag: &Option<Value>) -> Value {
    match lag.as_ref().and_then(Value::as_u64) {
        Some(bytes) => {
            let mb = bytes as f64 / 1024.0 / 1024.0;
            let rounded = mb.round();
            let even = if (mb - mb.trunc() - 0.5).abs() < f64::EPSILON && rounded % 2.0 != 0.0 {
                rounded - 1.0
            } else {
                rounded
            };
            Value::from(even as u64)
        }
        None => Value::from(""),
    }
}

fn title_case_role(role: &str) -> String {
    role.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows of typed values (numbers stay numbers for JSON), one per member with a host.
fn rows(scope: &str, doc: &ClusterDocument, columns: &[&str]) -> Vec<Vec<Value>> {
    let members: Vec<&ClusterMemberInfo> = doc.members.iter().filter(|m| m.host.is_some()).collect();
    let mut hosts: Vec<&str> = members.iter().filter_map(|m| m.host.as_deref()).collect();
    hosts.sort_unstable();
    hosts.dedup();
    let append_port =
        members.iter().any(|m| m.port.is_some_and(|p| p != 5432)) || hosts.len() < members.len();
    members
        .iter()
        .map(|m| {
            let host = match (&m.host, m.port) {
                (Some(h), Some(p)) if append_port => format!("{h}:{p}"),
                (Some(h), _) => h.clone(),
                _ => String::new(),
            };
            columns
                .iter()
                .map(|c| match *c {
                    "Cluster" => Value::from(scope),
                    "Member" => Value::from(m.name.clone()),
                    "Host" => Value::from(host.clone()),
                    "Role" => Value::from(title_case_role(&m.role)),
                    "State" => Value::from(m.state.clone()),
                    "TL" => m.timeline.map_or(Value::from(""), Value::from),
                    "Receive LSN" => Value::from(m.receive_lsn.clone().unwrap_or_default()),
                    "Receive Lag" => lag_mb(&m.receive_lag),
                    "Replay LSN" => Value::from(m.replay_lsn.clone().unwrap_or_default()),
                    "Replay Lag" => lag_mb(&m.replay_lag),
                    "Pending restart" => Value::from(if m.pending_restart == Some(true) { "*" } else { "" }),
                    "Pending restart reason" => Value::from(restart_reason(m)),
                    "Scheduled restart" => Value::from(
                        m.scheduled_restart
                            .as_ref()
                            .and_then(|s| s.get("schedule"))
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    ),
                    "Tags" => {
                        if m.tags.is_empty() {
                            Value::from("")
                        } else {
                            Value::Object(m.tags.clone())
                        }
                    }
                    _ => Value::from(""),
                })
                .collect()
        })
        .collect()
}

fn restart_reason(m: &ClusterMemberInfo) -> String {
    let Some(Value::Object(reasons)) = &m.pending_restart_reason else {
        return String::new();
    };
    reasons
        .iter()
        .map(|(k, v)| {
            let get = |f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
            format!("{k}: {}->{}", get("old_value"), get("new_value"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn cell_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}: {}", cell_text(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// Renders the whole output of `list` for one cluster.
pub fn render(scope: &str, view: &ClusterView, format: Format, extended: bool) -> String {
    let doc = cluster_document(scope, view);
    let mut columns: Vec<&str> = BASE_COLUMNS.to_vec();
    let with_host: Vec<&ClusterMemberInfo> = doc.members.iter().filter(|m| m.host.is_some()).collect();
    if extended || with_host.iter().any(|m| m.pending_restart == Some(true)) {
        columns.push("Pending restart");
    }
    if extended || with_host.iter().any(|m| m.pending_restart_reason.is_some()) {
        columns.push("Pending restart reason");
    }
    if extended || with_host.iter().any(|m| m.scheduled_restart.is_some()) {
        columns.push("Scheduled restart");
    }
    if extended || with_host.iter().any(|m| !m.tags.is_empty()) {
        columns.push("Tags");
    }
    let rows = rows(scope, &doc, &columns);
    let initialize = match view.initialize.as_deref() {
        None => "uninitialized",
        Some("") => "initializing",
        Some(s) => s,
    };
    match format {
        Format::Json | Format::Yaml => {
            // patronictl drops empty cells from machine-readable output.
            let objects: Vec<Value> = rows
                .iter()
                .map(|r| {
                    let mut o = Map::new();
                    for (c, v) in columns.iter().zip(r) {
                        if v != &Value::from("") {
                            o.insert((*c).to_string(), v.clone());
                        }
                    }
                    Value::Object(o)
                })
                .collect();
            if format == Format::Json {
                Value::Array(objects).to_string()
            } else {
                crate::yaml::to_yaml(&Value::Array(objects))
            }
        }
        Format::Tsv => Table {
            columns: columns.iter().map(|c| c.to_string()).collect(),
            align: vec![Align::Left; columns.len()],
            rows: rows
                .iter()
                .map(|r| r.iter().map(|v| cell_text(v).replace('\n', ", ")).collect())
                .collect(),
        }
        .tsv(),
        Format::Pretty | Format::Topology => {
            let shown: Vec<String> = columns[1..]
                .iter()
                .map(|c| {
                    if c.ends_with(" Lag") {
                        "Lag".to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            let align = shown
                .iter()
                .map(|c| {
                    if matches!(c.as_str(), "TL" | "Receive LSN" | "Replay LSN" | "Lag") {
                        Align::Right
                    } else {
                        Align::Left
                    }
                })
                .collect();
            let table = Table {
                columns: shown,
                align,
                rows: rows
                    .iter()
                    .map(|r| r[1..].iter().map(cell_text).collect())
                    .collect(),
            };
            let mut out = table.pretty(&format!(" Cluster: {scope} ({initialize}) "));
            if doc.pause == Some(true) {
                out.push_str("\n Maintenance mode: on");
            }
            if let Some(s) = &doc.scheduled_switchover {
                out.push_str(&format!(
                    "\n Switchover scheduled at: {}",
                    s.get("at").and_then(Value::as_str).unwrap_or("")
                ));
                for (key, label) in [("from", "from"), ("to", "to")] {
                    if let Some(v) = s.get(key).and_then(Value::as_str) {
                        out.push_str(&format!("\n                    {label}: {v}"));
                    }
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvigil_api::cluster::{Leader, Member};
    use pgvigil_api::{MemberData, StatusValue};

    fn view() -> ClusterView {
        let member = |name: &str, port: u16, role: &str, lsn: Option<u64>| Member {
            name: name.into(),
            data: MemberData {
                conn_url: format!("postgres://127.0.0.1:{port}/postgres"),
                api_url: format!("http://127.0.0.1:{}/patroni", port + 2576),
                state: "running".into(),
                role: role.into(),
                timeline: Some(2),
                receive_lsn: lsn,
                replay_lsn: lsn,
                xlog_location: lsn,
                replication_state: lsn.map(|_| "streaming".to_string()),
                ..Default::default()
            },
            lease: 1,
        };
        ClusterView {
            initialize: Some("7268616322854375442".into()),
            leader: Some(Leader {
                name: "node1".into(),
                lease: 1,
                mod_revision: 1,
            }),
            members: vec![
                member("node1", 5432, "primary", None),
                member("node2", 5433, "replica", Some(0x300_0000)),
            ],
            status: StatusValue {
                optime: 0x300_0000 + 3 * 1024 * 1024,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    /// Expected text generated by patronictl's own PatronictlPrettyTable with the same rows.
    fn pretty_output() {
        let out = render("demo", &view(), Format::Pretty, false);
        let expected = "\
+ Cluster: demo (7268616322854375442) ----------+----+-------------+-----+------------+-----+
| Member | Host           | Role    | State     | TL | Receive LSN | Lag | Replay LSN | Lag |
+--------+----------------+---------+-----------+----+-------------+-----+------------+-----+
| node1  | 127.0.0.1:5432 | Leader  | running   |  2 |             |     |            |     |
| node2  | 127.0.0.1:5433 | Replica | streaming |  2 |   0/3000000 |   3 |  0/3000000 |   3 |
+--------+----------------+---------+-----------+----+-------------+-----+------------+-----+";
        assert_eq!(out, expected);
    }

    #[test]
    fn json_output_drops_empty_cells() {
        let out: Value = serde_json::from_str(&render("demo", &view(), Format::Json, false)).unwrap();
        assert_eq!(
            out[0],
            serde_json::json!({"Cluster":"demo","Member":"node1","Host":"127.0.0.1:5432","Role":"Leader","State":"running","TL":2})
        );
        assert_eq!(out[1]["Replay Lag"], 3);
        assert_eq!(out[1]["Receive LSN"], "0/3000000");
    }
}
