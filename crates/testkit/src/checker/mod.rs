//! The checker that runs through every fault scenario: ground truth for "no acknowledged write
//! was lost", "never two writable nodes", and the client's write gap.
//!
//! * The **writer** inserts unique, increasing ids through one address (the router's primary
//!   port), one autocommit `INSERT` at a time, and records each id whose `INSERT` returned
//!   success, with the send and acknowledgement instants. A write that timed out or whose
//!   connection broke is *indeterminate* (it may or may not have committed); a write the
//!   server refused is *failed*. Only acknowledged ids are checked for loss.
//! * The **sampler** asks every node directly, several times a second (all nodes at once, each
//!   query bounded), `SELECT pg_is_in_recovery()`, and on a node that says it is not in
//!   recovery commits a probe row (`INSERT` into [`PROBE_TABLE`], the cluster's own
//!   `synchronous_commit`). Each tick records per node whether it was a primary and whether it
//!   acknowledged the probe write. Two primaries in one tick is a split brain as PostgreSQL sees
//!   it; two acknowledged probe writes in one tick is one a client would have seen.
//! * [`Checker::mark`] records labelled instants (fault injected, healed); the [`Report`] gives
//!   the write gap around each: from the last acknowledgement before the mark to the first one
//!   after it.
//!
//! Both loops run on their own threads (each with a small tokio runtime) and use
//! `tokio-postgres` directly: no process per query, so sampling several times a second costs
//! little on a two-core machine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

mod report;
pub use report::Report;

/// Where the writer's ids go.
pub const WRITES_TABLE: &str = "pgvigil_checker_writes";
/// Where the sampler's probe rows go.
pub const PROBE_TABLE: &str = "pgvigil_checker_probe";

/// SQL that creates both tables (run once on the primary before starting the checker).
pub fn setup_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {WRITES_TABLE}(id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now()); \
         CREATE TABLE IF NOT EXISTS {PROBE_TABLE}(node text NOT NULL, at timestamptz NOT NULL DEFAULT now())"
    )
}

#[derive(Clone, Debug)]
pub struct CheckerConfig {
    /// Where the writer connects: one address (a router's primary port), or several (every
    /// node's own port), in which case each connection goes to the one that accepts writes, as
    /// libpq's `target_session_attrs=read-write` does.
    pub write_to: Vec<SocketAddr>,
    /// Every node's PostgreSQL, by member name, for the sampler.
    pub nodes: Vec<(String, SocketAddr)>,
    pub user: String,
    pub password: String,
    pub dbname: String,
    /// Pause after each acknowledged write.
    pub write_every: Duration,
    /// Pause after a failed write or connection attempt.
    pub retry_every: Duration,
    /// A write not answered within this is indeterminate (and cancelled).
    pub write_timeout: Duration,
    pub sample_every: Duration,
    /// Bound on each sampler query (connect, recovery check, probe commit).
    pub probe_timeout: Duration,
    /// TLS for every connection (`sslmode=prefer` with this client configuration: the
    /// certificate for `clientcert=verify-ca`); `None`: plain connections.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The writer's first id (then +1 per write). The default, the current time in
    /// microseconds, keeps ids unique across checkers writing to the same table.
    pub first_id: i64,
}

impl CheckerConfig {
    pub fn new(
        write_to: Vec<SocketAddr>,
        nodes: Vec<(String, SocketAddr)>,
        user: &str,
        password: &str,
    ) -> Self {
        CheckerConfig {
            write_to,
            nodes,
            user: user.into(),
            password: password.into(),
            dbname: "postgres".into(),
            write_every: Duration::from_millis(20),
            retry_every: Duration::from_millis(50),
            write_timeout: Duration::from_secs(5),
            sample_every: Duration::from_millis(200),
            probe_timeout: Duration::from_secs(1),
            tls: None,
            first_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as i64),
        }
    }

    fn pg_config(&self, addrs: &[SocketAddr], timeout: Duration) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        for addr in addrs {
            c.host(addr.ip().to_string()).port(addr.port());
        }
        if addrs.len() > 1 {
            c.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        c.user(&self.user)
            .password(&self.password)
            .dbname(&self.dbname)
            .application_name("pgvigil-checker")
            .connect_timeout(timeout);
        c
    }
}

/// One acknowledged write.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub id: i64,
    pub sent: Instant,
    pub acked: Instant,
}

