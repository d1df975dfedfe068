//! Everything pgvigil does to the local PostgreSQL (`docs/patroni-compat.md` §5): start, stop, reload
//! and promote the postmaster, write its configuration files, create a cluster (`initdb`) or a
//! replica (`pg_basebackup`), rewind it (`pg_rewind`), read `pg_controldata`, run the per-cycle
//! monitoring query and the few administrative statements (roles, slots, CHECKPOINT).
//!
//! No HA decision is made here: every function does what it is told, within a timeout, and
//! reports what happened. The engine decides; the runtime calls these functions.
//!
//! The agent must run as the operating-system user that owns the data directory (PostgreSQL
//! refuses to run as root). Supported servers: PostgreSQL 13 and later (the monitoring query
//! reads columns added in 13); the tests run against 15.
//!
//! Typical sequences (the runtime decides which one, and when):
//! * new cluster: [`Postgres::initdb`] → [`Postgres::write_config`] → [`Postgres::start`] →
//!   [`Postgres::create_roles`];
//! * new replica: [`Postgres::write_pgpass`] → [`Postgres::basebackup`] →
//!   [`Postgres::write_config`] with a [`RecoveryConf`] → [`Postgres::start`];
//! * rejoin after divergence: [`Postgres::stop`] → [`Postgres::rewind`] →
//!   [`Postgres::write_config`] with a [`RecoveryConf`] → [`Postgres::start`];
//! * failover: [`Postgres::promote`] → [`Postgres::write_config`] without recovery →
//!   [`Postgres::execute`]`("CHECKPOINT")`;
//! * self-fencing: [`Postgres::kill_immediately`] (synchronous).

mod command;
mod conf;
mod conninfo;
mod controldata;
mod datadir;
mod error;
mod logical_slots;
mod method;
mod process;
mod remote;
mod replica;
mod roles;
mod slots;
mod sql;
mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use conf::{
    CONTROLLED_GUCS, ConfigFiles, RECOVERY_PARAMETERS, RecoveryConf, Restore, quote_conf_value,
    render_postgresql_conf,
};
pub use conninfo::{conninfo_escape, pgpass_escape};
pub use controldata::{ClusterState, ControlData};
pub use datadir::DataDirState;
pub use error::PgError;
pub use logical_slots::PrimaryLogicalSlot;
pub use pgvigil_api::slots::slot_name_for;
pub use process::StopMode;
pub use remote::{SystemIdentity, TimelineHistoryEntry, parse_timeline_history};
pub use sql::{PgStatus, SlotInfo, WalSender};
pub use tls::{LocalTls, TLS_KEYWORDS};

/// How pgvigil reaches and runs the local PostgreSQL. Built by the runtime from the `postgresql`
/// section of the configuration.
#[derive(Clone)]
pub struct PgSettings {
    pub data_dir: PathBuf,
    /// Where `postgresql.conf`, `postgresql.base.conf`, `pg_hba.conf`, `pg_ident.conf` live;
    /// usually the data directory.
    pub config_dir: PathBuf,
    /// Directory of `postgres`, `pg_ctl`, `initdb`, ... An empty path means [`find_bin_dir`].
    pub bin_dir: PathBuf,
    /// Host of local TCP connections (the first `listen` address; `127.0.0.1` for a wildcard).
    pub listen_host: String,
    /// With `use_unix_socket`: the socket directory the agent's own superuser connection uses
    /// instead of TCP (Patroni's `_get_unix_local_address`).
    pub unix_socket_dir: Option<String>,
    /// TLS of the agent's own superuser connection, prepared (files read and checked) from
    /// `postgresql.authentication.superuser` by [`LocalTls::from_options`].
    pub local_tls: LocalTls,
    pub port: u16,
    /// Database for local connections and DSNs (`postgres`).
    pub database: String,
    pub superuser: PgUser,
    pub replication: PgUser,
    /// User for `pg_rewind`; may equal the superuser.
    pub rewind: PgUser,
    /// The passfile written by [`Postgres::write_pgpass`] and used by libpq tools and
    /// `primary_conninfo`.
    pub pgpass: PathBuf,
    /// Default bound for start/stop/promote waits and for tools without their own timeout.
    pub pg_ctl_timeout: Duration,
    /// Member name: `application_name` of our walreceiver, source of our slot name.
    pub name: String,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("data_dir", &self.data_dir)
            .field("config_dir", &self.config_dir)
            .field("bin_dir", &self.bin_dir)
            .field("listen_host", &self.listen_host)
            .field("unix_socket_dir", &self.unix_socket_dir)
            .field("local_tls", &self.local_tls)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("superuser", &self.superuser)
            .field("replication", &self.replication)
            .field("rewind", &self.rewind)
            .field("pgpass", &self.pgpass)
            .field("pg_ctl_timeout", &self.pg_ctl_timeout)
            .field("name", &self.name)
            .finish()
    }
}

/// A database user; the password is never printed by `Debug`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PgUser {
    pub username: String,
    pub password: Option<String>,
    /// Other libpq keywords of the role (`sslmode`, `sslcert`, ... see [`TLS_KEYWORDS`]), put
    /// into every connection string made for it.
    pub options: Vec<(String, String)>,
}

