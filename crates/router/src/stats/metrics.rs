//! The stats in Prometheus text format, metric names prefixed `pgvigil_router_`.

use std::fmt::Write;

use super::{MemberDoc, PortDoc, StatsDoc};

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Prometheus text format.
pub fn render_metrics(doc: &StatsDoc) -> String {
    let mut out = String::with_capacity(4096);
    let scope = format!("scope=\"{}\"", escape_label(&doc.scope));
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP pgvigil_router_{name} {help}");
        let _ = writeln!(out, "# TYPE pgvigil_router_{name} {kind}");
        for (labels, value) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "pgvigil_router_{name}{{{scope}{sep}{labels}}} {value}");
        }
    };
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    family(
        "primary_available",
        "gauge",
        "1 if port 5000 has a primary to route to.",
        vec![(String::new(), flag(doc.primary.is_some()))],
    );
    family(
        "read_targets",
        "gauge",
        "Members port 5001 routes to.",
        vec![(String::new(), doc.read_targets.len().to_string())],
    );
    family(
        "reads_on_primary",
        "gauge",
        "1 if port 5001 uses the primary because no replica qualifies.",
        vec![(String::new(), flag(doc.reads_on_primary))],
    );
    family(
        "topology_stale",
        "gauge",
        "1 while etcd does not answer and the last known topology is in use (or expired).",
        vec![(String::new(), flag(doc.etcd.status != "in sync"))],
    );
    family(
        "topology_expired",
        "gauge",
        "1 when etcd has not answered for longer than stale_topology_timeout (new connections refused).",
        vec![(
            String::new(),
            flag(doc.etcd.status == "expired" || doc.etcd.status == "not synced yet"),
        )],
    );
    family(
        "etcd_last_sync_age_seconds",
        "gauge",
        "Seconds since etcd last answered a read.",
        vec![(
            String::new(),
            doc.etcd
                .last_sync_age_seconds
                .map_or("NaN".into(), |a| a.to_string()),
        )],
    );
    family(
        "leader_changes",
        "counter",
        "Times the primary moved to another member since the router started.",
        vec![(String::new(), doc.leader_changes.to_string())],
    );
    let ports: Vec<(&String, &PortDoc)> = doc.ports.iter().collect();
    family(
        "client_connections_active",
        "gauge",
        "Open client connections per listener.",
        ports
            .iter()
            .map(|(p, d)| (format!("port=\"{p}\""), d.active.to_string()))
            .collect(),
    );
    family(
        "client_connections_accepted",
        "counter",
        "Client connections accepted per listener.",
        ports
            .iter()
            .map(|(p, d)| (format!("port=\"{p}\""), d.accepted.to_string()))
            .collect(),
    );
    family(
        "client_connections_refused",
        "counter",
        "Client connections refused with a PostgreSQL error, per listener and reason.",
        ports
            .iter()
            .flat_map(|(p, d)| {
                d.refused
                    .iter()
                    .map(move |(r, n)| (format!("port=\"{p}\",reason=\"{r}\""), n.to_string()))
            })
            .collect(),
    );
    let member = |m: &MemberDoc| format!("member=\"{}\"", escape_label(&m.name));
    family(
        "member_routed",
        "gauge",
        "1 if the member gets new connections: role=\"primary\" for port 5000, role=\"replica\" for 5001.",
        doc.members
            .iter()
            .map(|m| {
                let role = if m.routing.starts_with("primary") {
                    "primary"
                } else {
                    "replica"
                };
                let routed =
                    doc.primary.as_deref() == Some(m.name.as_str()) || doc.read_targets.contains(&m.name);
                (format!("{},role=\"{role}\"", member(m)), flag(routed))
            })
            .collect(),
    );
    family(
        "member_lag_bytes",
        "gauge",
        "Replay lag behind the leader from the member keys.",
        doc.members
            .iter()
            .filter_map(|m| m.lag.map(|l| (member(m), l.to_string())))
            .collect(),
    );
    family(
        "backend_connections_active",
        "gauge",
        "Open proxied connections per member and listener.",
        doc.members
            .iter()
            .flat_map(|m| {
                [
                    (
                        format!("{},port=\"primary\"", member(m)),
                        m.connections_primary.to_string(),
                    ),
                    (
                        format!("{},port=\"replicas\"", member(m)),
                        m.connections_replicas.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    family(
        "backend_connections",
        "counter",
        "Proxied connections per member since the router started.",
        doc.members
            .iter()
            .map(|m| (member(m), m.connections_total.to_string()))
            .collect(),
    );
    family(
        "backend_bytes",
        "counter",
        "Bytes proxied per member and direction.",
        doc.members
            .iter()
            .flat_map(|m| {
                [
                    (
                        format!("{},direction=\"to_server\"", member(m)),
                        m.bytes_to_server.to_string(),
                    ),
                    (
                        format!("{},direction=\"to_client\"", member(m)),
                        m.bytes_to_client.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    family(
        "backend_closed_by_router",
        "counter",
        "Connections the router closed because the member stopped being their target (leader change).",
        doc.members
            .iter()
            .map(|m| (member(m), m.closed_by_router.to_string()))
            .collect(),
    );
    family(
        "backend_connect_errors",
        "counter",
        "Failed connection attempts to the member.",
        doc.members
            .iter()
            .map(|m| (member(m), m.connect_errors.to_string()))
            .collect(),
    );
    out
}
