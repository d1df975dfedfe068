//! Test fixtures: real PostgreSQL 15 instances in temporary directories, on free local ports,
//! stopped by pid when the fixture is dropped.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pgvigil_postgres::{ConfigFiles, PgSettings, PgStatus, PgUser, Postgres, RecoveryConf, find_bin_dir};
use tempfile::TempDir;

pub const SUPERUSER: &str = "vigil_admin";
/// Passwords with every character that needs escaping somewhere (SQL, pgpass, conninfo).
pub const SUPERUSER_PASSWORD: &str = r#"pa'ss\:w"rd 1"#;
pub const REPLICATION: &str = "replicator";
pub const REPLICATION_PASSWORD: &str = r"re:pl\ic'a tor";
pub const REWIND: &str = "rewinder";
pub const REWIND_PASSWORD: &str = "rw pass";

pub const SHORT: Duration = Duration::from_secs(10);
pub const LONG: Duration = Duration::from_secs(60);

/// initdb and postgres refuse to run as root: when the tests run as root (CI), the whole test
/// process becomes the `postgres` user before any temporary directory is created.
pub fn become_postgres() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .expect("look up the postgres user")
                .expect("a postgres user exists");
            nix::unistd::setgroups(&[user.gid]).expect("setgroups");
            nix::unistd::setgid(user.gid).expect("setgid");
            nix::unistd::setuid(user.uid).expect("setuid");
            // The checkout may not be readable by postgres; nothing here uses relative paths.
            std::env::set_current_dir("/").expect("chdir /");
        }
    });
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("local addr")
        .port()
}

pub struct Node {
    pub name: String,
    pub dir: TempDir,
    pub pg: Postgres,
    pub port: u16,
    pids: Mutex<Vec<i32>>,
}

impl Node {
    pub fn new(name: &str) -> Node {
        become_postgres();
        let dir = tempfile::Builder::new()
            .prefix("pgvigil-pg.")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let data_dir = dir.path().join("data");
        let settings = PgSettings {
            data_dir: data_dir.clone(),
            config_dir: data_dir,
            bin_dir: find_bin_dir().expect("PostgreSQL binaries"),
            listen_host: "127.0.0.1".into(),
            unix_socket_dir: None,
            local_tls: pgvigil_postgres::LocalTls::default(),
            port,
            database: "postgres".into(),
            superuser: PgUser::new(SUPERUSER, Some(SUPERUSER_PASSWORD)),
            replication: PgUser::new(REPLICATION, Some(REPLICATION_PASSWORD)),
            rewind: PgUser::new(REWIND, Some(REWIND_PASSWORD)),
            pgpass: dir.path().join("pgpass"),
            pg_ctl_timeout: LONG,
            name: name.into(),
        };
        Node {
            name: name.into(),
            dir,
            pg: Postgres::new(settings),
            port,
            pids: Mutex::new(Vec::new()),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn parameters(&self) -> BTreeMap<String, String> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        [
            ("listen_addresses", "127.0.0.1".to_string()),
            ("unix_socket_directories", dir.clone()),
            ("cluster_name", "pgvigil-test".into()),
            ("shared_buffers", "16MB".into()),
            ("max_connections", "30".into()),
            // logical: the slot tests create a logical slot.
            ("wal_level", "logical".into()),
            ("hot_standby", "on".into()),
            ("wal_log_hints", "on".into()),
            ("max_wal_senders", "10".into()),
            ("max_replication_slots", "10".into()),
            ("wal_keep_size", "128MB".into()),
            ("fsync", "off".into()),
            ("logging_collector", "on".into()),
            ("log_directory", format!("{dir}/log")),
            ("log_line_prefix", "%m [%p] %q%a ".into()),
            ("wal_receiver_status_interval", "1s".into()),
            ("log_statement", "all".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn hba() -> Vec<String> {
        [
            "local all all trust",
            "host replication replicator 127.0.0.1/32 scram-sha-256",
            "host all all 127.0.0.1/32 scram-sha-256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn files(&self, recovery: Option<RecoveryConf>) -> ConfigFiles {
        ConfigFiles {
            parameters: self.parameters(),
            recovery,
            pg_hba: Some(Self::hba()),
            ..Default::default()
        }
    }

    /// Recovery settings to follow `upstream`, with our slot.
    pub fn follow(&self, upstream: &Node) -> RecoveryConf {
        RecoveryConf {
            primary_conninfo: Some(Postgres::primary_conninfo(
                "127.0.0.1",
                upstream.port,
                self.pg.settings(),
            )),
            primary_slot_name: Some(pgvigil_postgres::slot_name_for(&self.name)),
            ..Default::default()
        }
    }

    pub async fn start(&self) {
        self.pg
            .start(LONG)
            .await
            .unwrap_or_else(|e| panic!("{}: start failed: {e}\n{}", self.name, self.log_tail()));
        self.remember_pid();
    }

    pub fn remember_pid(&self) {
        if let Some(pid) = self.pg.postmaster_pid() {
            self.pids.lock().unwrap().push(pid);
        }
    }

    /// initdb, write the configuration, start, create the roles and the pgpass file.
    pub async fn init_primary(&self) {
        self.pg
            .initdb(&["--no-sync".into(), "--auth=trust".into()])
            .await
            .expect("initdb");
        self.pg.write_config(&self.files(None)).expect("write_config");
        self.start().await;
        self.pg.create_roles().await.expect("create_roles");
        self.pg
            .write_pgpass(&[("127.0.0.1".into(), self.port)])
            .expect("pgpass");
    }

    pub async fn state(&self) -> PgStatus {
        self.pg.query_state(SHORT).await.expect("query_state")
    }

    /// Polls `query_state` until `pred` holds (bounded).
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&PgStatus) -> bool) -> PgStatus {
        let deadline = Instant::now() + LONG;
        loop {
            let last = match self.pg.query_state(SHORT).await {
                Ok(s) if pred(&s) => return s,
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                panic!(
                    "{}: timed out waiting for {what}; last: {last}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn scalar(&self, sql: &str) -> Option<String> {
        let rows = self.pg.query_rows(sql, SHORT).await.expect(sql);
        rows.into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten())
    }

    /// Everything the servers logged.
    pub fn log_text(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.path("log")) {
            for f in entries.flatten() {
                out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
            }
        }
        out
    }

    /// The last lines of the server logs, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.path("log")) {
            let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(40);
                out.push_str(&format!("--- {}\n{}\n", f.display(), lines[from..].join("\n")));
            }
        }
        out
    }
}

fn is_postgres(pid: i32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().contains("postgres"))
        .unwrap_or(false)
}

impl Drop for Node {
    /// Stops every postmaster this node started, by pid: SIGQUIT, then SIGKILL; bounded.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{} server log:\n{}", self.name, self.log_tail());
        }
        let _ = self.pg.kill_immediately();
        let mut pids = self.pids.lock().unwrap().clone();
        pids.extend(self.pg.postmaster_pid());
        for pid in &pids {
            if is_postgres(*pid) {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGQUIT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids.iter().any(|p| is_postgres(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in pids {
            if is_postgres(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}
