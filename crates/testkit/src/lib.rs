//! Test harness shared by the integration tests of every pgvigil crate.
//!
//! * [`EtcdCluster`]: a real etcd cluster (the Debian `etcd` binary) on loopback, with temporary
//!   data directories, killed and cleaned up on drop.
//! * [`free_port`]: loopback ports that no other caller in this process got before.
//! * [`wait_until`] / [`wait_until_async`]: bounded polling, so that tests wait for conditions
//!   instead of sleeping.
//! * [`spawn_owned`]: starts a child process that dies with the test process, even if the test
//!   binary is killed without running destructors.
//!
//! Everything here is synchronous except [`wait_until_async`], so it can be used from plain
//! `#[test]` functions as well as from `#[tokio::test]` ones (call the blocking helpers such as
//! [`EtcdCluster::start`] from a multi-threaded runtime, or before entering the runtime).

pub mod checker;
pub mod cluster;
mod cluster_doc;
mod etcd;
pub mod http;
pub mod load;
pub mod netcluster;
pub mod netns;
pub mod process;
pub mod scenario;
pub mod watchdog;

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use etcd::{EtcdCluster, EtcdTlsFiles};
pub use process::spawn_owned;

/// A loopback TCP port that was free a moment ago and that this function has not returned before
/// in this process.
///
/// The port comes from the kernel (bind `127.0.0.1:0`, then release), so two test processes
/// running in parallel (cargo-nextest) are very unlikely to get the same one; within one process
/// a set of handed-out ports rules out duplicates entirely. There is still a small window between
/// releasing the port and the program that uses it binding it: harnesses that start servers
/// (like [`EtcdCluster::start`]) retry with new ports when a bind fails.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(Default::default);
    for _ in 0..1000 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("cannot bind a loopback port");
        if given.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("no unused loopback port found after 1000 attempts");
}

/// Polls `f` until it returns `Some`, at most for `timeout`; the error names `what`.
///
/// The delay between polls grows from 10 ms to 200 ms.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        let now = Instant::now();
        if now >= deadline {
            anyhow::bail!("timed out after {:?} waiting for {what}", now - start);
        }
        std::thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Async variant of [`wait_until`]: polls the future returned by `f` until it yields `Some`, at
/// most for `timeout` in total. A poll that is still running at the deadline is abandoned, so a
/// hanging operation makes this fail instead of hang.
pub async fn wait_until_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        match tokio::time::timeout_at(deadline, f()).await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(_) => break,
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
    anyhow::bail!(
        "timed out after {:?} waiting for {what}",
        tokio::time::Instant::now() - start
    )
}

/// Where harnesses put their temporary directories: `$PGVIGIL_TEST_TMPDIR` if set, else
/// `/dev/shm` when it is a writable directory (etcd fsyncs a lot; on tmpfs that costs nothing and
/// a busy disk cannot stall a test cluster into an election), else the system temp dir.
pub fn test_tmp_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("PGVIGIL_TEST_TMPDIR") {
        return PathBuf::from(dir);
    }
    let shm = PathBuf::from("/dev/shm");
    if tempfile::Builder::new()
        .prefix(".pgvigil-probe")
        .tempfile_in(&shm)
        .is_ok()
    {
        return shm;
    }
    std::env::temp_dir()
}

/// A temporary directory under [`test_tmp_root`] that everyone may write into (the agents run
/// as `postgres`, the test as root: an archive, scripts' output), removed on drop.
pub fn shared_tmp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(test_tmp_root())?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
        TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0])).unwrap();
    }

    #[test]
    fn wait_until_returns_value_or_names_the_condition() {
        let mut n = 0;
        let v = wait_until("n reaches 3", Duration::from_secs(5), || {
            n += 1;
            (n >= 3).then_some(n)
        })
        .unwrap();
        assert_eq!(v, 3);
        let err = wait_until("never", Duration::from_millis(50), || None::<()>).unwrap_err();
        assert!(err.to_string().contains("waiting for never"), "{err}");
    }

    #[tokio::test]
    async fn wait_until_async_abandons_a_hanging_poll() {
        let started = Instant::now();
        let err = wait_until_async("a hanging future", Duration::from_millis(200), || {
            std::future::pending::<Option<()>>()
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("a hanging future"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
