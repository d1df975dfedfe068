//! `pgvigil vip CONFIG.yml`: the floating address that follows the leader.
//!
//! Every host runs it with the same `vip:` section; the address is held by the host whose
//! member (this file's `name`) holds the leader key of `scope` and whose member key says it is
//! a running primary, the same rule as the router's port 5000 and as vip-manager's etcd
//! trigger (leader key == member name). Clients keep one address when the leader's host dies:
//! the new leader's host adds it and announces it with gratuitous ARP.
//!
//! * Decision: re-read on every etcd watch event and at least once a second.
//! * When etcd cannot be read, the address stays only until [`release_after`] has passed since
//!   the last read that confirmed it: `(ttl - loop_wait) / 2`, so it is gone before the leader
//!   key (renewed at most `loop_wait` before that read) can expire and be taken by another
//!   member. Like vip-manager 5, a leader kept writable by `failsafe_mode` during an etcd outage
//!   loses the address after that time.
//! * The address is checked on every pass (`ip -o addr show`), so one removed by hand comes
//!   back, and one added by hand on a non-leader goes.
//! * SIGTERM/SIGINT remove the address before exiting; `pgvigil vip --release` removes it
//!   without starting (for `ExecStopPost`, which also runs after a crash). SIGHUP re-reads the
//!   file; a changed address or interface releases the old one first.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgvigil_api::{ClusterView, PgState, Role};
use pgvigil_config::VipConfig;
use pgvigil_dcs::{Dcs, Etcd3Dcs};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::garp;
use crate::watch::{READ_TIMEOUT, RESYNC_INTERVAL, etcd_options};

/// Gratuitous ARP announcements after taking the address, one per pass: the first updates
/// the neighbours at once, the repeats cover a frame lost while the switch learns the port.
const ANNOUNCEMENTS: u32 = 3;

/// Whether the member `name` should hold the address according to `view`.
pub fn leader_is(view: &ClusterView, name: &str) -> bool {
    view.leader_name() == Some(name)
        && view
            .leader_member()
            .is_some_and(|m| m.data.role() == Some(Role::Primary) && m.data.state() == PgState::Running)
}

/// How long the address may stay without a read of etcd confirming it: half of what is left
/// of the leader's lease after the longest time since its last renewal (`loop_wait`).
pub fn release_after(view: Option<&ClusterView>) -> Duration {
    let setting = |key: &str, default: u64| {
        view.and_then(|v| v.config.as_ref())
            .and_then(|c| c.value.get(key))
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            })
            .unwrap_or(default)
    };
    let ttl = setting("ttl", 30);
    let loop_wait = setting("loop_wait", 10);
    Duration::from_secs((ttl.saturating_sub(loop_wait) / 2).max(1))
}

/// What one pass decides, from what it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Hold,
    Release,
}

/// The decision: `read` is this pass's result (`Some(true)` = the cluster names us),
/// `confirmed_at` when a read last named us, `limit` the grace without etcd.
pub fn decide(read: Option<bool>, confirmed_at: Option<Instant>, limit: Duration, now: Instant) -> Want {
    match read {
        Some(true) => Want::Hold,
        Some(false) => Want::Release,
        None => match confirmed_at {
            Some(t) if now.duration_since(t) < limit => Want::Hold,
            _ => Want::Release,
        },
    }
}

/// The address on its interface, through iproute2.
pub struct Address {
    vip: VipConfig,
}

impl Address {
    pub fn new(vip: VipConfig) -> Address {
        Address { vip }
    }

    fn cidr(&self) -> String {
        format!("{}/{}", self.vip.ip, self.vip.netmask)
    }

