//! Steps that failure scenarios repeat: crash a node, wait for a successor, talk to the
//! cluster's etcd as an operator would.

use std::time::Duration;

use nix::sys::signal::Signal;
use pgvigil_dcs::{Dcs, Etcd3Dcs, EtcdOptions};

use crate::cluster::TestCluster;
use crate::wait_until;

impl TestCluster {
    /// The node's host dies as far as PostgreSQL HA is concerned: agent and postmaster get
    /// SIGKILL, nothing is released.
    pub fn kill_node(&mut self, i: usize) {
        self.signal_agent(i, Signal::SIGKILL).expect("agent killed");
        self.kill_postgres(i).expect("postmaster killed");
    }

    /// Waits (up to 2 minutes) for a leader other than `old` whose PostgreSQL accepts writes.
    pub fn wait_new_leader(&self, old: usize) -> usize {
        let r = wait_until("a new writable leader", Duration::from_secs(120), || {
            let l = self.leader().filter(|&l| l != old)?;
            self.psql(l, "SELECT pg_is_in_recovery()")
                .ok()
                .filter(|v| v == "f")
                .map(|_| l)
        });
        r.unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// An etcd client on this cluster's keys, as an operator tool (patronictl) would use.
    pub async fn operator_dcs(&self) -> Etcd3Dcs {
        Etcd3Dcs::connect(EtcdOptions {
            endpoints: self.etcd.endpoints(),
            namespace: "/service".into(),
            scope: self.scope.clone(),
            member_name: "test-operator".into(),
            retry_timeout: Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .expect("etcd client")
    }

    /// Runs `f` with an operator etcd client on a private runtime (for plain `#[test]`s).
    pub fn with_operator_dcs<T>(&self, f: impl AsyncFnOnce(&Etcd3Dcs) -> T) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dcs = self.operator_dcs().await;
            f(&dcs).await
        })
    }

    /// Writes the `failover` key like `patronictl switchover` does when the REST call fails.
    pub fn request_switchover(&self, leader: &str, candidate: Option<&str>) {
        let value = pgvigil_api::FailoverValue {
            leader: Some(leader.to_string()),
            member: candidate.map(str::to_string),
            scheduled_at: None,
        };
        self.with_operator_dcs(async |dcs| {
            dcs.set_failover(&value, None)
                .await
                .expect("failover key written")
        });
    }
}
