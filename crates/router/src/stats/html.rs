//! The stats page for people: one HTML page, no scripts, refreshed by the browser every 2 s.

use std::fmt::Write;

use super::StatsDoc;
use crate::topology::human_bytes;

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
