//! The operator queue: what operators asked for through the REST API (`POST /restart`, now or
//! scheduled, `DELETE /restart`, `POST /reinitialize`), waiting for the engine to decide on it,
//! and the replies owed to the callers.
//!
//! One request at a time: a second one is refused while the first waits or runs (Patroni
//! answers the same). The engine takes a request up only when nothing else is to be done with
//! PostgreSQL; a request it does not take up within [`GIVE_UP`] is answered 503 with what the
//! node is busy with. A scheduled restart is kept until its time, then offered to the engine
//! like an immediate one, and dropped if PostgreSQL was restarted by other means meanwhile.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, Utc};
use pgvigil_api::ClusterView;
use pgvigil_engine::{Action, OperatorRequest, RestartRequest as EngineRestart};
use pgvigil_rest::{ApiCommand, ApiReply, RestartRequest};
use serde_json::{Map, Value};
use tokio::sync::oneshot;

/// How long an immediate request may wait for the engine to take it up.
pub const GIVE_UP: Duration = Duration::from_secs(60);

/// A restart waiting for its time (`POST /restart` with `schedule`).
#[derive(Clone, Debug)]
struct Scheduled {
    request: RestartRequest,
    at: DateTime<FixedOffset>,
    /// Cancelled if PostgreSQL was restarted by other means meanwhile.
    postmaster_start_time: Option<String>,
}

impl Scheduled {
    /// The `scheduled_restart` object of the member key and the status document.
    fn to_json(&self, with_start_time: bool) -> Value {
        let mut m = Map::new();
        m.insert("schedule".into(), Value::from(self.at.to_rfc3339()));
        if with_start_time && let Some(t) = &self.postmaster_start_time {
            m.insert("postmaster_start_time".into(), Value::from(t.clone()));
        }
        if let Some(role) = &self.request.role {
            m.insert("role".into(), Value::from(role.clone()));
        }
        if let Some(v) = &self.request.postgres_version {
            m.insert("postgres_version".into(), Value::from(v.clone()));
        }
        if let Some(t) = self.request.timeout {
            m.insert("timeout".into(), Value::from(t));
        }
        if self.request.restart_pending {
            m.insert("restart_pending".into(), Value::from(true));
        }
        Value::Object(m)
    }
}

#[derive(Debug)]
enum Kind {
    Restart(RestartRequest),
    Reinitialize { from_leader: bool },
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Restart(_) => "restart",
            Kind::Reinitialize { .. } => "reinitialize",
        }
    }
}

/// A request the engine has not taken up yet, or that runs now.
#[derive(Debug)]
struct Pending {
    kind: Kind,
    reply: Option<oneshot::Sender<ApiReply>>,
    since: Instant,
    /// The engine took it up; the reply waits for the task's outcome.
    running: bool,
    /// Came from the schedule (nobody waits for a reply).
    from_schedule: bool,
}

/// What a REST command asks of the HA loop besides the queue.
pub enum Forward {
    Reload,
    Wake,
}

pub struct OperatorQueue {
    pending: Option<Pending>,
    scheduled: Option<Scheduled>,
    /// The member key's `scheduled_restart`, shared with the supervisor that writes the key.
    published: Arc<Mutex<Option<Value>>>,
}

impl OperatorQueue {
    pub fn new(published: Arc<Mutex<Option<Value>>>) -> OperatorQueue {
        OperatorQueue {
            pending: None,
            scheduled: None,
            published,
        }
    }

    fn publish(&self) {
        *self.published.lock().unwrap_or_else(|e| e.into_inner()) =
            self.scheduled.as_ref().map(|s| s.to_json(true));
    }

    /// The `scheduled_restart` of the status document (without the start time).
    pub fn scheduled_for_status(&self) -> Option<Value> {
        self.scheduled.as_ref().map(|s| s.to_json(false))
    }

