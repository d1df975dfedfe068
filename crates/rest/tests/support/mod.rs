//! An in-memory [`Dcs`] for the in-process server tests: a cluster view that reads return,
//! compare-and-set writes on `config` and `failover` with revisions, and switches to make reads
//! or writes fail.

#![allow(dead_code)]

use std::sync::Mutex;

use pgvigil_api::{
    ClusterView, FailoverValue, HistoryEntry, Keys, MemberData, StatusValue, SyncValue, Versioned,
};
use pgvigil_dcs::{Dcs, DcsError, DcsEvent, LockKeyEvent};
use serde_json::{Map, Value};

pub struct FakeDcs {
    keys: Keys,
    pub state: Mutex<FakeState>,
}

/// Runs after each read (e.g. to simulate a switchover happening).
pub type ReadHook = Box<dyn FnMut(&mut ClusterView) + Send>;

pub struct FakeState {
    pub view: ClusterView,
    pub read_error: Option<String>,
    pub write_error: Option<String>,
    /// Every write, as `(key, value)`.
    pub writes: Vec<(String, Value)>,
    pub after_read: Option<ReadHook>,
}

impl FakeDcs {
    pub fn new(view: ClusterView) -> Self {
        FakeDcs {
            keys: Keys::new("/service", "batman"),
            state: Mutex::new(FakeState {
                view,
                read_error: None,
                write_error: None,
                writes: Vec::new(),
                after_read: None,
            }),
        }
    }

    pub fn failing(error: &str) -> Self {
        let dcs = FakeDcs::new(ClusterView::default());
        dcs.state.lock().unwrap().read_error = Some(error.into());
        dcs
    }

    pub fn view(&self) -> ClusterView {
        self.state.lock().unwrap().view.clone()
    }

    pub fn writes(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().writes.clone()
    }

    fn next_revision(view: &mut ClusterView) -> i64 {
        view.revision += 1;
        view.revision
    }
}

fn unsupported<T>() -> Result<T, DcsError> {
    Err(DcsError::Other("not supported by the fake".into()))
}

#[async_trait::async_trait]
impl Dcs for FakeDcs {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    async fn get_cluster(&self) -> Result<ClusterView, DcsError> {
        let mut state = self.state.lock().unwrap();
        if let Some(e) = &state.read_error {
            return Err(DcsError::Unavailable(e.clone()));
        }
        let view = state.view.clone();
        if let Some(mut hook) = state.after_read.take() {
            hook(&mut state.view);
            state.after_read = Some(hook);
        }
        Ok(view)
    }

    async fn probe(&self, _timeout: std::time::Duration) -> Result<(), DcsError> {
        Ok(())
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DcsEvent> {
        tokio::sync::broadcast::channel(1).1
    }

    fn subscribe_lock_keys(&self) -> tokio::sync::broadcast::Receiver<LockKeyEvent> {
        tokio::sync::broadcast::channel(1).1
    }

    async fn touch_member(&self, _data: &MemberData, _lease: i64) -> Result<(), DcsError> {
        unsupported()
    }

    async fn initialize_race(&self) -> Result<bool, DcsError> {
        unsupported()
    }

    async fn set_initialize(&self, _sysid: &str) -> Result<(), DcsError> {
        unsupported()
    }

    async fn cancel_initialization(&self) -> Result<(), DcsError> {
        unsupported()
    }

    async fn set_config(&self, value: &Value, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let mut state = self.state.lock().unwrap();
        if let Some(e) = &state.write_error {
            return Err(DcsError::Unavailable(e.clone()));
        }
        let current = state.view.config.as_ref().map_or(0, |c| c.mod_revision);
        if mod_revision.is_some_and(|r| r != current) {
            return Ok(false);
        }
        let rev = FakeDcs::next_revision(&mut state.view);
        state.view.config = Some(Versioned {
            value: value.clone(),
            mod_revision: rev,
        });
        state.writes.push(("config".into(), value.clone()));
        Ok(true)
    }

    async fn set_failover(&self, value: &FailoverValue, mod_revision: Option<i64>) -> Result<bool, DcsError> {
        let mut state = self.state.lock().unwrap();
        if let Some(e) = &state.write_error {
            return Err(DcsError::Unavailable(e.clone()));
        }
        let current = state.view.failover.as_ref().map_or(0, |f| f.mod_revision);
        if mod_revision.is_some_and(|r| r != current) {
            return Ok(false);
        }
        let rev = FakeDcs::next_revision(&mut state.view);
        state.view.failover = Some(Versioned {
            value: value.clone(),
            mod_revision: rev,
        });
        state
            .writes
            .push(("failover".into(), serde_json::to_value(value).unwrap()));
        Ok(true)
    }

    async fn set_sync(&self, _value: &SyncValue, _mod_revision: Option<i64>) -> Result<bool, DcsError> {
        unsupported()
    }

    async fn delete_sync(&self, _mod_revision: Option<i64>) -> Result<bool, DcsError> {
        unsupported()
    }

    async fn set_history(&self, _history: &[HistoryEntry]) -> Result<(), DcsError> {
        unsupported()
    }

    async fn set_status(&self, _status: &StatusValue) -> Result<(), DcsError> {
        unsupported()
    }

    async fn set_failsafe(&self, _map: &Map<String, Value>) -> Result<(), DcsError> {
        unsupported()
    }

    async fn delete_cluster(&self) -> Result<(), DcsError> {
        unsupported()
    }
}
