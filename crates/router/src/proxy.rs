//! The two client listeners and the byte-copying proxy behind them.
//!
//! A routed connection is two TCP streams (TCP_NODELAY on both) joined by
//! `tokio::io::copy_bidirectional`, with one fixed buffer per direction: nothing is parsed and
//! nothing is allocated per packet. The only extra work per read is a relaxed atomic add for
//! the byte counters.
//!
//! Connections run on [`Workers`]: a few threads, each with its own single-threaded tokio
//! runtime. A connection is handed to one of them when it is accepted and stays there, so every
//! wake-up of its copy loop happens on the thread that polls the sockets: no other thread is
//! woken per packet (a work-stealing runtime wakes a second thread for about every other packet,
//! which on a small machine costs more CPU than the copying itself).
//!
//! The copy loop runs in its own task and touches nothing shared but the byte counters. The
//! connection's main task waits, without being woken per packet, for the copy to end, for its
//! route's cancellation token (cancelled by the etcd watcher when the route stops being valid:
//! the leader changed) or for the router-wide close token (end of a shutdown); on either token
//! it aborts the copy task, which closes both sockets.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::pgproto::{CANNOT_CONNECT_NOW, CONNECTION_FAILURE, Refusal, refuse};
use crate::state::{MemberCounters, Port, Shared};
use crate::topology::Route;

/// How long a refused client gets to send its startup packet and read the error.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Routing attempts for one connection (a route that became invalid before the backend
/// connection was made is chosen again).
const MAX_ATTEMPTS: usize = 5;