    fn ip(args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .with_context(|| format!("running `ip {}` (is iproute2 installed?)", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn present(&self) -> anyhow::Result<bool> {
        let out = Self::ip(&["-o", "-4", "addr", "show", "dev", &self.vip.interface])?;
        let needle = format!(" inet {}/", self.vip.ip);
        Ok(out.lines().any(|l| l.contains(&needle)))
    }

    pub fn add(&self) -> anyhow::Result<()> {
        Self::ip(&["addr", "add", &self.cidr(), "dev", &self.vip.interface]).map(drop)
    }

    pub fn delete(&self) -> anyhow::Result<()> {
        Self::ip(&["addr", "del", &self.cidr(), "dev", &self.vip.interface]).map(drop)
    }

    pub fn announce(&self) -> anyhow::Result<()> {
        garp::announce(&self.vip.interface, self.vip.ip)
    }

    /// Removes the address if it is there; true when it was.
    pub fn release(&self) -> anyhow::Result<bool> {
        if self.present()? {
            self.delete()?;
            tracing::info!(address = %self.cidr(), interface = %self.vip.interface, "released the floating address");
            return Ok(true);
        }
        Ok(false)
    }
}

fn vip_of(config: &pgvigil_config::Config, path: Option<&Path>) -> anyhow::Result<VipConfig> {
    config.vip.clone().with_context(|| {
        format!(
            "{}: no `vip:` section (vip.ip, vip.netmask, vip.interface) to manage",
            path.map_or_else(|| "the configuration".to_string(), |p| p.display().to_string())
        )
    })
}

/// `pgvigil vip --release`: removes the address if this host has it.
pub fn release_only(config: &pgvigil_config::Config, path: Option<&Path>) -> anyhow::Result<()> {
    Address::new(vip_of(config, path)?).release().map(drop)
}

/// Runs until `stop` is cancelled, then releases the address.
pub async fn run(
    mut config: pgvigil_config::Config,
    path: Option<std::path::PathBuf>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut address = Address::new(vip_of(&config, path.as_deref())?);
    // Fail at start-up, not at the first leader change, when `ip` or the interface is missing.
    let mut holding = address.present().with_context(|| {
        format!(
            "checking interface {}",
            config.vip.as_ref().map_or("", |v| &v.interface)
        )
    })?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut dcs = Etcd3Dcs::connect(etcd_options(&config).context("etcd3 TLS settings")?).await?;
    let mut events = dcs.subscribe();
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut confirmed_at: Option<Instant> = None;
    let mut last_view: Option<ClusterView> = None;
    let mut announcements_left = 0u32;
    let mut failing = false;
    tracing::info!(
        address = %address.cidr(), interface = %config.vip.as_ref().map_or("", |v| &v.interface),
        member = %config.name, scope = %config.scope,
        "following the leader key with the floating address"
    );
    loop {
        let read =
            match tokio::time::timeout(READ_TIMEOUT + Duration::from_millis(500), dcs.get_cluster()).await {
                Ok(Ok(view)) => {
                    if failing {
                        tracing::info!("etcd answers again");
                        failing = false;
                    }
                    let ours = leader_is(&view, &config.name);
                    last_view = Some(view);
                    Some(ours)
                }
                Ok(Err(e)) => {
                    if !failing {
                        tracing::warn!("cannot read the cluster from etcd: {e}");
                        failing = true;
                    }
                    None
                }
                Err(_) => {
                    if !failing {
                        tracing::warn!("etcd did not answer within {READ_TIMEOUT:?}");
                        failing = true;
                    }
                    None
                }
            };
        let now = Instant::now();
        if read == Some(true) {
            confirmed_at = Some(now);
        }
        let want = decide(read, confirmed_at, release_after(last_view.as_ref()), now);
        match apply(&address, want, &mut holding, &mut announcements_left) {
            Ok(()) => {}
            Err(e) => tracing::error!("floating address: {e:#}"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
            _ = events.recv() => {}
            _ = hup.recv() => {
                match reload(path.as_deref(), &config) {
                    Ok(Some(new)) => {
                        let new_vip = new.vip.clone().expect("reload checks the vip section");
                        if config.vip.as_ref() != Some(&new_vip) {
                            if let Err(e) = address.release() {
                                tracing::error!("releasing the old floating address: {e:#}");
                            }
                            address = Address::new(new_vip);
                            holding = address.present().unwrap_or(false);
                        }
                        // Cheap, and covers a changed scope, namespace or etcd setting alike.
                        dcs = Etcd3Dcs::connect(etcd_options(&new).context("etcd3 TLS settings")?).await?;
                        events = dcs.subscribe();
                        config = new;
                        confirmed_at = None;
                        tracing::info!("configuration reloaded");
                    }
                    Ok(None) => tracing::info!("configuration unchanged"),
                    Err(e) => tracing::error!("reload refused, the running configuration stays: {e:#}"),
                }
            }
        }
        // Coalesce a burst of changes into one read.
        while events.try_recv().is_ok() {}
    }
    address
        .release()
        .context("releasing the floating address on shutdown")?;
    Ok(())
}

fn apply(
    address: &Address,
    want: Want,
    holding: &mut bool,
    announcements_left: &mut u32,
) -> anyhow::Result<()> {
    let present = address.present()?;
    match (want, present) {
        (Want::Hold, false) => {
            address.add()?;
            tracing::info!(address = %address.cidr(), "this member leads: took the floating address");
            *announcements_left = ANNOUNCEMENTS;
        }
        (Want::Release, true) => {
            address.delete()?;
            tracing::info!(address = %address.cidr(), "this member does not lead: released the floating address");
            *announcements_left = 0;
        }
        _ => {}
    }
    *holding = want == Want::Hold;
    if *holding && *announcements_left > 0 {
        *announcements_left -= 1;
        address.announce().context("sending gratuitous ARP")?;
    }
    Ok(())
}

fn reload(
    path: Option<&Path>,
    current: &pgvigil_config::Config,
) -> anyhow::Result<Option<pgvigil_config::Config>> {
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with("PATRONI_"))
        .collect();
    let loaded = pgvigil_config::load(path, &env).map_err(|e| anyhow::anyhow!("{e}"))?;
    vip_of(&loaded.config, path)?;
    if loaded.config.raw == current.raw {
        return Ok(None);
    }
    Ok(Some(loaded.config))
}

#[cfg(test)]
mod tests {
    use pgvigil_api::Keys;
    use pgvigil_api::cluster::RawKv;

    use super::*;

    fn view(leader: Option<&str>, members: &[(&str, &str, &str)], config: Option<&str>) -> ClusterView {
        let keys = Keys::new("/service", "demo");
        let mut kvs = Vec::new();
        let kv = |key: String, value: &str| RawKv {
            key,
            value: value.into(),
            mod_revision: 1,
            lease: 1,
        };
        if let Some(l) = leader {
            kvs.push(kv("/service/demo/leader".into(), l));
        }
        for (name, role, state) in members {
            let value = format!(
                r#"{{"conn_url":"postgres://10.0.0.1:5432/postgres","api_url":"http://10.0.0.1:8008/patroni","role":"{role}","state":"{state}"}}"#
            );
            kvs.push(kv(format!("/service/demo/members/{name}"), &value));
        }
        if let Some(c) = config {
            kvs.push(kv("/service/demo/config".into(), c));
        }
        ClusterView::from_kvs(&keys, 1, kvs)
    }

    #[test]
    fn only_the_running_primary_holding_the_key_leads() {
        let v = view(
            Some("node1"),
            &[("node1", "primary", "running"), ("node2", "replica", "running")],
            None,
        );
        assert!(leader_is(&v, "node1"));
        assert!(!leader_is(&v, "node2"));
        let promoting = view(Some("node2"), &[("node2", "replica", "running")], None);
        assert!(
            !leader_is(&promoting, "node2"),
            "a leader that is not primary yet"
        );
        let stopped = view(Some("node1"), &[("node1", "primary", "stopped")], None);
        assert!(!leader_is(&stopped, "node1"));
        let no_key = view(None, &[("node1", "primary", "running")], None);
        assert!(!leader_is(&no_key, "node1"), "a primary without the leader key");
        let legacy = view(Some("node1"), &[("node1", "master", "running")], None);
        assert!(leader_is(&legacy, "node1"), "Patroni 2's role name");
    }

    #[test]
    fn grace_without_etcd_comes_from_ttl_and_loop_wait() {
        assert_eq!(release_after(None), Duration::from_secs(10));
        let v = view(None, &[], Some(r#"{"ttl":20,"loop_wait":2}"#));
        assert_eq!(release_after(Some(&v)), Duration::from_secs(9));
        let tight = view(None, &[], Some(r#"{"ttl":"10","loop_wait":10}"#));
        assert_eq!(release_after(Some(&tight)), Duration::from_secs(1));
    }

    #[test]
    fn decisions() {
        let t0 = Instant::now();
        let limit = Duration::from_secs(10);
        assert_eq!(decide(Some(true), None, limit, t0), Want::Hold);
        assert_eq!(decide(Some(false), Some(t0), limit, t0), Want::Release);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(
            decide(None, Some(t0), limit, later),
            Want::Hold,
            "etcd briefly away"
        );
        let too_late = t0 + Duration::from_secs(10);
        assert_eq!(decide(None, Some(t0), limit, too_late), Want::Release);
        assert_eq!(decide(None, None, limit, t0), Want::Release, "never confirmed");
    }
}
