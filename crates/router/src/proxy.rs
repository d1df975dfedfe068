//! The two client listeners and the byte-copying proxy behind them.
//!
//! A routed connection is two TCP streams (TCP_NODELAY on both) joined by
//! `tokio::io::copy_bidirectional`, with one fixed buffer per direction: nothing is parsed and
//! nothing is allocated per packet. The only extra work per read is a relaxed atomic add for
//! the byte counters. Each connection also waits on its route's cancellation token, which the
//! etcd watcher cancels when the route stops being valid (the leader changed), and on the
//! router-wide close token (end of a shutdown).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::pgproto::{CANNOT_CONNECT_NOW, CONNECTION_FAILURE, Refusal, refuse};
use crate::state::{Port, Shared};
use crate::topology::Route;

/// How long a refused client gets to send its startup packet and read the error.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Routing attempts for one connection (a route that became invalid between choosing it and
/// registering the connection is chosen again).
const MAX_ATTEMPTS: usize = 5;

/// Accepts connections until `stop` is cancelled; each one is served by its own task.
pub async fn accept_loop(shared: Arc<Shared>, port: Port, listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(serve(shared, port, stream, peer));
            }
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
        let connected = tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((backend.host.as_str(), backend.port)),
        )
        .await;
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
        // The route may have become invalid while connecting: then choose again.
        let Some(token) = shared.register(&route) else {
            continue;
        };
        let _ = server.set_nodelay(true);
        counters.total[idx].fetch_add(1, Ordering::Relaxed);
        counters.active[idx].fetch_add(1, Ordering::Relaxed);
        shared.stats.active[idx].fetch_add(1, Ordering::Relaxed);
        let closed_by_router = pipe(client, server, &counters, &token, &shared.close_all).await;
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
    counters: &crate::state::MemberCounters,
    route: &CancellationToken,
    close_all: &CancellationToken,
) -> bool {
    let mut client = Counted {
        inner: client,
        count: &counters.bytes_to_server,
    };
    let mut server = Counted {
        inner: server,
        count: &counters.bytes_to_client,
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = route.cancelled() => true,
        _ = close_all.cancelled() => true,
    }
}

/// A stream that counts the bytes read from it.
struct Counted<'a> {
    inner: TcpStream,
    count: &'a AtomicU64,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.count.fetch_add(read as u64, Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncWrite for Counted<'_> {
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