    /// Takes a REST command; replies at once where the answer is known now.
    /// `postmaster_start_time`: of the running PostgreSQL, for scheduled restarts.
    pub fn command(&mut self, command: ApiCommand, postmaster_start_time: Option<String>) -> Option<Forward> {
        match command {
            ApiCommand::Reload => return Some(Forward::Reload),
            ApiCommand::Wake => return Some(Forward::Wake),
            ApiCommand::Restart { request, reply } => match request.schedule {
                Some(at) => {
                    let answer = if self.scheduled.is_some() {
                        ApiReply::new(409, "Another restart is already scheduled")
                    } else {
                        self.scheduled = Some(Scheduled {
                            request,
                            at,
                            postmaster_start_time,
                        });
                        self.publish();
                        ApiReply::new(202, "Restart scheduled")
                    };
                    let _ = reply.send(answer);
                }
                None => self.enqueue(Kind::Restart(request), reply),
            },
            ApiCommand::CancelScheduledRestart { reply } => {
                let answer = match self.scheduled.take() {
                    Some(_) => ApiReply::new(200, "scheduled restart deleted"),
                    None => ApiReply::new(404, "no restarts are scheduled"),
                };
                self.publish();
                let _ = reply.send(answer);
            }
            ApiCommand::Reinitialize {
                force,
                from_leader,
                reply,
            } => {
                // `force`: a reinitialize already waiting gives way to this one.
                if force
                    && matches!(&self.pending, Some(p) if !p.running && matches!(p.kind, Kind::Reinitialize { .. }))
                {
                    self.answer(409, "replaced by a forced reinitialize");
                }
                self.enqueue(Kind::Reinitialize { from_leader }, reply);
            }
        }
        Some(Forward::Wake)
    }

    fn enqueue(&mut self, kind: Kind, reply: oneshot::Sender<ApiReply>) {
        if let Some(p) = &self.pending {
            let what = p.kind.name();
            let _ = reply.send(ApiReply::new(503, format!("{what} already in progress")));
            return;
        }
        self.pending = Some(Pending {
            kind,
            reply: Some(reply),
            since: Instant::now(),
            running: false,
            from_schedule: false,
        });
    }

    /// The request for this cycle's decision: the pending one, or a scheduled restart that is
    /// due. `postmaster_start_time`: of PostgreSQL as observed now.
    pub fn request(&mut self, postmaster_start_time: Option<&str>) -> Option<OperatorRequest> {
        if self.pending.is_none()
            && let Some(s) = &self.scheduled
            && s.at.with_timezone(&Utc) <= Utc::now()
        {
            let s = self.scheduled.take().expect("checked above");
            self.publish();
            let overtaken = s.postmaster_start_time.is_some()
                && postmaster_start_time.map(str::to_string) != s.postmaster_start_time;
            self.pending = Some(Pending {
                kind: Kind::Restart(s.request),
                reply: None,
                since: Instant::now(),
                running: false,
                from_schedule: true,
            });
            if overtaken {
                tracing::info!("scheduled restart cancelled: PostgreSQL was restarted meanwhile");
                self.pending = None;
                return None;
            }
        }
        let p = self.pending.as_ref().filter(|p| !p.running)?;
        Some(match &p.kind {
            Kind::Restart(r) => OperatorRequest::Restart(EngineRestart {
                role: r.role.clone(),
                postgres_version: r.postgres_version.clone(),
                restart_pending: r.restart_pending,
                timeout: r.timeout,
                not_yet_due: false,
                overtaken: false,
            }),
            Kind::Reinitialize { from_leader } => OperatorRequest::Reinitialize {
                from_leader: *from_leader,
            },
        })
    }

    /// What the engine decided, as far as the request is concerned.
    pub fn decided(&mut self, actions: &[Action]) {
        if self.pending.as_ref().is_none_or(|p| p.running) {
            return;
        }
        for action in actions {
            match action {
                Action::AnswerRequest { status, message } => {
                    if self.pending.as_ref().is_some_and(|p| p.from_schedule) {
                        tracing::info!("scheduled restart skipped: {message}");
                    }
                    self.answer(*status, message);
                    return;
                }
                Action::Restart { .. } => {
                    if let Some(p) = self.pending.as_mut() {
                        p.running = true;
                    }
                    return;
                }
                Action::Reinitialize { .. }
                    if matches!(
                        self.pending.as_ref().map(|p| &p.kind),
                        Some(Kind::Reinitialize { .. })
                    ) =>
                {
                    // Patroni answers when the reinitialize starts, not when it is done.
                    self.answer(200, "reinitialize started");
                    return;
                }
                _ => {}
            }
        }
    }

