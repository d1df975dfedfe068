//! The configuration file each host's agent gets: the same YAML for pgvigil and Patroni, with
//! the host's own addresses, the lab's timings and, in a TLS lab, the certificates.

use std::path::Path;

use super::{API_PORT, NetCluster, PG_PORT};
use crate::cluster::{REPLICATION_PASSWORD, REPLICATION_USER, SUPERUSER, SUPERUSER_PASSWORD};

impl NetCluster {
    pub(super) fn config_yaml(&self, i: usize, bin_dir: &Path) -> String {
        let node = &self.nodes[i];
        let o = &self.options;
        let extra = o.extra_node_yaml.get(i).cloned().unwrap_or_default();
        let subnet = self.lab.subnet();
        let tls = self.pki.as_ref().map(|p| p.yaml(i)).unwrap_or_default();
        format!(
            r#"scope: {scope}
namespace: /service
name: {name}
restapi:
  listen: {ip}:{api}
  connect_address: {ip}:{api}
{rest_tls}etcd3:
  hosts: {hosts}
{etcd_tls}bootstrap:
  dcs:
{timings}    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 100
        wal_keep_size: 128MB
        wal_log_hints: 'on'
{extra_dcs}
  initdb:
  - encoding: UTF8
  - data-checksums
postgresql:
  listen: {ip}:{pg}
  connect_address: {ip}:{pg}
  data_dir: {data}
  bin_dir: {bin_dir}{pg_ctl_timeout}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: {su}
      password: {su_pw}
{su_tls}    replication:
      username: {rep}
      password: {rep_pw}
{rep_tls}  parameters:
    unix_socket_directories: '{dir}'
    shared_buffers: 16MB
    fsync: 'off'
{pg_tls}  pg_hba:
  - local all all trust
  - {host} all all {subnet} scram-sha-256{clientcert}
  - {host} replication {rep} {subnet} scram-sha-256{clientcert}
{watchdog}{extra_all}
{extra}
"#,
            rest_tls = tls.rest,
            etcd_tls = tls.etcd,
            su_tls = tls.superuser,
            rep_tls = tls.replication,
            pg_tls = tls.parameters,
            host = tls.hba_type(),
            clientcert = tls.hba_options,
            scope = self.scope,
            name = node.name,
            ip = node.ip,
            api = API_PORT,
            pg = PG_PORT,
            hosts = self.etcd_hosts(),
            timings = if o.default_timings {
                String::new()
            } else {
                format!(
                    "    ttl: {}\n    loop_wait: {}\n    retry_timeout: {}\n",
                    o.ttl, o.loop_wait, o.retry_timeout
                )
            },
            extra_dcs = o.extra_dcs,
            data = node.data_dir.display(),
            bin_dir = bin_dir.display(),
            dir = node.dir.display(),
            su = SUPERUSER,
            su_pw = SUPERUSER_PASSWORD,
            rep = REPLICATION_USER,
            rep_pw = REPLICATION_PASSWORD,
            extra_all = o.extra_yaml,
            pg_ctl_timeout = o
                .pg_ctl_timeout
                .map_or(String::new(), |t| format!("\n  pg_ctl_timeout: {t}")),
            watchdog = if o.watchdog {
                format!(
                    "watchdog:\n  mode: required\n  driver: testing\n  device: {}/watchdog.fifo\n  safety_margin: 5\n",
                    node.dir.display()
                )
            } else {
                String::new()
            },
        )
    }
}