/// One node's answer in one sampler tick.
#[derive(Clone, Debug, Default)]
pub struct NodeSample {
    /// `Some(true)`: answered and not in recovery; `None`: did not answer in time.
    pub primary: Option<bool>,
    /// Committed a probe row within the bound.
    pub write_acked: bool,
    /// Why the node did not answer, or why the probe write failed.
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Tick {
    pub at: Instant,
    pub nodes: Vec<NodeSample>,
}

impl Tick {
    fn count(&self, f: impl Fn(&NodeSample) -> bool) -> usize {
        self.nodes.iter().filter(|n| f(n)).count()
    }
}

#[derive(Default)]
struct WriterLog {
    acks: Vec<Ack>,
    failed: usize,
    indeterminate: Vec<i64>,
    last_error: Option<String>,
}

/// A running writer and sampler; [`Checker::finish`] stops them and returns the [`Report`].
pub struct Checker {
    started: Instant,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    marks: Arc<Mutex<Vec<(String, Instant)>>>,
    writer: Option<JoinHandle<WriterLog>>,
    sampler: Option<JoinHandle<Vec<Tick>>>,
    names: Vec<String>,
}

impl Checker {
    /// Starts both loops. The tables of [`setup_sql`] must exist.
    pub fn start(cfg: CheckerConfig) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (cfg, stop, acked) = (cfg.clone(), stop.clone(), acked.clone());
            std::thread::Builder::new()
                .name("checker-writer".into())
                .spawn(move || runtime().block_on(write_loop(cfg, stop, acked)))
                .expect("spawning the writer thread")
        };
        let sampler = {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            std::thread::Builder::new()
                .name("checker-sampler".into())
                .spawn(move || runtime().block_on(sample_loop(cfg, stop)))
                .expect("spawning the sampler thread")
        };
        Checker {
            started: Instant::now(),
            stop,
            acked,
            marks: Arc::default(),
            writer: Some(writer),
            sampler: Some(sampler),
            names: cfg.nodes.iter().map(|(n, _)| n.clone()).collect(),
        }
    }

    /// Records a labelled instant (e.g. "leader killed").
    pub fn mark(&self, what: &str) {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what.to_string(), Instant::now()));
    }

    /// How many writes were acknowledged so far.
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `more` writes beyond the current count are acknowledged.
    pub fn wait_for_acks(&self, more: usize, timeout: Duration) -> anyhow::Result<()> {
        let target = self.acked() + more;
        crate::wait_until(&format!("{more} more acknowledged writes"), timeout, || {
            (self.acked() >= target).then_some(())
        })
        .map(|_| ())
    }

    /// Stops both loops and returns what they saw.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let log = self.writer.take().and_then(|h| h.join().ok()).unwrap_or_default();
        let ticks = self
            .sampler
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Report {
            started: self.started,
            ended: Instant::now(),
            acks: log.acks,
            failed: log.failed,
            indeterminate: log.indeterminate,
            last_error: log.last_error,
            ticks,
            marks: self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            names: std::mem::take(&mut self.names),
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
        if let Some(h) = self.sampler.take() {
            let _ = h.join();
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

async fn connect(cfg: &CheckerConfig, addrs: &[SocketAddr], timeout: Duration) -> Result<Client, String> {
    let pg = cfg.pg_config(addrs, timeout);
    let deadline = timeout * addrs.len().max(1) as u32;
    // The two connectors give the connection future different types: spawn it in each arm.
    let connected = match &cfg.tls {
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            tokio::time::timeout(deadline, pg.connect(tls)).await.map(|r| {
                r.map(|(client, conn)| {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    client
                })
            })
        }
        None => tokio::time::timeout(deadline, pg.connect(NoTls)).await.map(|r| {
            r.map(|(client, conn)| {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                client
            })
        }),
    };
    match connected {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("connecting to {addrs:?} timed out")),
    }
}

/// The server's message (with its SQLSTATE) when there is one; `tokio_postgres` only says
/// "db error" otherwise.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Runs `sql` bounded by `timeout`; on timeout the query is cancelled (a commit waiting for a
/// synchronous standby then completes locally, unacknowledged) and `Err(None)` returned.
/// `Err(Some(refused))`: the server answered with an error (`refused` = true) or the
/// connection broke (`refused` = false).
async fn bounded(
    client: &Client,
    sql: &str,
    timeout: Duration,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, Option<(bool, String)>> {
    match tokio::time::timeout(timeout, client.simple_query(sql)).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(Some((e.as_db_error().is_some(), describe(&e)))),
        Err(_) => {
            let token = client.cancel_token();
            let _ = tokio::time::timeout(Duration::from_secs(2), token.cancel_query(NoTls)).await;
            Err(None)
        }
    }
}

