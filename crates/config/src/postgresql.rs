//! The `postgresql` section (`docs/patroni-compat.md` §3.6).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::model::MethodConfig;

/// `postgresql` section: the managed instance.
#[derive(Debug, Clone, PartialEq)]
pub struct PostgresqlConfig {
    /// `listen` (required): `host[,host2...]:port` → `listen_addresses` and `port` (default
    /// port 5432 when omitted). The first host is used for local TCP connections.
    pub listen: String,
    /// `connect_address` (required): `host:port` published as `conn_url`; must be reachable by
    /// the other members.
    pub connect_address: String,
    /// `proxy_address`: `host:port` published as `proxy_url`.
    pub proxy_address: Option<String>,
    /// `data_dir` (required): PGDATA.
    pub data_dir: PathBuf,
    /// `config_dir` (default: `data_dir`): where `postgresql.conf`, `pg_hba.conf` and
    /// `pg_ident.conf` are written.
    pub config_dir: Option<PathBuf>,
    /// `bin_dir` (default: search `PATH`): directory of the PostgreSQL binaries.
    pub bin_dir: Option<PathBuf>,
    /// `bin_name`: per-binary name overrides (`pg_ctl`, `initdb`, `pg_controldata`,
    /// `pg_basebackup`, `postgres`, `pg_isready`, `pg_rewind`).
    pub bin_name: BTreeMap<String, String>,
    /// `pgpass` (default `~/pgpass`): the password file pgvigil writes for libpq tools.
    pub pgpass: PathBuf,
    /// `database` (default `postgres`): database for local connections and in `conn_url`.
    pub database: String,
    /// `authentication` (required): the roles pgvigil uses.
    pub authentication: PgAuthentication,
    /// `use_unix_socket` (default false): connect locally through the first absolute directory
    /// of `unix_socket_directories` instead of TCP.
    pub use_unix_socket: bool,
    /// `use_unix_socket_repl` (default false): same for local replication connections.
    pub use_unix_socket_repl: bool,
    /// `parameters`: GUCs. These override the dynamic ones, except Patroni-controlled GUCs
    /// (§3.9), which only the dynamic configuration may set (see [`crate::effective_parameters`]).
    pub parameters: BTreeMap<String, Value>,
    /// `parameters_<role>`, `pg_hba_<role>`, `pg_ident_<role>` for roles `primary`, `replica`,
    /// `standby_leader`; only roles that have at least one override appear.
    pub role_overrides: BTreeMap<String, RoleOverrides>,
    /// `pg_hba`: `pg_hba.conf` lines managed by pgvigil (overrides the dynamic value).
    pub pg_hba: Option<Vec<String>>,
    /// `pg_ident`: `pg_ident.conf` lines managed by pgvigil (overrides the dynamic value).
    pub pg_ident: Option<Vec<String>>,
    /// `use_pg_rewind`: overrides the dynamic `postgresql.use_pg_rewind` (default false) when set.
    pub use_pg_rewind: Option<bool>,
    /// `use_slots`: read for completeness only; Patroni uses the dynamic value exclusively
    /// (a warning is given when it is set locally).
    pub use_slots: Option<bool>,
    /// `rewind`: extra `pg_rewind` options, rendered as arguments.
    pub rewind: Vec<String>,
    /// `basebackup`: extra `pg_basebackup` options, rendered as arguments (`--checkpoint=fast`).
    /// Options pgvigil sets itself are rejected; `compress` only as server-side compression.
    pub basebackup: Vec<String>,
    /// `create_replica_methods` (default `[basebackup]`): methods tried in order to clone a replica.
    pub create_replica_methods: Vec<String>,
    /// The `postgresql.<method>` sections of custom replica methods.
    pub replica_methods: BTreeMap<String, MethodConfig>,
    /// `recovery_conf`: extra recovery settings (e.g. `restore_command`).
    pub recovery_conf: BTreeMap<String, Value>,
    /// `custom_conf`: a base configuration file included instead of `postgresql.base.conf`.
    pub custom_conf: Option<PathBuf>,
    /// `callbacks`: `on_start`, `on_stop`, `on_restart`, `on_reload`, `on_role_change` scripts,
    /// each already split into words (`docs/patroni-compat.md` §5.9).
    pub callbacks: BTreeMap<String, Vec<String>>,
    /// `pre_promote`: fencing script that must exit 0 before a promotion (split into words).
    pub pre_promote: Option<Vec<String>>,
    /// `before_stop`: script run before PostgreSQL is stopped, exit code ignored (split into words).
    pub before_stop: Option<Vec<String>>,
    /// `pg_ctl_timeout` (default 60): seconds to wait for PostgreSQL to start or stop.
    pub pg_ctl_timeout: u64,
    /// `remove_data_directory_on_rewind_failure` (default false).
    pub remove_data_directory_on_rewind_failure: bool,
    /// `remove_data_directory_on_diverged_timelines` (default false).
    pub remove_data_directory_on_diverged_timelines: bool,
    /// `krbsrvname`: Kerberos service name for connections.
    pub krbsrvname: Option<String>,
}

