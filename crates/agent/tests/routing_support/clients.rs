//! Clients of the routers: single writes and reads, connections held open, and a writer that
//! writes in a loop and records which server took each acknowledged write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use pgvigil_testkit::cluster::{SUPERUSER, SUPERUSER_PASSWORD, psql_at};
use pgvigil_testkit::wait_until;
use tokio::runtime::Runtime;

/// A write through `port`: the PostgreSQL port of the server that took it.
pub fn write_via(port: u16) -> anyhow::Result<u16> {
    let out = psql_at(
        port,
        "INSERT INTO t(port) VALUES (inet_server_port()) RETURNING port",
    )?;
    // psql prints the command tag (`INSERT 0 1`) after the row.
    Ok(out.lines().next().unwrap_or("").trim().parse()?)
}

/// A read through `port`: (server port, in recovery).
pub fn read_via(port: u16) -> anyhow::Result<(u16, bool)> {
    let out = psql_at(port, "SELECT inet_server_port() || ',' || pg_is_in_recovery()")?;
    let (p, r) = out.split_once(',').context("unexpected answer")?;
    Ok((p.parse()?, r == "true"))
}

pub fn conninfo(port: u16) -> String {
    format!(
        "host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres connect_timeout=5"
    )
}

/// A client connection held open through a router.
pub struct Held {
    pub client: tokio_postgres::Client,
}

pub fn hold(rt: &Runtime, port: u16) -> anyhow::Result<Held> {
    rt.block_on(async {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&conninfo(port), tokio_postgres::NoTls),
        )
        .await
        .context("connect timed out")??;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Held { client })
    })
}

impl Held {
    /// The server port this connection talks to (a query on it).
    pub fn server_port(&self, rt: &Runtime) -> anyhow::Result<u16> {
        rt.block_on(async {
            let rows = tokio::time::timeout(
                Duration::from_secs(5),
                self.client.simple_query("SELECT inet_server_port()"),
            )
            .await
            .context("query timed out")??;
            for m in rows {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                    return Ok(row.get(0).context("null")?.parse()?);
                }
            }
            bail!("no row")
        })
    }
}

/// A connection through `port` (a read-only port, which balances) that reached the server on
/// `want`: opens connections until one does (a few tries).
pub fn hold_on(rt: &Runtime, port: u16, want: u16, what: &str) -> Held {
    let mut seen = Vec::new();
    for _ in 0..10 {
        let held = hold(rt, port).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
        match held.server_port(rt) {
            Ok(p) if p == want => return held,
            Ok(p) => seen.push(p),
            Err(e) => panic!("{what}: query: {e}"),
        }
    }
    panic!("{what}: 10 connections through port {port}, none reached {want}: {seen:?}")
}

/// A client that writes through a router's port "5000" in a loop, reconnecting after any error,
/// and records the PostgreSQL port of the server that took each acknowledged write.
pub struct Writer {
    pub what: &'static str,
    pub stop: Arc<AtomicBool>,
    pub acked: Arc<Mutex<Vec<u16>>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(rt: &Runtime, what: &'static str, port: u16) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let task = rt.spawn(async move {
            let info = conninfo(port);
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                let Some(c) = client.as_ref() else {
                    let connect = tokio_postgres::connect(&info, tokio_postgres::NoTls);
                    match tokio::time::timeout(Duration::from_secs(5), connect).await {
                        Ok(Ok((c, conn))) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            client = Some(c);
                        }
                        // Refused (no primary) or no answer: try again shortly.
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                    continue;
                };
                let insert = c.simple_query("INSERT INTO t(port) VALUES (inet_server_port()) RETURNING port");
                let landed = match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(messages)) => messages.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse::<u16>().ok(),
                        _ => None,
                    }),
                    _ => None,
                };
                match landed {
                    Some(p) => {
                        a.lock().unwrap().push(p);
                        // Pace the writes: a steady client, not a load test.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    None => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Writer {
            what,
            stop,
            acked,
            task,
        }
    }

    /// Waits (up to a minute) until a write landed on the server on `port`.
    pub fn wait_for(&self, what: &str, port: u16) {
        wait_until(what, Duration::from_secs(60), || {
            self.acked.lock().unwrap().contains(&port).then_some(())
        })
        .unwrap();
    }

    /// Stops the writer; the server port of every acknowledged write, in order.
    pub fn finish(self, rt: &Runtime) -> Vec<u16> {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), self.task)
                .await
                .expect("the writer stops")
                .expect("the writer did not panic")
        });
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}
