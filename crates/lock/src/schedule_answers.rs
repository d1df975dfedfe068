//! How each etcd answer updates the [`LockCore`] and the scheduler's own bookkeeping
//! ([`Scheduler::on_result`]); what is sent and when is in `schedule.rs`.

use super::*;

impl Scheduler {
    /// Applies the answer to op `id` at `now`. Answers to unknown ids (already answered, or
    /// from before a restart of the scheduler) are ignored.
    pub fn on_result(
        &mut self,
        core: &mut LockCore,
        id: OpId,
        result: OpResult,
        now: BootInstant,
        settings: &LockSettings,
    ) -> Step {
        let mut step = Step::default();
        let Some((sent, what)) = self.in_flight.remove(&id) else {
            return step;
        };
        let held_before = core.lock_state(now, false).is_held();
        match (what, result) {
            (InFlight::Grant { ttl }, OpResult::Grant(result)) => {
                self.grant_in_flight = false;
                match result {
                    Ok(lease) => {
                        step.notices.push(Notice::LeaseGranted { lease, ttl });
                        core.lease_granted(lease, ttl, sent);
                        self.keep_alive.retain(|slot| slot.lease != lease);
                        self.keep_alive.push(KeepAliveSlot {
                            lease,
                            due: sent + settings.renew_every,
                            in_flight: 0,
                        });
                        step.notices.push(Notice::WakeLoop);
                    }
                    Err(e) => {
                        self.next_grant = now + RETRY;
                        for (_, request) in self.waiting.drain(..) {
                            step.notices.push(Notice::Reply {
                                request,
                                answer: Err(format!("no etcd lease: {e}")),
                            });
                        }
                        step.notices.push(Notice::GrantFailed(e));
                    }
                }
            }
            (InFlight::KeepAlive { lease }, OpResult::KeepAlive(result)) => {
                let term_lease = core.term().map(|t| t.lease);
                // Answers may come out of order: the schedule follows the newest accepted one.
                let due = match result {
                    Ok(true) => {
                        core.keep_alive_ok(lease, sent);
                        if term_lease == Some(lease) {
                            self.proof(core, &mut step, sent);
                        }
                        let renewed = core.lease(lease).map_or(sent, |l| l.renewed);
                        Due::At(renewed + settings.renew_every)
                    }
                    Ok(false) => {
                        step.notices.push(Notice::LeaseGone { lease });
                        core.lease_gone(lease, now);
                        step.notices.push(Notice::WakeLoop);
                        Due::At(now)
                    }
                    Err(error) => {
                        step.notices.push(Notice::KeepAliveFailed { lease, error });
                        // Soon, unless the newest accepted one makes the next not due yet.
                        let regular = core.lease(lease).map(|l| l.renewed + settings.renew_every);
                        if regular.is_some_and(|r| r > now) {
                            Due::Unchanged
                        } else {
                            Due::NoLaterThan(now + RETRY)
                        }
                    }
                };
                if let Some(slot) = self.keep_alive.iter_mut().find(|s| s.lease == lease) {
                    slot.in_flight = slot.in_flight.saturating_sub(1);
                    match due {
                        Due::At(at) => slot.due = at,
                        Due::NoLaterThan(at) => slot.due = slot.due.min(at),
                        Due::Unchanged => {}
                    }
                }
            }
            (InFlight::Heartbeat { term }, OpResult::Written(result)) => {
                self.heartbeats_in_flight = self.heartbeats_in_flight.saturating_sub(1);
                match result {
                    Ok(Written::Applied(_)) => {
                        core.heartbeat_ok(term, sent);
                        if core.term().is_some_and(|t| t.revision == term) {
                            self.proof(core, &mut step, sent);
                        }
                    }
                    Ok(Written::Refused) => {
                        if core.heartbeat_refused(term, now) {
                            self.start_read(&mut step, now);
                        } else if core.term().is_none() {
                            step.notices.push(Notice::LockLost);
                            step.notices.push(Notice::WakeLoop);
                        }
                    }
                    Err(e) => step.notices.push(Notice::HeartbeatFailed(e)),
                }
            }
            (
                InFlight::Open {
                    how,
                    lease,
                    promise,
                    request,
                },
                OpResult::Written(result),
            ) => {
                let start = match how {
                    TermOpening::Acquire => TermStart::Acquired,
                    TermOpening::TakeOver { .. } => TermStart::TookOver,
                    TermOpening::Move { .. } => TermStart::Moved,
                };
                if request.is_none() {
                    self.move_in_flight = false;
                }
                let answer = match result {
                    Ok(Written::Applied(revision)) => {
                        core.term_started(start, revision, lease, promise, sent);
                        self.last_proof = Some(sent);
                        self.next_heartbeat = now;
                        step.notices.push(Notice::TermOpened {
                            how: start,
                            revision,
                            lease,
                            promise,
                        });
                        for old in core.drop_unused_leases() {
                            self.start(&mut step, now, Op::Revoke { lease: old }, InFlight::Revoke);
                        }
                        Ok(true)
                    }
                    Ok(Written::Refused) => {
                        core.term_start_refused();
                        if start == TermStart::Moved && request.is_none() {
                            // Our own term's key changed: find out whether we still hold it.
                            self.start_read(&mut step, now);
                        }
                        Ok(false)
                    }
                    Err(e) => {
                        core.term_start_unknown(start, lease, promise, how.replaces(), sent);
                        self.start_read(&mut step, now);
                        Err(format!("the outcome is unknown: {e}"))
                    }
                };
                if let Some(request) = request {
                    step.notices.push(Notice::Reply { request, answer });
                }
            }
            (InFlight::Release { request }, OpResult::Released(result)) => {
                match result {
                    Ok(true) => {
                        step.notices.push(Notice::Released);
                        core.released(sent);
                    }
                    // The key was not ours any more: nothing of ours to release.
                    Ok(false) => core.released(sent),
                    Err(_) => {}
                }
                step.notices.push(Notice::Reply {
                    request,
                    answer: result,
                });
            }
            (InFlight::Read, OpResult::Read(result)) => match result {
                Ok(key) => {
                    self.read = ReadState::Idle;
                    let key = key.as_ref().map(|k| (k.value.as_str(), k.lease, k.mod_revision));
                    core.leader_key_read(&self.me, key, now);
                }
                Err(e) => {
                    // Try again shortly; until then the pending write stays pending.
                    self.read = ReadState::RetryAt(now + RETRY);
                    step.notices.push(Notice::ReadFailed(e));
                }
            },
            (InFlight::Failsafe, OpResult::Failsafe(accepted)) => {
                self.failsafe_in_flight = false;
                if accepted {
                    core.failsafe_confirmed(sent, settings.ttl);
                    step.notices.push(Notice::Proved);
                }
                step.notices.push(Notice::WakeLoop);
            }
            (InFlight::Revoke, _) => {}
            (what, result) => {
                debug_assert!(false, "answer {result:?} does not fit op {what:?}");
            }
        }
        let held_after = core.lock_state(now, false).is_held();
        if held_before != held_after && !step.notices.contains(&Notice::WakeLoop) {
            step.notices.push(Notice::WakeLoop);
        }
        step
    }
}
