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
    assert!(text.contains("pgvigil_router_member_routed{scope=\"demo\",member=\"b\",role=\"replica\"} 0"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
}