impl PgUser {
    pub fn new(username: impl Into<String>, password: Option<&str>) -> Self {
        PgUser {
            username: username.into(),
            password: password.map(str::to_string),
            options: Vec::new(),
        }
    }

    /// With libpq keywords (`(keyword, value)`), e.g. `sslmode`.
    pub fn with_options(mut self, options: Vec<(String, String)>) -> Self {
        self.options = options;
        self
    }

    /// The value of a libpq keyword, if set.
    pub fn option(&self, keyword: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// The password unless absent or empty (PostgreSQL treats an empty password as none).
    pub fn effective_password(&self) -> Option<&str> {
        self.password.as_deref().filter(|p| !p.is_empty())
    }
}

impl std::fmt::Debug for PgUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgUser")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "options",
                &self
                    .options
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str(),
                            if k == "sslpassword" {
                                "<redacted>"
                            } else {
                                v.as_str()
                            },
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Handle on the local PostgreSQL. Cheap to share behind an `Arc`; every method takes `&self`.
/// It holds one cached SQL connection (the "Patroni heartbeat" one) and remembers the
/// command-line GUCs of the last [`Postgres::write_config`].
pub struct Postgres {
    settings: PgSettings,
    conn: tokio::sync::Mutex<Option<sql::Conn>>,
    cmdline_gucs: std::sync::Mutex<BTreeMap<String, String>>,
}

impl Postgres {
    pub fn new(mut settings: PgSettings) -> Self {
        if settings.bin_dir.as_os_str().is_empty()
            && let Some(dir) = find_bin_dir()
        {
            settings.bin_dir = dir;
        }
        if settings.config_dir.as_os_str().is_empty() {
            settings.config_dir = settings.data_dir.clone();
        }
        Postgres {
            settings,
            conn: tokio::sync::Mutex::new(None),
            cmdline_gucs: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    pub fn settings(&self) -> &PgSettings {
        &self.settings
    }

    pub fn data_dir(&self) -> &Path {
        &self.settings.data_dir
    }

    /// Path of a PostgreSQL program in `bin_dir`.
    pub fn bin(&self, program: &str) -> PathBuf {
        self.settings.bin_dir.join(program)
    }

    /// `pg_ctl_timeout`, or 60 s when unset.
    fn default_timeout(&self) -> Duration {
        if self.settings.pg_ctl_timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            self.settings.pg_ctl_timeout
        }
    }
}

/// Finds the PostgreSQL binaries: the directory of the first `postgres` on `PATH` (symbolic links
/// resolved) if `pg_ctl` is there too, else the
/// newest `/usr/lib/postgresql/<major>/bin` (Debian) or `/usr/pgsql-<major>/bin` (RPM).
pub fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |dir: &Path| dir.join("postgres").is_file() && dir.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // A PATH entry may hold symbolic links to a few of the programs only (e.g.
            // /usr/local/bin/postgres -> /usr/lib/postgresql/15/bin/postgres): use the
            // directory the binary really lives in.
            let real = std::fs::canonicalize(dir.join("postgres"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf));
            if let Some(real) = real
                && has_tools(&real)
            {
                return Some(real);
            }
        }
    }
    let mut candidates: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    let mut scan = |parent: &str, prefix: &str, suffix: &str| {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(version) = name.strip_prefix(prefix) else {
                continue;
            };
            let Some(key) = version
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()
            else {
                continue;
            };
            let dir = entry.path().join(suffix);
            if has_tools(&dir) {
                candidates.push((key, dir));
            }
        }
    };
    scan("/usr/lib/postgresql", "", "bin");
    scan("/usr", "pgsql-", "bin");
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_passwords() {
        let user = PgUser::new("postgres", Some("s3cret"));
        let text = format!("{user:?}");
        assert!(!text.contains("s3cret") && text.contains("redacted"), "{text}");
        assert_eq!(PgUser::new("x", Some("")).effective_password(), None);
    }

    /// The runtime shares one `Postgres` between tasks and spawns its futures.
    #[allow(dead_code)]
    fn futures_are_send(pg: &Postgres) {
        fn send<T: Send>(_: T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Postgres>();
        let d = Duration::from_secs(1);
        send(pg.query_state(d));
        send(pg.execute("", d));
        send(pg.start(d));
        send(pg.stop(StopMode::Fast, d));
        send(pg.promote(d));
        send(pg.basebackup("h", 1, &[], d));
        send(pg.rewind("h", 1, d));
        send(pg.initdb(&[]));
        send(pg.create_roles());
        send(pg.create_physical_slot(""));
        send(pg.create_logical_slot("", "", ""));
        send(pg.drop_slot(""));
        send(pg.advance_slot("", 0));
        send(pg.controldata());
        send(pg.identify_system("h", 1, d));
    }

    #[test]
    fn finds_installed_binaries() {
        if Path::new("/usr/lib/postgresql/15/bin/postgres").exists() {
            let dir = find_bin_dir().expect("bin dir");
            assert!(dir.join("pg_ctl").is_file());
        }
    }
}