    /// The task that performed the request's action ended.
    pub fn finished(&mut self, outcome: &Result<(), String>) {
        if !self.pending.as_ref().is_some_and(|p| p.running) {
            return;
        }
        match outcome {
            Ok(()) => self.answer(200, "restarted successfully"),
            Err(e) => self.answer(503, &format!("restart failed: {e}")),
        }
    }

    /// A request nobody took up for [`GIVE_UP`]: answered with why (`busy`).
    pub fn expire(&mut self, busy: &str) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| !p.running && p.since.elapsed() >= GIVE_UP)
        {
            let what = self.pending.as_ref().map_or("request", |p| p.kind.name());
            self.answer(503, &format!("{what} could not be started: {busy}"));
        }
    }

    /// A request waits or runs: what to say to a conflicting one.
    pub fn busy(&self) -> Option<&'static str> {
        self.pending.as_ref().filter(|p| p.running).map(|p| match p.kind {
            Kind::Restart(_) => "restart in progress",
            Kind::Reinitialize { .. } => "reinitialize in progress",
        })
    }

    fn answer(&mut self, status: u16, message: &str) {
        if let Some(mut p) = self.pending.take()
            && let Some(reply) = p.reply.take()
        {
            let _ = reply.send(ApiReply::new(status, message.to_string()));
        }
    }
}

/// Seconds until the pending failover's `scheduled_at`; an unparsable time counts as long past,
/// so the leader clears it.
pub fn failover_due_in(cluster: Option<&ClusterView>) -> Option<f64> {
    let at = cluster?.pending_failover()?.scheduled_at.as_deref()?;
    match DateTime::parse_from_rfc3339(at) {
        Ok(at) => Some((at.with_timezone(&Utc) - Utc::now()).num_milliseconds() as f64 / 1000.0),
        Err(_) => Some(f64::NEG_INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> OperatorQueue {
        OperatorQueue::new(Arc::default())
    }

    fn restart_now() -> (ApiCommand, oneshot::Receiver<ApiReply>) {
        let (reply, rx) = oneshot::channel();
        (
            ApiCommand::Restart {
                request: RestartRequest::default(),
                reply,
            },
            rx,
        )
    }

    #[test]
    fn an_immediate_restart_is_answered_when_its_task_ends_and_a_second_is_refused() {
        let mut q = queue();
        let (cmd, mut rx) = restart_now();
        q.command(cmd, None);
        assert!(matches!(q.request(None), Some(OperatorRequest::Restart(_))));
        q.decided(&[Action::Restart { timeout: None }]);
        assert_eq!(q.busy(), Some("restart in progress"));
        assert!(q.request(None).is_none(), "not offered again while it runs");
        let (second, mut rx2) = restart_now();
        q.command(second, None);
        assert_eq!(rx2.try_recv().unwrap().status, 503);
        q.finished(&Ok(()));
        let reply = rx.try_recv().unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, "restarted successfully")
        );
        assert!(q.busy().is_none());
    }

    #[test]
    fn a_refusal_by_the_engine_is_the_reply() {
        let mut q = queue();
        let (cmd, mut rx) = restart_now();
        q.command(cmd, None);
        q.decided(&[Action::AnswerRequest {
            status: 503,
            message: "restart conditions are not satisfied".into(),
        }]);
        assert_eq!(rx.try_recv().unwrap().status, 503);
        assert!(q.request(None).is_none());
    }

    #[test]
    fn scheduled_restarts_wait_for_their_time_and_are_dropped_when_overtaken() {
        let mut q = queue();
        let (reply, mut rx) = oneshot::channel();
        let at = (Utc::now() + chrono::Duration::seconds(3600)).fixed_offset();
        q.command(
            ApiCommand::Restart {
                request: RestartRequest {
                    schedule: Some(at),
                    ..Default::default()
                },
                reply,
            },
            Some("t1".into()),
        );
        assert_eq!(rx.try_recv().unwrap().status, 202);
        assert!(q.scheduled_for_status().is_some());
        assert!(q.request(Some("t1")).is_none(), "not due yet");
        // Due now, but PostgreSQL was restarted since it was scheduled.
        q.scheduled.as_mut().unwrap().at = (Utc::now() - chrono::Duration::seconds(1)).fixed_offset();
        assert!(q.request(Some("t2")).is_none());
        assert!(q.scheduled_for_status().is_none());
    }
}
