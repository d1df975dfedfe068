//! The stats server (`router.stats_listen`, default 127.0.0.1:7000):
//!
//! * `/`: an HTML page a person can read at a glance (refreshes every 2 s): where each port
//!   routes, whether etcd is in sync, and per member its role, state, lag, connections, bytes
//!   and last change;
//! * `/stats.json` (also `/json`): the same as JSON;
//! * `/metrics`: Prometheus text format, metric names prefixed `pgvigil_router_`.
//!
//! Rendering is pure ([`StatsDoc::build`], [`render_html`], [`render_metrics`]); the HTTP part
//! is a small axum router.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::{Port, Shared, lock};
use crate::topology::human_bytes;

#[derive(Clone, Debug, Serialize)]
pub struct StatsDoc {
    pub scope: String,
    pub version: String,
    pub now: String,
    pub started_at: String,
    pub listen: Listen,
    pub etcd: EtcdDoc,
    /// The leader key's value.
    pub leader: Option<String>,
    /// Where port 5000 routes (member name), if anywhere.
    pub primary: Option<String>,
    pub primary_address: Option<String>,
    pub no_primary_reason: Option<String>,
    /// Where port 5001 routes (member names).
    pub read_targets: Vec<String>,
    pub reads_on_primary: bool,
    pub no_replica_reason: Option<String>,
    /// Times the primary moved from one member to another since the router started.
    pub leader_changes: u64,
    pub last_primary_change: Option<String>,
    pub settings: SettingsDoc,
    pub ports: BTreeMap<String, PortDoc>,
    pub members: Vec<MemberDoc>,
    pub last_reload: Option<ReloadDoc>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Listen {
    pub primary: String,
    pub replicas: String,
    pub stats: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct EtcdDoc {
    /// `in sync`, `stale` (etcd unreachable, last topology in use), `expired` (etcd unreachable
    /// for longer than `stale_topology_timeout`) or `not synced yet`.
    pub status: String,
    /// One sentence for people.
    pub message: String,
    pub last_sync: Option<String>,
    pub last_sync_age_seconds: Option<f64>,
    pub failing_since: Option<String>,
    pub last_error: Option<String>,
    pub watch_established: Option<String>,
    pub revision: Option<i64>,
    pub stale_topology_timeout: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SettingsDoc {
    pub max_replica_lag: Option<u64>,
    pub primary_serves_reads_fallback: bool,
    pub connect_timeout: u64,
    pub shutdown_timeout: u64,
    pub threads: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PortDoc {
    pub accepted: u64,
    pub active: u64,
    pub refused: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemberDoc {
    pub name: String,
    /// `leader`, `replica`, or the member key's role; `gone` once the member key disappeared
    /// (its counters stay).
    pub role: String,
    pub state: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub timeline: Option<u64>,
    pub lag: Option<u64>,
    /// What the router does with it: `primary`, `replica`, `excluded: <why>`.
    pub routing: String,
    pub connections_primary: u64,
    pub connections_replicas: u64,
    pub connections_total: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
    pub connect_errors: u64,
    pub closed_by_router: u64,
    pub last_change: Option<String>,
    pub last_change_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadDoc {
    pub at: String,
    pub ok: bool,
    pub error: Option<String>,
}

fn time(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Local>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

fn age(t: SystemTime, now: SystemTime) -> f64 {
    now.duration_since(t)
        .map_or(0.0, |d| (d.as_secs_f64() * 10.0).round() / 10.0)
}

impl StatsDoc {
    pub fn build(shared: &Shared) -> StatsDoc {
        let now = SystemTime::now();
        let (scope, cfg) = shared.config.read().unwrap_or_else(|e| e.into_inner()).clone();
        let snapshot = shared.snapshot();
        let topology = snapshot.topology.clone();
        let last_sync_age = snapshot.synced_wall.map(|t| age(t, now));
        let (status, message) = match (&topology, snapshot.failing_since_wall, snapshot.expired) {
            (None, _, _) => (
                "not synced yet",
                format!(
                    "the cluster has not been read from etcd yet{}; all connections are refused",
                    snapshot
                        .last_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" ({e})"))
                ),
            ),
            (Some(_), None, _) => (
                "in sync",
                format!(
                    "watching etcd; last read {:.1} s ago",
                    last_sync_age.unwrap_or(0.0)
                ),
            ),
            (Some(_), Some(_), false) => {
                let a = last_sync_age.unwrap_or(0.0);
                (
                    "stale",
                    format!(
                        "etcd does not answer: routing new connections by the topology read {a:.0} s ago, for {:.0} s more \
                         (stale_topology_timeout {} s); established connections stay open",
                        (cfg.stale_topology_timeout as f64 - a).max(0.0),
                        cfg.stale_topology_timeout
                    ),
                )
            }
            (Some(_), Some(_), true) => (
                "expired",
                format!(
                    "etcd has not answered for {:.0} s (more than stale_topology_timeout {} s): new connections are \
                     refused until it answers; established connections stay open",
                    last_sync_age.unwrap_or(0.0),
                    cfg.stale_topology_timeout
                ),
            ),
        };
        let etcd = EtcdDoc {
            status: status.to_string(),
            message,
            last_sync: snapshot.synced_wall.map(time),
            last_sync_age_seconds: last_sync_age,
            failing_since: snapshot.failing_since_wall.map(time),
            last_error: snapshot.last_error.clone(),
            watch_established: snapshot.watch_since.map(time),
            revision: topology.as_ref().map(|t| t.revision),
            stale_topology_timeout: cfg.stale_topology_timeout,
        };

        let counters = lock(&shared.stats.members).clone();
        let changes = lock(&shared.stats.member_changes).clone();
        let mut members = Vec::new();
        let mut seen = Vec::new();
        let fill = |doc: &mut MemberDoc| {
            if let Some(c) = counters.get(&doc.name) {
                doc.connections_primary = c.active[Port::Primary as usize].load(Ordering::Relaxed);
                doc.connections_replicas = c.active[Port::Replicas as usize].load(Ordering::Relaxed);
                doc.connections_total = c.total.iter().map(|t| t.load(Ordering::Relaxed)).sum();
                doc.bytes_to_server = c.bytes_to_server.load(Ordering::Relaxed);
                doc.bytes_to_client = c.bytes_to_client.load(Ordering::Relaxed);
                doc.connect_errors = c.connect_errors.load(Ordering::Relaxed);
                doc.closed_by_router = c.closed_by_router.load(Ordering::Relaxed);
            }
            if let Some((_, at)) = changes.get(&doc.name) {
                doc.last_change = Some(time(*at));
                doc.last_change_age_seconds = Some(age(*at, now));
            }
        };
        if let Some(t) = &topology {
            for m in &t.members {
                let role = if m.is_leader {
                    "leader".to_string()
                } else {
                    m.role.clone()
                };
                let mut doc = MemberDoc {
                    name: m.name.clone(),
                    role,
                    state: match (&m.replication_state, m.is_leader) {
                        (Some(rs), false) => format!("{} ({rs})", m.state),
                        _ => m.state.clone(),
                    },
                    host: m.host.clone(),
                    port: m.port,
                    timeline: m.timeline,
                    lag: m.lag,
                    routing: m.routing.clone(),
                    ..Default::default()
                };
                fill(&mut doc);
                seen.push(m.name.clone());
                members.push(doc);
            }
        }
        // Members that left the cluster keep their counters on the page.
        for name in counters.keys() {
            if !seen.contains(name) {
                let mut doc = MemberDoc {
                    name: name.clone(),
                    role: "gone".into(),
                    state: "no member key".into(),
                    routing: "excluded: not in the cluster".into(),
                    ..Default::default()
                };
                fill(&mut doc);
                members.push(doc);
            }
        }

        let refused = lock(&shared.stats.refused).clone();
        let mut ports = BTreeMap::new();
        for port in [Port::Primary, Port::Replicas] {
            let i = port as usize;
            ports.insert(
                port.name().to_string(),
                PortDoc {
                    accepted: shared.stats.accepted[i].load(Ordering::Relaxed),
                    active: shared.stats.active[i].load(Ordering::Relaxed),
                    refused: refused
                        .iter()
                        .filter(|((p, _), _)| *p == port)
                        .map(|((_, r), n)| (r.to_string(), *n))
                        .collect(),
                },
            );
        }
        let primary_change = lock(&shared.stats.primary).1;
        let last_reload = lock(&shared.stats.last_reload).clone().map(|(at, r)| ReloadDoc {
            at: time(at),
            ok: r.is_ok(),
            error: r.err(),
        });
        let t = topology.as_deref();
        StatsDoc {
            scope,
            version: env!("CARGO_PKG_VERSION").to_string(),
            now: time(now),
            started_at: time(shared.stats.started),
            listen: Listen {
                primary: cfg.primary_listen.clone(),
                replicas: cfg.replicas_listen.clone(),
                stats: cfg.stats_listen.clone(),
            },
            etcd,
            leader: t.and_then(|t| t.leader.clone()),
            primary: t.and_then(|t| t.primary.as_ref().map(|p| p.member.clone())),
            primary_address: t.and_then(|t| t.primary.as_ref().map(|p| p.address())),
            no_primary_reason: t
                .filter(|t| t.primary.is_none())
                .map(|t| t.no_primary_reason.clone()),
            read_targets: t.map_or_else(Vec::new, |t| {
                t.read_routes()
                    .iter()
                    .map(|r| r.backend().member.clone())
                    .collect()
            }),
            reads_on_primary: t.is_some_and(|t| t.reads_on_primary),
            no_replica_reason: t
                .filter(|t| t.replicas.is_empty())
                .map(|t| t.no_replica_reason.clone()),
            leader_changes: shared.stats.leader_changes.load(Ordering::Relaxed),
            last_primary_change: primary_change.map(time),
            settings: SettingsDoc {
                max_replica_lag: cfg.max_replica_lag,
                primary_serves_reads_fallback: cfg.primary_serves_reads_fallback,
                connect_timeout: cfg.connect_timeout,
                shutdown_timeout: cfg.shutdown_timeout,
                threads: cfg.threads,
            },
            ports,
            members,
            last_reload,
        }
    }
}

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn short_time(rfc3339: &str) -> &str {
    // 2026-01-02T12:34:56.789+01:00 → 12:34:56
    rfc3339.get(11..19).unwrap_or(rfc3339)
}

/// The HTML page.
pub fn render_html(doc: &StatsDoc) -> String {
    let mut h = String::with_capacity(8192);
    let status_class = match doc.etcd.status.as_str() {
        "in sync" => "ok",
        "stale" => "warn",
        _ => "bad",
    };
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>pgvigil router: {scope}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin-bottom: 0.2em; }}
.sub {{ color: #666; margin-bottom: 1em; }}
.banner {{ padding: 0.6em 0.9em; border-radius: 4px; margin: 0.4em 0; }}
.ok {{ background: #e3f4e3; border-left: 6px solid #2e8b2e; }}
.warn {{ background: #fff4d6; border-left: 6px solid #d49b00; }}
.bad {{ background: #fbe1e1; border-left: 6px solid #c62828; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }}
th {{ background: #f0f0f0; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.leader td {{ font-weight: 600; }}
tr.excluded td {{ color: #777; }}
.foot {{ color: #777; font-size: 0.9em; margin-top: 1em; }}
</style></head><body>
<h1>pgvigil router &mdash; cluster <code>{scope}</code></h1>
<div class="sub">router {version}, up since {started}; page generated {now}; <a href="stats.json">JSON</a> &middot; <a href="metrics">metrics</a></div>
<div class="banner {status_class}"><b>etcd: {status}</b> &mdash; {message}</div>
"#,
        scope = esc(&doc.scope),
        version = esc(&doc.version),
        started = esc(short_time(&doc.started_at)),
        now = esc(short_time(&doc.now)),
        status = esc(&doc.etcd.status),
        message = esc(&doc.etcd.message),
    );
    match (&doc.primary, &doc.primary_address) {
        (Some(p), Some(a)) => {
            let _ = write!(
                h,
                r#"<div class="banner ok"><b>{listen} (read-write)</b> &rarr; {p} at {a}</div>"#,
                listen = esc(&doc.listen.primary),
                p = esc(p),
                a = esc(a)
            );
        }
        _ => {
            let _ = write!(
                h,
                r#"<div class="banner bad"><b>{listen} (read-write)</b> &rarr; no primary: {why}. New connections are refused.</div>"#,
                listen = esc(&doc.listen.primary),
                why = esc(doc.no_primary_reason.as_deref().unwrap_or("unknown"))
            );
        }
    }
    if doc.read_targets.is_empty() {
        let _ = write!(
            h,
            r#"<div class="banner bad"><b>{listen} (read-only)</b> &rarr; no replica: {why}. New connections are refused.</div>"#,
            listen = esc(&doc.listen.replicas),
            why = esc(doc.no_replica_reason.as_deref().unwrap_or("unknown"))
        );
    } else {
        let class = if doc.reads_on_primary { "warn" } else { "ok" };
        let note = if doc.reads_on_primary {
            " (the primary: no replica qualifies)"
        } else {
            " (round-robin)"
        };
        let _ = write!(
            h,
            r#"<div class="banner {class}"><b>{listen} (read-only)</b> &rarr; {targets}{note}</div>"#,
            listen = esc(&doc.listen.replicas),
            targets = esc(&doc.read_targets.join(", "))
        );
    }
    h.push_str(
        "<table><tr><th>Member</th><th>Role</th><th>State</th><th>Address</th><th>TL</th><th>Lag</th>\
         <th>Routing</th><th>Conns 5000</th><th>Conns 5001</th><th>Total conns</th><th>Bytes to server</th>\
         <th>Bytes to client</th><th>Closed by router</th><th>Connect errors</th><th>Last change</th></tr>\n",
    );
    for m in &doc.members {
        let class = if m.role == "leader" {
            "leader"
        } else if m.routing.starts_with("excluded") {
            "excluded"
        } else {
            ""
        };
        let address = match (&m.host, m.port) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            _ => "-".into(),
        };
        let last_change = match (&m.last_change, m.last_change_age_seconds) {
            (Some(t), Some(a)) => format!("{} ({a:.0} s ago)", short_time(t)),
            _ => "-".into(),
        };
        let _ = writeln!(
            h,
            "<tr class=\"{class}\"><td>{name}</td><td>{role}</td><td>{state}</td><td>{address}</td><td class=\"num\">{tl}</td>\
             <td class=\"num\">{lag}</td><td>{routing}</td><td class=\"num\">{c1}</td><td class=\"num\">{c2}</td>\
             <td class=\"num\">{ct}</td><td class=\"num\">{bs}</td><td class=\"num\">{bc}</td><td class=\"num\">{cl}</td>\
             <td class=\"num\">{ce}</td><td>{last_change}</td></tr>",
            name = esc(&m.name),
            role = esc(&m.role),
            state = esc(&m.state),
            address = esc(&address),
            tl = m.timeline.map_or("-".into(), |t| t.to_string()),
            lag = m.lag.map_or("-".into(), human_bytes),
            routing = esc(&m.routing),
            c1 = m.connections_primary,
            c2 = m.connections_replicas,
            ct = m.connections_total,
            bs = human_bytes(m.bytes_to_server),
            bc = human_bytes(m.bytes_to_client),
            cl = m.closed_by_router,
            ce = m.connect_errors,
            last_change = esc(&last_change),
        );
    }
    h.push_str("</table>\n");
    let port_line = |name: &str| {
        let p = doc.ports.get(name).cloned().unwrap_or_default();
        let refused: u64 = p.refused.values().sum();
        let reasons = p
            .refused
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{name}: {} active, {} accepted, {refused} refused{}",
            p.active,
            p.accepted,
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({reasons})")
            }
        )
    };
    let _ = write!(
        h,
        r#"<div class="foot">Connections &mdash; {p}; {r}.<br>Leader changes seen: {lc}{last}. Max replica lag: {lag}; reads fall back to the primary: {fb}; stale topology timeout: {st} s.{reload}</div>
</body></html>
"#,
        p = esc(&port_line("primary")),
        r = esc(&port_line("replicas")),
        lc = doc.leader_changes,
        last = doc
            .last_primary_change
            .as_deref()
            .map_or(String::new(), |t| format!(
                " (primary last changed at {})",
                short_time(t)
            )),
        lag = doc
            .settings
            .max_replica_lag
            .map_or("unlimited".into(), human_bytes),
        fb = if doc.settings.primary_serves_reads_fallback {
            "yes"
        } else {
            "no"
        },
        st = doc.etcd.stale_topology_timeout,
        reload = match &doc.last_reload {
            None => String::new(),
            Some(r) if r.ok => format!(" Last reload at {}: applied.", esc(short_time(&r.at))),
            Some(r) => format!(
                " Last reload at {}: <b>refused</b>: {}.",
                esc(short_time(&r.at)),
                esc(r.error.as_deref().unwrap_or(""))
            ),
        },
    );
    h
}

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

async fn html(State(shared): State<Arc<Shared>>) -> Html<String> {
    Html(render_html(&StatsDoc::build(&shared)))
}

async fn json(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(StatsDoc::build(&shared))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        render_metrics(&StatsDoc::build(&shared)),
    )
}

/// Serves the stats pages until `stop` is cancelled.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    let app = axum::Router::new()
        .route("/", get(html))
        .route("/stats.json", get(json))
        .route("/json", get(json))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!("stats server stopped: {e}");
    }
}

#[cfg(test)]
mod tests {
    use pgvigil_api::cluster::RawKv;
    use pgvigil_api::{ClusterView, Keys};

    use super::*;
    use crate::state::Snapshot;
    use crate::topology::{Settings, Topology};

    fn shared_with_cluster() -> Arc<Shared> {
        let shared = Shared::new("demo".into(), pgvigil_config::RouterConfig::default());
        let kvs = vec![
            RawKv {
                key: "/service/demo/leader".into(),
                value: "a".into(),
                mod_revision: 5,
                lease: 1,
            },
            RawKv {
                key: "/service/demo/members/a".into(),
                value: r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","role":"primary","state":"running","xlog_location":100}"#.into(),
                mod_revision: 5,
                lease: 1,
            },
            RawKv {
                key: "/service/demo/members/b".into(),
                value: r#"{"conn_url":"postgres://127.0.0.1:5433/postgres","role":"replica","state":"running","replication_state":"streaming","replay_lsn":100,"tags":{"noloadbalance":true}}"#.into(),
                mod_revision: 5,
                lease: 1,
            },
        ];
        let view = ClusterView::from_kvs(&Keys::new("/service", "demo"), 7, kvs);
        let settings = Settings {
            max_replica_lag: Some(1 << 20),
            primary_serves_reads_fallback: false,
        };
        let topology = Topology::compute("demo", &view, &settings);
        shared.stats.observe(&topology);
        shared.publish(Snapshot {
            topology: Some(Arc::new(topology)),
            synced_at: Some(std::time::Instant::now()),
            synced_wall: Some(SystemTime::now()),
            ..Default::default()
        });
        let a = shared.stats.member("a");
        a.active[0].store(2, Ordering::Relaxed);
        a.bytes_to_client.store(5 << 20, Ordering::Relaxed);
        shared.stats.refused(Port::Replicas, "no_replica");
        shared
    }

    #[test]
    fn the_document_says_where_each_port_goes() {
        let doc = StatsDoc::build(&shared_with_cluster());
        assert_eq!(doc.etcd.status, "in sync");
        assert_eq!(doc.primary.as_deref(), Some("a"));
        assert_eq!(doc.primary_address.as_deref(), Some("127.0.0.1:5432"));
        assert!(doc.read_targets.is_empty());
        assert!(
            doc.no_replica_reason
                .as_deref()
                .unwrap()
                .contains("b (noloadbalance)")
        );
        assert_eq!(doc.members.len(), 2);
        assert_eq!(doc.members[0].role, "leader");
        assert_eq!(doc.members[0].connections_primary, 2);
        assert_eq!(doc.members[1].state, "running (streaming)");
        assert_eq!(doc.members[1].routing, "excluded: noloadbalance");
        assert!(doc.members[0].last_change.is_some());
        assert_eq!(doc.ports["replicas"].refused["no_replica"], 1);
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["etcd"]["revision"], 7);
    }

    #[test]
    fn html_shows_members_routes_and_etcd_state() {
        let page = render_html(&StatsDoc::build(&shared_with_cluster()));
        assert!(page.contains("cluster <code>demo</code>"), "{page}");
        assert!(page.contains("etcd: in sync"));
        assert!(page.contains("&rarr; a at 127.0.0.1:5432"));
        assert!(page.contains("no replica: no running, streaming replica"));
        assert!(page.contains("<td>excluded: noloadbalance</td>"));
        assert!(page.contains("5.0 MiB"));
    }

    #[test]
    fn html_escapes_and_reports_a_stale_topology() {
        let shared = shared_with_cluster();
        let mut snap = (*shared.snapshot()).clone();
        snap.failing_since = Some(std::time::Instant::now());
        snap.failing_since_wall = Some(SystemTime::now());
        snap.last_error = Some("<timeout>".into());
        shared.publish(snap);
        let doc = StatsDoc::build(&shared);
        assert_eq!(doc.etcd.status, "stale");
        assert!(
            doc.etcd
                .message
                .contains("routing new connections by the topology read")
        );
        let page = render_html(&doc);
        assert!(page.contains("banner warn"));
        assert!(!page.contains("<timeout>"));
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let text = render_metrics(&StatsDoc::build(&shared_with_cluster()));
        assert!(text.contains("# TYPE pgvigil_router_primary_available gauge"));
        assert!(text.contains("pgvigil_router_primary_available{scope=\"demo\"} 1"));
        assert!(text.contains(
            "pgvigil_router_backend_connections_active{scope=\"demo\",member=\"a\",port=\"primary\"} 2"
        ));
        assert!(text.contains(
            "pgvigil_router_client_connections_refused{scope=\"demo\",port=\"replicas\",reason=\"no_replica\"} 1"
        ));
        assert!(
            text.contains("pgvigil_router_member_routed{scope=\"demo\",member=\"b\",role=\"replica\"} 0")
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
