//! The etcd v3 implementation of [`Dcs`](crate::Dcs) over native gRPC (etcd-client).

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnResponse};
use pgvigil_api::Keys;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::{DcsError, DcsEvent, LeaseInfo};

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
            .field("tls", &self.tls)
            .finish()
    }
}

/// TTL used when a lease must be granted before [`Dcs::refresh_lease`](crate::Dcs::refresh_lease) was ever called
/// (Patroni's default `ttl`).
const DEFAULT_TTL: u64 = 30;
/// HTTP/2 ping interval on the etcd connections. etcd (grpc-go) answers pings more frequent
/// than `--grpc-keepalive-min-time` (5 s by default) with GOAWAY, so stay well above it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

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
    /// Serializes lease grants so that concurrent callers cannot create two leases.
    lease_lock: tokio::sync::Mutex<()>,
    pub(crate) state: Mutex<State>,
    pub(crate) events: broadcast::Sender<DcsEvent>,
    runtime: tokio::runtime::Handle,
}

#[derive(Default)]
pub(crate) struct State {
    lease: Option<LeaseInfo>,
    /// TTL of the last `refresh_lease` call, for grants made by other operations.
    ttl: Option<u64>,
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
        let attempt_timeout = (opts.retry_timeout / n)
            .max(Duration::from_secs(1))
            .min(opts.retry_timeout);
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
        let endpoints = opts.endpoints.len();
        let inner = Inner {
            opts,
            keys,
            connect_options,
            attempt_timeout,
            clients: tokio::sync::Mutex::new(vec![None; endpoints]),
            current: AtomicUsize::new(0),
            moves: tokio::sync::watch::Sender::new(0),
            lease_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(State::default()),
            events,
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

    /// An attempt on endpoint `index` failed for want of an answer: forget its connection
    /// (it may be half-open) and, unless another caller moved on already, use the next
    /// endpoint from now on.
    async fn endpoint_failed(&self, index: usize, error: &DcsError) {
        self.clients.lock().await[index] = None;
        let n = self.opts.endpoints.len();
        if n > 1
            && self
                .current
                .compare_exchange(index, (index + 1) % n, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            self.moves.send_modify(|n| *n += 1);
            tracing::info!(
                failed = %self.opts.endpoints[index],
                next = %self.opts.endpoints[(index + 1) % n],
                %error,
                "switching to the next etcd endpoint"
            );
        }
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
            let index = self.current.load(Ordering::SeqCst);
            let attempt = async {
                let client = self.client(index).await?;
                op(client).await.map_err(DcsError::from)
            };
            let error = match tokio::time::timeout_at(attempt_deadline, attempt).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if e.is_unavailable() => e,
                Ok(Err(e)) => return Err(e.context(what)),
                Err(_) => DcsError::Unavailable("no answer in time".into()),
            };
            self.endpoint_failed(index, &error).await;
            let now = Instant::now();
            if now + backoff >= deadline {
                return Err(error.context(&format!("{what} (gave up after {attempts} attempt(s))")));
            }
            tracing::debug!(%error, attempts, "{what} failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
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

    /// Our lease, granted (with the TTL of the last `refresh_lease`, or 30 s) if we have none.
    async fn ensure_lease(&self, deadline: Instant) -> Result<LeaseInfo, DcsError> {
        if let Some(lease) = self.state().lease {
            return Ok(lease);
        }
        let _guard = tokio::time::timeout_at(deadline, self.lease_lock.lock())
            .await
            .map_err(|_| DcsError::Unavailable("waiting for a concurrent lease operation".into()))?;
        let (lease, ttl) = {
            let state = self.state();
            (state.lease, state.ttl.unwrap_or(DEFAULT_TTL))
        };
        match lease {
            Some(lease) => Ok(lease),
            None => self.grant(deadline, ttl).await,
        }
    }

    /// Grants a new lease and makes it ours. Call with `lease_lock` held.
    async fn grant(&self, deadline: Instant, ttl: u64) -> Result<LeaseInfo, DcsError> {
        let ttl_i64 = i64::try_from(ttl).map_err(|_| DcsError::Other(format!("ttl {ttl} too large")))?;
        let (response, sent_at) = self
            .call(deadline, "lease grant", |mut c| async move {
                let sent_at = std::time::Instant::now();
                c.lease_grant(ttl_i64, None).await.map(|r| (r, sent_at))
            })
            .await?;
        if !response.error().is_empty() {
            return Err(DcsError::Other(format!("lease grant: {}", response.error())));
        }
        let lease = LeaseInfo {
            id: response.id(),
            ttl,
            sent_at,
        };
        tracing::debug!(lease = lease.id, ttl, "granted a new lease");
        self.state().lease = Some(lease);
        Ok(lease)
    }

    /// Forgets `lease` if it is still the current one (etcd said it does not exist).
    fn drop_lease(&self, lease: i64) {
        let mut state = self.state();
        if state.lease.is_some_and(|l| l.id == lease) {
            state.lease = None;
        }
    }

    /// Runs `op` with our lease; if etcd answers that the lease does not exist, grants a new one
    /// and runs `op` once more (within the same deadline).
    async fn with_lease<T, F, Fut>(&self, deadline: Instant, mut op: F) -> Result<T, DcsError>
    where
        F: FnMut(LeaseInfo) -> Fut,
        Fut: Future<Output = Result<T, DcsError>>,
    {
        let lease = self.ensure_lease(deadline).await?;
        match op(lease).await {
            Err(e) if e.is_lease_not_found() => {
                tracing::info!(
                    lease = lease.id,
                    "our lease does not exist any more, granting a new one"
                );
                self.drop_lease(lease.id);
                let lease = self.ensure_lease(deadline).await?;
                op(lease).await
            }
            other => other,
        }
    }
}
