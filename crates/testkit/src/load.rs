//! A client that writes unique ids to whichever node accepts them and records every id whose
//! commit was acknowledged: the ground truth for "no acknowledged write was lost".

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::cluster::psql_at;

pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    thread: Option<JoinHandle<()>>,
}

impl WriteLoad {
    /// Starts inserting `INSERT INTO <table> VALUES (id)` every `every`, trying the ports in
    /// turn whenever one fails. The table must exist.
    pub fn start(ports: Vec<u16>, table: &str, every: Duration) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let table = table.to_string();
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut id = 0i64;
                let mut target = 0usize;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    match psql_at(ports[target], &format!("INSERT INTO {table} VALUES ({id})")) {
                        Ok(_) => acked.lock().unwrap_or_else(|e| e.into_inner()).push(id),
                        Err(_) => target = (target + 1) % ports.len(),
                    }
                    std::thread::sleep(every);
                }
            })
        };
        WriteLoad {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Stops the writer and returns every acknowledged id.
    pub fn finish(mut self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acked.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The acknowledged ids missing from `table` on the node at `port`.
    pub fn lost_on(acked: &[i64], port: u16, table: &str) -> anyhow::Result<Vec<i64>> {
        let present = psql_at(
            port,
            &format!("SELECT coalesce(string_agg(id::text, ','), '') FROM {table}"),
        )?;
        let present: HashSet<i64> = present.split(',').filter_map(|s| s.parse().ok()).collect();
        Ok(acked.iter().copied().filter(|id| !present.contains(id)).collect())
    }
}

impl Drop for WriteLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
