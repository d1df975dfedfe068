//! The etcd v3 implementation of [`Dcs`](crate::Dcs) over native gRPC (etcd-client).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnResponse};
use pgvigil_api::Keys;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::{DcsError, DcsEvent, LockKeyEvent};

mod lock;
mod operations;
mod tls;

pub use tls::EtcdTls;

/// Connection settings of [`Etcd3Dcs`].
#[derive(Clone)]
pub struct EtcdOptions {
    /// `host:port` (or `http://host:port`) of the etcd members to use.
    pub endpoints: Vec<String>,
    /// Patroni's `namespace` (default `/service`).
    pub namespace: String,
    /// The cluster name.
    pub scope: String,
    /// Our member name: the value of the leader key and the name of our member key.
    pub member_name: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Deadline of every DCS operation, retries included (Patroni's `retry_timeout`).
    pub retry_timeout: Duration,
    /// Timeout of one attempt; by default `retry_timeout` divided among the endpoints (at least
    /// 1 s). The leader lock uses a shorter one: a hung member must be left well within the
    /// fast-takeover promise.
    pub attempt_timeout: Option<Duration>,
    /// `etcd3.protocol: https`: TLS settings (endpoints are then given without a scheme).
    pub tls: Option<EtcdTls>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            endpoints: vec!["127.0.0.1:2379".into()],
            namespace: "/service".into(),
            scope: String::new(),
            member_name: String::new(),
            username: None,
            password: None,
            retry_timeout: Duration::from_secs(10),
            attempt_timeout: None,
            tls: None,
        }
    }
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("namespace", &self.namespace)
            .field("scope", &self.scope)
            .field("member_name", &self.member_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("retry_timeout", &self.retry_timeout)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// HTTP/2 ping interval on the etcd connections. etcd (grpc-go) answers pings more frequent
/// than `--grpc-keepalive-min-time` (5 s by default) with GOAWAY, so stay well above it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How often one attempt tries the first endpoint again while another one is in use.
const HOME_RETRY: Duration = Duration::from_secs(30);
/// How long a move away from a failed endpoint waits for the other members' status: well
/// within one attempt of the leader lock, and long enough for a busy member to answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why one attempt failed: an answer that retrying will not change, or no usable answer (the
/// member is down, hung or without a leader), which another attempt may get elsewhere.
pub(crate) enum Attempt {
    Final(DcsError),
    Unanswered(DcsError),
}

/// etcd v3 [`Dcs`](crate::Dcs).
///
/// Cheap to share behind an `Arc`. The connection is made lazily by the first operation, so
/// [`Etcd3Dcs::connect`] succeeds while etcd is still down. Dropping it stops the watch task.
pub struct Etcd3Dcs {
    pub(crate) inner: Arc<Inner>,
    watch_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

pub(crate) struct Inner {
    pub(crate) opts: EtcdOptions,
    pub(crate) keys: Keys,
    connect_options: ConnectOptions,
    /// Timeout of one attempt; several attempts fit into `retry_timeout` when there are several
    /// endpoints (as Patroni divides `retry_timeout` across the known etcd nodes).
    attempt_timeout: Duration,
    /// One client per endpoint, connected when first used. Operations go to one endpoint at a
    /// time, as Patroni's do, and move to the next when an attempt there fails: a client that
    /// balanced every request over all endpoints would send a share of them to a member that is
    /// cut off and have each of those hang for a whole attempt.
    clients: tokio::sync::Mutex<Vec<Option<Client>>>,
    /// Index into `opts.endpoints` of the endpoint in use.
    current: AtomicUsize,
    /// Counts moves to another endpoint: the watch, a long-lived stream that would not notice
    /// a member that hangs, follows the operations to the new endpoint.
    pub(crate) moves: tokio::sync::watch::Sender<u64>,
    /// When operations last moved off an endpoint, or an attempt last went back to the first
    /// (preferred) endpoint while another was in use.
    home_tried: Mutex<Option<Instant>>,
    pub(crate) state: Mutex<State>,
    pub(crate) events: broadcast::Sender<DcsEvent>,
    pub(crate) lock_events: broadcast::Sender<LockKeyEvent>,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
pub(crate) struct State {
    /// Value and lease of our last successful member key write.
    member_written: Option<(String, i64)>,
    status_written: Option<String>,
    failsafe_written: Option<String>,
}

impl State {
    /// Forgets cached writes that no longer match what the DCS holds (`value` = `None`: the key
    /// is absent), so that the next write is not skipped.
    pub(crate) fn observe(&mut self, keys: &Keys, member_name: &str, key: &str, value: Option<(&str, i64)>) {
        let Some(relative) = keys.relative(key) else {
            return;
        };
        if relative == "status" {
            if self.status_written.as_deref() != value.map(|v| v.0) {
                self.status_written = None;
            }
        } else if relative == "failsafe" {
            if self.failsafe_written.as_deref() != value.map(|v| v.0) {
                self.failsafe_written = None;
            }
        } else if relative.strip_prefix("members/") == Some(member_name) {
            let cached = self.member_written.as_ref().map(|(v, l)| (v.as_str(), *l));
            if cached != value {
                self.member_written = None;
            }
        }
    }

    fn forget_writes(&mut self) {
        self.member_written = None;
        self.status_written = None;
        self.failsafe_written = None;
    }
}

impl Etcd3Dcs {
    /// Prepares the client. Does not contact etcd (the first operation connects, within its own
    /// deadline), so this only fails on invalid options. Must be called inside a tokio runtime.
    pub async fn connect(opts: EtcdOptions) -> Result<Self, DcsError> {
        if opts.endpoints.is_empty() {
            return Err(DcsError::Other("no etcd endpoints configured".into()));
        }
        if opts.member_name.is_empty() {
            return Err(DcsError::Other("member name is empty".into()));
        }
        if opts.retry_timeout.is_zero() {
            return Err(DcsError::Other("retry_timeout must be positive".into()));
        }
        let n = u32::try_from(opts.endpoints.len()).unwrap_or(u32::MAX);
        let attempt_timeout = opts.attempt_timeout.unwrap_or_else(|| {
            (opts.retry_timeout / n)
                .max(Duration::from_secs(1))
                .min(opts.retry_timeout)
        });
        let mut connect_options = ConnectOptions::new()
            .with_timeout(attempt_timeout)
            .with_connect_timeout(attempt_timeout.min(Duration::from_secs(3)))
            .with_keep_alive(KEEPALIVE_INTERVAL, opts.retry_timeout.max(Duration::from_secs(3)))
            // Pings only while a stream (the watch) is open: grpc-go servers count pings on an
            // idle connection as abuse.
            .with_keep_alive_while_idle(false)
            .with_tcp_keepalive(KEEPALIVE_INTERVAL)
            // A member cut off from the quorum must fail instead of serving stale data.
            .with_require_leader(true);
        if let Some(tls) = &opts.tls {
            connect_options = connect_options.with_tls(tls.options());
        }
        if let Some(user) = &opts.username {
            connect_options = connect_options
                .with_user(user.clone(), opts.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        let keys = Keys::new(&opts.namespace, &opts.scope);
        let (events, _) = broadcast::channel(256);
        // A leader heartbeats a few times a second: room for a few seconds of them.
        let (lock_events, _) = broadcast::channel(1024);
        let endpoints = opts.endpoints.len();
        let inner = Inner {
            opts,
            keys,
            connect_options,
            attempt_timeout,
            clients: tokio::sync::Mutex::new(vec![None; endpoints]),
            current: AtomicUsize::new(0),
            home_tried: Mutex::new(None),
            moves: tokio::sync::watch::Sender::new(0),
            state: Mutex::new(State::default()),
            events,
            lock_events,
            runtime: tokio::runtime::Handle::current(),
        };
        Ok(Etcd3Dcs {
            inner: Arc::new(inner),
            watch_task: Mutex::new(None),
        })
    }

    /// Our member name (the leader key value when we hold the lock).
    pub fn member_name(&self) -> &str {
        &self.inner.opts.member_name
    }

    /// The etcd endpoint operations go to now.
    pub fn endpoint_in_use(&self) -> &str {
        &self.inner.opts.endpoints[self.inner.current.load(Ordering::SeqCst)]
    }

    /// The timeout of one attempt inside an operation's deadline.
    pub fn attempt_timeout(&self) -> Duration {
        self.inner.attempt_timeout
    }
}

impl Drop for Etcd3Dcs {
    fn drop(&mut self) {
        if let Some(task) = self
            .watch_task
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

impl Inner {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.opts.retry_timeout
    }

    fn name(&self) -> &str {
        &self.opts.member_name
    }

    /// The client of endpoint `index`, connecting it if needed.
    async fn client(&self, index: usize) -> Result<Client, DcsError> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients[index].as_ref() {
            return Ok(client.clone());
        }
        let endpoint = [self.opts.endpoints[index].as_str()];
        let client = Client::connect(endpoint, Some(self.connect_options.clone())).await?;
        clients[index] = Some(client.clone());
        Ok(client)
    }

    /// The endpoint for the next attempt: the one in use, except that every
    /// [`HOME_RETRY`] one attempt goes to the first endpoint while another is in use. The agent
    /// lists its own host's etcd member first; after that member was down for a moment (the
    /// host restarting), operations go back to it instead of staying on a remote member that
    /// may die with another host.
    fn endpoint_to_try(&self) -> usize {
        let current = self.current.load(Ordering::SeqCst);
        if current == 0 {
            return 0;
        }
        let mut tried = self.home_tried.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if tried.is_none_or(|t| now.duration_since(t) >= HOME_RETRY) {
            *tried = Some(now);
            return 0;
        }
        current
    }

    /// An attempt on `index` succeeded: back on the first endpoint if that is where it went.
    fn answered(&self, index: usize) {
        let current = self.current.load(Ordering::SeqCst);
        if index == 0
            && current != 0
            && self
                .current
                .compare_exchange(current, 0, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.moves.send_modify(|n| *n += 1);
            tracing::info!(endpoint = %self.opts.endpoints[0], "back on the first etcd endpoint");
        }
    }

    /// An attempt on endpoint `index` failed for want of an answer: forget its connection
    /// (it may be half-open) and, unless another caller moved on already, move to the member
    /// that [`Inner::next_endpoint`] finds answering.
    async fn endpoint_failed(&self, index: usize, error: &DcsError) {
        self.clients.lock().await[index] = None;
        let n = self.opts.endpoints.len();
        if n < 2 || self.current.load(Ordering::SeqCst) != index {
            return;
        }
        let next = self.next_endpoint(index).await;
        if self
            .current
            .compare_exchange(index, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            *self.home_tried.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.moves.send_modify(|n| *n += 1);
            tracing::info!(
                failed = %self.opts.endpoints[index],
                next = %self.opts.endpoints[next],
                %error,
                "switching to the next etcd endpoint"
            );
        }
    }

    /// The endpoint to move to after `failed`: the first of the others to answer a status
    /// request naming a raft leader within [`PROBE_TIMEOUT`]; else the first that answered at
    /// all; else simply the next in the list. Asking them all at once matters when a host died:
    /// moving blindly to the next endpoint sends every operation to a dead member for a whole
    /// attempt (2 s for the leader lock) when another member would have answered at once, and
    /// two such attempts in a row are more than the fast-takeover promise allows the leader.
    async fn next_endpoint(&self, failed: usize) -> usize {
        let n = self.opts.endpoints.len();
        let others: Vec<usize> = (1..n).map(|k| (failed + k) % n).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        for &i in &others {
            let existing = self.clients.lock().await[i].clone();
            let endpoint = self.opts.endpoints[i].clone();
            let options = self.connect_options.clone();
            let tx = tx.clone();
            self.runtime.spawn(async move {
                let answer = async {
                    let mut client = match existing {
                        Some(c) => c,
                        None => Client::connect([endpoint.as_str()], Some(options)).await.ok()?,
                    };
                    let status = client.status().await.ok()?;
                    Some((client, status.leader() != 0))
                };
                let answer = tokio::time::timeout(PROBE_TIMEOUT, answer).await.ok().flatten();
                let _ = tx.send((i, answer));
            });
        }
        drop(tx);
        let mut answered = None;
        while let Some((i, answer)) = rx.recv().await {
            let Some((client, has_leader)) = answer else {
                continue;
            };
            let mut clients = self.clients.lock().await;
            if clients[i].is_none() {
                clients[i] = Some(client);
            }
            if has_leader {
                return i;
            }
            answered.get_or_insert(i);
        }
        answered.unwrap_or(others[0])
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or `deadline` passes.
    /// Attempts that fail as [`DcsError::Unavailable`] (or time out) are retried with backoff.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &str,
        mut op: F,
    ) -> Result<T, DcsError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut backoff = Duration::from_millis(50);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let attempt_deadline = deadline.min(Instant::now() + self.attempt_timeout);
            let error = match self.attempt(attempt_deadline, &mut op).await {
                Ok(value) => return Ok(value),
                Err(Attempt::Final(e)) => return Err(e.context(what)),
                Err(Attempt::Unanswered(e)) => e,
            };
            let now = Instant::now();
            if now + backoff >= deadline {
                return Err(error.context(&format!("{what} (gave up after {attempts} attempt(s))")));
            }
            tracing::debug!(%error, attempts, "{what} failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt of `op` on the endpoint in use, bounded by the attempt timeout (and
    /// `deadline`). On a failure for want of an answer the endpoint is left for the next one,
    /// as in [`Inner::call`], but nothing is retried: the leader lock times its own attempts.
    pub(crate) async fn call_once<T, F, Fut>(&self, what: &str, op: F) -> Result<T, DcsError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_once_within(what, self.attempt_timeout, op).await
    }

    /// [`Inner::call_once`] bounded by `timeout` instead of the attempt timeout.
    pub(crate) async fn call_once_within<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        op: F,
    ) -> Result<T, DcsError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.attempt(Instant::now() + timeout, op).await {
            Ok(value) => Ok(value),
            Err(Attempt::Final(e) | Attempt::Unanswered(e)) => Err(e.context(what)),
        }
    }

    /// One attempt of `op` on the endpoint to try, until `until`. An attempt that got no
    /// answer leaves that endpoint for one that answers ([`Inner::endpoint_failed`]).
    async fn attempt<T, F, Fut>(&self, until: Instant, op: F) -> Result<T, Attempt>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let index = self.endpoint_to_try();
        let attempt = async {
            let client = self.client(index).await?;
            op(client).await.map_err(DcsError::from)
        };
        let error = match tokio::time::timeout_at(until, attempt).await {
            Ok(Ok(value)) => {
                self.answered(index);
                return Ok(value);
            }
            Ok(Err(e)) if e.is_unavailable() => e,
            Ok(Err(e)) => return Err(Attempt::Final(e)),
            Err(_) => DcsError::Unavailable("no answer in time".into()),
        };
        self.endpoint_failed(index, &error).await;
        Err(Attempt::Unanswered(error))
    }

    async fn put(
        &self,
        deadline: Instant,
        what: &str,
        key: &str,
        value: &str,
        lease: Option<i64>,
    ) -> Result<(), DcsError> {
        self.call(deadline, what, |mut c| async move {
            let options = lease.map(|l| PutOptions::new().with_lease(l));
            c.put(key, value, options).await
        })
        .await
        .map(drop)
    }

    async fn txn(&self, deadline: Instant, what: &str, txn: Txn) -> Result<TxnResponse, DcsError> {
        self.call(deadline, what, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    /// PUT, or with a revision TXN `MOD(key) == rev` → PUT.
    async fn put_versioned(
        &self,
        what: &str,
        key: &str,
        value: String,
        rev: Option<i64>,
    ) -> Result<bool, DcsError> {
        let deadline = self.deadline();
        match rev {
            None => self.put(deadline, what, key, &value, None).await.map(|()| true),
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, rev)])
                    .and_then([TxnOp::put(key, value, None)]);
                Ok(self.txn(deadline, what, txn).await?.succeeded())
            }
        }
    }
}