async fn write_loop(cfg: CheckerConfig, stop: Arc<AtomicBool>, acked: Arc<AtomicUsize>) -> WriterLog {
    let mut log = WriterLog::default();
    let mut client: Option<Client> = None;
    let mut id = cfg.first_id - 1;
    while !stop.load(Ordering::SeqCst) {
        let c = match &client {
            Some(c) if !c.is_closed() => c,
            _ => match connect(&cfg, &cfg.write_to, Duration::from_secs(2)).await {
                Ok(c) => client.insert(c),
                Err(e) => {
                    log.last_error = Some(e);
                    client = None;
                    tokio::time::sleep(cfg.retry_every).await;
                    continue;
                }
            },
        };
        id += 1;
        let sent = Instant::now();
        let sql = format!("INSERT INTO {WRITES_TABLE}(id) VALUES ({id})");
        match bounded(c, &sql, cfg.write_timeout).await {
            Ok(_) => {
                log.acks.push(Ack {
                    id,
                    sent,
                    acked: Instant::now(),
                });
                acked.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(cfg.write_every).await;
            }
            Err(why) => {
                match why {
                    Some((true, e)) => {
                        log.failed += 1;
                        log.last_error = Some(e);
                    }
                    Some((false, e)) => {
                        log.indeterminate.push(id);
                        log.last_error = Some(e);
                    }
                    None => {
                        log.indeterminate.push(id);
                        log.last_error = Some("write timed out".into());
                    }
                }
                // A fresh connection: the router may route it to a new primary.
                client = None;
                tokio::time::sleep(cfg.retry_every).await;
            }
        }
    }
    log
}

async fn sample_loop(cfg: CheckerConfig, stop: Arc<AtomicBool>) -> Vec<Tick> {
    let mut clients: Vec<Option<Client>> = cfg.nodes.iter().map(|_| None).collect();
    let mut ticks = Vec::new();
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let at = Instant::now();
        let probes = clients
            .iter_mut()
            .zip(&cfg.nodes)
            .map(|(slot, (name, addr))| sample_node(&cfg, slot, name, *addr));
        let nodes = futures::future::join_all(probes).await;
        ticks.push(Tick { at, nodes });
        next += cfg.sample_every;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
    ticks
}

async fn sample_node(
    cfg: &CheckerConfig,
    slot: &mut Option<Client>,
    name: &str,
    addr: SocketAddr,
) -> NodeSample {
    let mut sample = NodeSample::default();
    if slot.as_ref().is_none_or(Client::is_closed) {
        match connect(cfg, &[addr], cfg.probe_timeout).await {
            Ok(c) => *slot = Some(c),
            Err(e) => {
                sample.error = Some(e);
                return sample;
            }
        }
    }
    let Some(client) = slot.as_ref() else {
        return sample;
    };
    let recovery = match bounded(client, "SELECT pg_is_in_recovery()", cfg.probe_timeout).await {
        Ok(rows) => first_value(&rows),
        Err(e) => {
            sample.error = Some(e.map_or("recovery check timed out".into(), |(_, e)| e));
            *slot = None;
            return sample;
        }
    };
    let primary = match recovery.as_deref() {
        Some("f") => true,
        Some("t") => false,
        _ => return sample,
    };
    sample.primary = Some(primary);
    if primary {
        let sql = format!(
            "INSERT INTO {PROBE_TABLE}(node) VALUES ('{}')",
            name.replace('\'', "''")
        );
        match bounded(client, &sql, cfg.probe_timeout).await {
            Ok(_) => sample.write_acked = true,
            Err(None) => {
                sample.error = Some("probe write timed out".into());
                *slot = None;
            }
            Err(Some((false, e))) => {
                sample.error = Some(e);
                *slot = None;
            }
            Err(Some((true, e))) => sample.error = Some(e),
        }
    }
    sample
}

fn shorten(e: &str) -> String {
    let one_line = e.lines().next().unwrap_or("");
    one_line.chars().take(60).collect()
}

fn first_value(rows: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}