/// The threads that carry client connections, each running a single-threaded tokio runtime.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` (at least 1) worker threads.
    pub fn start(n: usize) -> io::Result<Arc<Workers>> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("router-io-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            threads.push(thread);
        }
        Ok(Arc::new(Workers {
            handles,
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(threads),
        }))
    }

    /// How many worker threads there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Serves `stream` on the next worker (round-robin).
    fn serve(&self, shared: Arc<Shared>, port: Port, stream: TcpStream, peer: SocketAddr) {
        // A tokio socket belongs to the runtime that registered it: re-register it with the
        // worker's, so that its readiness events wake that worker directly.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(port = port.name(), %peer, "cannot hand the connection over: {e}");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(shared, port, stream, peer).await,
                Err(e) => tracing::warn!(port = port.name(), %peer, "cannot register the connection: {e}"),
            }
        });
    }

    /// Stops the worker threads; connections still open on them are closed.
    pub fn stop(&self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *crate::state::lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Accepts connections until `stop` is cancelled; each one is served by a task on one of the
/// `workers`.
pub async fn accept_loop(
    shared: Arc<Shared>,
    workers: Arc<Workers>,
    port: Port,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => workers.serve(shared.clone(), port, stream, peer),
            Err(e) => {
                // EMFILE and friends: do not spin.
                tracing::warn!(port = port.name(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Chooses a route for a new connection on `port`, skipping members in `skip`.
fn choose(shared: &Shared, port: Port, skip: &[String]) -> Result<Route, (Refusal, &'static str)> {
    let snapshot = shared.snapshot();
    let (scope, cfg) = shared.config.read().unwrap_or_else(|e| e.into_inner()).clone();
    let topology = snapshot
        .usable(&scope, Duration::from_secs(cfg.stale_topology_timeout))
        .map_err(|r| (r, "topology_unknown"))?;
    match port {
        Port::Primary => match &topology.primary {
            Some(p) => Ok(Route::Primary(p.clone())),
            None => Err((
                Refusal {
                    sqlstate: CANNOT_CONNECT_NOW,
                    message: format!("pgvigil router: no primary is available for cluster {scope}"),
                    detail: Some(topology.no_primary_reason.clone()),
                    hint: Some(
                        "a leader election or switchover may be in progress; retry in a few seconds".into(),
                    ),
                },
                "no_primary",
            )),
        },
        Port::Replicas => {
            let routes: Vec<Route> = topology
                .read_routes()
                .into_iter()
                .filter(|r| !skip.contains(&r.backend().member))
                .collect();
            if routes.is_empty() {
                let detail = if skip.is_empty() {
                    topology.no_replica_reason.clone()
                } else {
                    format!("no replica accepted the connection (tried {})", skip.join(", "))
                };
                return Err((
                    Refusal {
                        sqlstate: CANNOT_CONNECT_NOW,
                        message: format!("pgvigil router: no replica is available for cluster {scope}"),
                        detail: Some(detail),
                        hint: (!cfg.primary_serves_reads_fallback).then(|| {
                            "router.primary_serves_reads_fallback: true sends read-only connections to the primary \
                             when no replica qualifies"
                                .to_string()
                        }),
                    },
                    "no_replica",
                ));
            }
            let n = shared.round_robin.fetch_add(1, Ordering::Relaxed);
            Ok(routes[(n % routes.len() as u64) as usize].clone())
        }
    }
}

async fn serve(shared: Arc<Shared>, port: Port, mut client: TcpStream, peer: SocketAddr) {
    let idx = port as usize;
    shared.stats.accepted[idx].fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let connect_timeout = Duration::from_secs(shared.router_config().connect_timeout);
    let mut failed: Vec<String> = Vec::new();
    let mut last_failure: Option<Refusal> = None;
    for _ in 0..MAX_ATTEMPTS {
        let route = match choose(&shared, port, &failed) {
            Ok(route) => route,
            Err((refusal, reason)) => {
                let refusal = last_failure
                    .take()
                    .filter(|_| port == Port::Primary)
                    .unwrap_or(refusal);
                let reason = if failed.is_empty() {
                    reason
                } else {
                    "connect_failed"
                };
                shared.stats.refused(port, reason);
                tracing::debug!(%peer, port = port.name(), "refusing: {}", refusal.message);
                refuse(&mut client, &refusal, REFUSAL_TIMEOUT).await;
                return;
            }
        };
        let backend = route.backend().clone();
        let counters = shared.stats.member(&backend.member);
        // The route may become invalid while connecting (a dead primary's leader key expires
        // while its connect hangs): then give up on it at once and choose again, instead of
        // holding the client for the rest of `connect_timeout`.
        let Some(token) = shared.register(&route) else {
            continue;
        };
        let connected = tokio::select! {
            connected = tokio::time::timeout(
                connect_timeout,
                TcpStream::connect((backend.host.as_str(), backend.port)),
            ) => connected,
            _ = token.cancelled() => {
                tracing::debug!(member = %backend.member, "the route changed while connecting; choosing again");
                continue;
            }
        };
        let server = match connected {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => {
                counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(member = %backend.member, "cannot connect to {}: {e}", backend.address());
                failed.push(backend.member.clone());
                last_failure = Some(connect_refusal(
                    port,
                    &backend.member,
                    &backend.address(),
                    &e.to_string(),
                ));
                if port == Port::Primary {
                    break;
                }
                continue;
            }
            Err(_) => {
                counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                let why = format!(
                    "no answer within connect_timeout ({} s)",
                    connect_timeout.as_secs()
                );
                tracing::warn!(member = %backend.member, "cannot connect to {}: {why}", backend.address());
                failed.push(backend.member.clone());
                last_failure = Some(connect_refusal(port, &backend.member, &backend.address(), &why));
                if port == Port::Primary {
                    break;
                }
                continue;
            }
        };
        // The route may have become invalid between the connect and now: then choose again.
        if token.is_cancelled() {
            continue;
        }
        let _ = server.set_nodelay(true);
        counters.total[idx].fetch_add(1, Ordering::Relaxed);
        counters.active[idx].fetch_add(1, Ordering::Relaxed);
        shared.stats.active[idx].fetch_add(1, Ordering::Relaxed);
        let closed_by_router = pipe(client, server, counters.clone(), &token, &shared.close_all).await;
        if closed_by_router {
            counters.closed_by_router.fetch_add(1, Ordering::Relaxed);
        }
        counters.active[idx].fetch_sub(1, Ordering::Relaxed);
        shared.stats.active[idx].fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let refusal = last_failure.unwrap_or_else(|| Refusal {
        sqlstate: CANNOT_CONNECT_NOW,
        message: "pgvigil router: the cluster topology keeps changing; no stable route".into(),
        detail: None,
        hint: Some("retry in a few seconds".into()),
    });
    shared.stats.refused(port, "connect_failed");
    refuse(&mut client, &refusal, REFUSAL_TIMEOUT).await;
}

fn connect_refusal(port: Port, member: &str, address: &str, why: &str) -> Refusal {
    let what = match port {
        Port::Primary => "the primary",
        Port::Replicas => "the replica",
    };
    Refusal {
        sqlstate: CONNECTION_FAILURE,
        message: format!("pgvigil router: cannot connect to {what} {member} at {address}: {why}"),
        detail: None,
        hint: None,
    }
}

/// Copies bytes both ways until either side closes, the route is cancelled or the router
/// closes everything. Returns whether the router closed the connection.
async fn pipe(
    client: TcpStream,
    server: TcpStream,
    counters: Arc<MemberCounters>,
    route: &CancellationToken,
    close_all: &CancellationToken,
) -> bool {
    // The copy runs in a task of its own: polling the cancellation tokens takes their locks, so
    // they are polled only by this task, which the copy does not wake.
    let mut copy = tokio::spawn(async move {
        let mut client = Counted {
            inner: client,
            counters: counters.clone(),
            to_server: true,
        };
        let mut server = Counted {
            inner: server,
            counters,
            to_server: false,
        };
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    });
    tokio::select! {
        _ = &mut copy => return false,
        _ = route.cancelled() => {}
        _ = close_all.cancelled() => {}
    }
    copy.abort();
    // Wait until the copy task is gone, i.e. both sockets are closed.
    let _ = copy.await;
    true
}

/// A stream that counts the bytes read from it.
struct Counted {
    inner: TcpStream,
    counters: Arc<MemberCounters>,
    /// Bytes read from this stream go to the server (it is the client's).
    to_server: bool,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            let count: &AtomicU64 = if self.to_server {
                &self.counters.bytes_to_server
            } else {
                &self.counters.bytes_to_client
            };
            count.fetch_add(read as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use pgvigil_config::RouterConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    use super::*;
    use crate::state::Snapshot;
    use crate::topology::{Backend, Topology};

    fn topology(primary: Option<Backend>) -> Topology {
        Topology {
            scope: "demo".into(),
            revision: 1,
            leader: primary.as_ref().map(|b| b.member.clone()),
            no_primary_reason: if primary.is_some() {
                String::new()
            } else {
                "no member holds the leader key".into()
            },
            primary,
            replicas: Vec::new(),
            reads_on_primary: false,
            no_replica_reason: "none".into(),
            leader_position: 0,
            members: Vec::new(),
        }
    }

    fn snapshot(primary: Option<Backend>) -> Snapshot {
        Snapshot {
            topology: Some(Arc::new(topology(primary))),
            synced_at: Some(tokio::time::Instant::now().into_std()),
            ..Default::default()
        }
    }

    /// A dead primary's connect hangs until `connect_timeout`; when its leader key goes away
    /// meanwhile, the client must hear so at once, not when the timeout ends.
    #[tokio::test]
    async fn a_connect_to_a_primary_that_loses_its_route_is_abandoned() {
        // A backend whose accept queue is full: further connection attempts hang (the kernel
        // drops their SYNs), like those to a host that has died.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let hanging = socket.listen(0).unwrap();
        let hanging_addr = hanging.local_addr().unwrap();
        let _queued = TcpStream::connect(hanging_addr).await.unwrap();

        let config = RouterConfig {
            connect_timeout: 600,
            ..Default::default()
        };
        let shared = Shared::new("demo".into(), config);
        shared.publish(snapshot(Some(Backend {
            member: "node1".into(),
            host: "127.0.0.1".into(),
            port: hanging_addr.port(),
        })));

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap()).await.unwrap();
        let (accepted, peer) = front.accept().await.unwrap();
        let serving = tokio::spawn(serve(shared.clone(), Port::Primary, accepted, peer));

        // Bounded wait until the connection is registered on node1's route, i.e. connecting.
        for _ in 0..500 {
            if shared.registered_routes() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(shared.registered_routes(), 1, "the router never tried node1");
        shared.publish(snapshot(None));

        let params = b"user\0postgres\0\0";
        let mut startup = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        startup.extend(196608u32.to_be_bytes());
        startup.extend(params);
        client.write_all(&startup).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut answer))
            .await
            .expect("the client was held for the whole connect_timeout")
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("C57P03") && text.contains("no primary"), "{text}");
        serving.await.unwrap();
    }
}
