//! The userspace half of [`NetLab::impair`](super::NetLab::impair): a thread inside the host's
//! namespace that holds back or drops the packets its NFQUEUE receives ([`super::nfqueue`]).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};

use super::namespaces::setns_net;
use super::{Impairment, QUEUE_NUM, nfqueue};

/// The userspace half of [`NetLab::impair`]: a thread inside the host's namespace bound to its
/// NFQUEUE.
pub(super) struct Delayer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl Delayer {
    pub(super) fn start(ns: Arc<File>, imp: Impairment) -> anyhow::Result<Delayer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new().name("netlab-delayer".into()).spawn(
                move || -> anyhow::Result<()> {
                    let queue = setns_net(&ns)
                        .context("entering the host namespace")
                        .and_then(|()| nfqueue::Queue::bind(QUEUE_NUM));
                    let queue = match queue {
                        Ok(q) => {
                            let _ = ready_tx.send(Ok(()));
                            q
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    nfqueue::delay_loop(&queue, imp, &stop)
                },
            )?
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Delayer { stop, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.context("binding the NFQUEUE"))
            }
            Err(_) => bail!("the delayer thread did not start"),
        }
    }

    pub(super) fn stop(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the delayer thread panicked"))?
    }
}