impl Default for PostgresqlConfig {
    fn default() -> Self {
        PostgresqlConfig {
            listen: String::new(),
            connect_address: String::new(),
            proxy_address: None,
            data_dir: PathBuf::new(),
            config_dir: None,
            bin_dir: None,
            bin_name: BTreeMap::new(),
            pgpass: PathBuf::from("pgpass"),
            database: "postgres".to_string(),
            authentication: PgAuthentication::default(),
            use_unix_socket: false,
            use_unix_socket_repl: false,
            parameters: BTreeMap::new(),
            role_overrides: BTreeMap::new(),
            pg_hba: None,
            pg_ident: None,
            use_pg_rewind: None,
            use_slots: None,
            rewind: Vec::new(),
            basebackup: Vec::new(),
            create_replica_methods: vec!["basebackup".to_string()],
            replica_methods: BTreeMap::new(),
            recovery_conf: BTreeMap::new(),
            custom_conf: None,
            callbacks: BTreeMap::new(),
            pre_promote: None,
            before_stop: None,
            pg_ctl_timeout: 60,
            remove_data_directory_on_rewind_failure: false,
            remove_data_directory_on_diverged_timelines: false,
            krbsrvname: None,
        }
    }
}

impl PostgresqlConfig {
    /// `listen_addresses` and `port` derived from `listen`.
    pub fn listen_addresses_and_port(&self) -> (String, u16) {
        split_host_port(&self.listen, Some(5432)).unwrap_or_else(|| (self.listen.clone(), 5432))
    }

    /// Host and port of `connect_address`.
    pub fn connect_host_port(&self) -> (String, u16) {
        split_host_port(&self.connect_address, Some(5432))
            .unwrap_or_else(|| (self.connect_address.clone(), 5432))
    }

    /// `config_dir`, or `data_dir` when not set.
    pub fn effective_config_dir(&self) -> &Path {
        self.config_dir.as_deref().unwrap_or(&self.data_dir)
    }

    /// The `basebackup` arguments for a given PostgreSQL major version: `--compress` (only
    /// server-side compression is accepted at all) needs PostgreSQL 15 and is dropped before.
    pub fn basebackup_args(&self, pg_major: u32) -> Vec<String> {
        self.basebackup
            .iter()
            .filter(|a| pg_major >= 15 || !a.starts_with("--compress"))
            .cloned()
            .collect()
    }
}

/// Splits `host:port` like Patroni: at the last `:`; brackets around IPv6 hosts are removed;
/// `host[,host2]` keeps its commas. Without a port, `default_port` is used (None → invalid).
pub fn split_host_port(value: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let value = value.trim();
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => (host, port.trim().parse::<u16>().ok()?),
        None => (value, default_port?),
    };
    let host = if host.contains(':') {
        host.split(',')
            .map(|h| h.trim().trim_matches(['[', ']']))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        host.trim().to_string()
    };
    Some((host, port))
}

/// A PostgreSQL role's credentials and libpq connection options
/// (`postgresql.authentication.<superuser|replication|rewind>`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgCredentials {
    /// `username` (required).
    pub username: String,
    /// `password`: written to the pgpass file, never put on a command line.
    pub password: Option<String>,
    /// `sslmode`.
    pub sslmode: Option<String>,
    /// `sslcert`.
    pub sslcert: Option<String>,
    /// `sslkey`.
    pub sslkey: Option<String>,
    /// `sslpassword`.
    pub sslpassword: Option<String>,
    /// `sslrootcert`.
    pub sslrootcert: Option<String>,
    /// `sslcrl`.
    pub sslcrl: Option<String>,
    /// `sslcrldir`.
    pub sslcrldir: Option<String>,
    /// `sslnegotiation`.
    pub sslnegotiation: Option<String>,
    /// `gssencmode`.
    pub gssencmode: Option<String>,
    /// `channel_binding`.
    pub channel_binding: Option<String>,
}

impl fmt::Debug for PgCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PgCredentials");
        d.field("username", &self.username);
        d.field("password", &self.password.as_ref().map(|_| "<redacted>"));
        for (k, v) in self.libpq_options() {
            d.field(k, &if k == "sslpassword" { "<redacted>" } else { v });
        }
        d.finish()
    }
}

impl PgCredentials {
    /// The libpq keywords this entry sets, other than `user`/`password`, in a stable order.
    pub fn libpq_options(&self) -> Vec<(&'static str, &str)> {
        [
            ("sslmode", &self.sslmode),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
            ("sslpassword", &self.sslpassword),
            ("sslrootcert", &self.sslrootcert),
            ("sslcrl", &self.sslcrl),
            ("sslcrldir", &self.sslcrldir),
            ("sslnegotiation", &self.sslnegotiation),
            ("gssencmode", &self.gssencmode),
            ("channel_binding", &self.channel_binding),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}

/// `postgresql.authentication`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PgAuthentication {
    /// `superuser` (required): used for local connections, initdb and post-bootstrap.
    pub superuser: PgCredentials,
    /// `replication` (required): used by replicas to stream and for pg_basebackup.
    pub replication: PgCredentials,
    /// `rewind`: used for pg_rewind on PostgreSQL ≥ 11 (default: the superuser).
    pub rewind: Option<PgCredentials>,
}

impl PgAuthentication {
    /// The role pg_rewind connects as: `rewind` if configured, else `superuser`.
    pub fn rewind_or_superuser(&self) -> &PgCredentials {
        self.rewind.as_ref().unwrap_or(&self.superuser)
    }
}

/// Role-specific overrides (`parameters_<role>`, `pg_hba_<role>`, `pg_ident_<role>`), applied
/// by role: `primary`, `replica`, `standby_leader`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleOverrides {
    /// `parameters_<role>`: merged over `parameters` (Patroni-controlled GUCs excluded).
    pub parameters: Option<BTreeMap<String, Value>>,
    /// `pg_hba_<role>`: replaces `pg_hba` entirely.
    pub pg_hba: Option<Vec<String>>,
    /// `pg_ident_<role>`: replaces `pg_ident` entirely.
    pub pg_ident: Option<Vec<String>>,
}
