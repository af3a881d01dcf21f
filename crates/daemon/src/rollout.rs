//! Rolling updates of a group, make-before-break: a member leaves the
//! service address (the route moves to a healthy member) before it is
//! stopped, and the next member is touched only after the updated one has
//! been healthy for `min_healthy_time`. A member that is not healthy within
//! `healthy_deadline` stops the rollout and, with `auto_revert`, every
//! member it updated goes back to its previous config the same way.
//!
//! Progress lives in the store (guest records carry the config each member
//! runs, drained members are flagged), so a daemon killed half-way resumes
//! by planning again: members already updated need nothing, the one caught
//! mid-update is replaced.

use std::time::{Duration, Instant};

use berth_api::ApplyEvent;
use berth_api::StepStatus;
use berth_plan::{Action, ActionKind, Observed, Plan, Rollout};
use berth_spec::{Desired, Group, Guest};

use crate::engine::{Engine, EngineError};
use crate::health::Status;

type Guests = std::collections::BTreeMap<String, Guest>;
type Send<'a> = &'a (dyn Fn(ApplyEvent) + Sync);

fn event(guest: &str, status: StepStatus, message: String, t: Instant) -> ApplyEvent {
    ApplyEvent::Step {
        guest: Some(guest.to_owned()),
        step: "rollout".into(),
        status,
        message,
        elapsed_ms: t.elapsed().as_millis() as u64,
    }
}

/// Names a rollout touches: its members and their companions.
pub fn touched(plan: &Plan, desired: &Desired) -> Vec<String> {
    let mut out = Vec::new();
    for r in &plan.rollouts {
        for m in &r.members {
            out.push(m.clone());
            out.extend(companions(desired, m).into_iter().map(|g| g.name.clone()));
        }
    }
    out
}

fn companions<'a>(desired: &'a Desired, member: &str) -> Vec<&'a Guest> {
    desired
        .guests
        .values()
        .filter(|g| g.companion_of.as_deref() == Some(member))
        .collect()
}

/// Healthy, undrained members of `group` not in `except`.
fn available(engine: &Engine, group: &Group, except: &[String]) -> usize {
    let drained = engine.drained().unwrap_or_default();
    group
        .members
        .iter()
        .filter(|m| !except.contains(m) && !drained.contains(*m))
        .filter(|m| engine.health.status(m) == Status::Healthy)
        .count()
}

/// Waits until `ok()` or `deadline`; true if it held.
fn wait_for(engine: &Engine, deadline: Instant, mut ok: impl FnMut() -> bool) -> bool {
    let mut seen = engine.health.changes();
    loop {
        if ok() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        seen = engine
            .health
            .wait_change(seen, left.min(Duration::from_millis(50)));
    }
}

/// Takes `names` out of the service address and lets requests in flight finish.
fn drain(engine: &Engine, group: &Group, names: &[String]) -> Result<(), String> {
    for n in names {
        engine.set_drain(n, "rollout").map_err(|e| e.to_string())?;
    }
    crate::vip::reconcile(engine)?;
    // The route moves only to a healthy member: if none is healthy right
    // now (a probe timed out on a loaded host), wait for one rather than
    // stop a member that still carries the service address.
    if group.has_vip() && group.replicas > names.len() as u32 {
        let deadline = Instant::now() + Duration::from_millis(group.healthy_deadline_ms);
        if !wait_for(engine, deadline, || {
            names.iter().all(|n| !engine.carries_vip(n))
        }) {
            for n in names {
                let _ = engine.clear_drain(n);
            }
            return Err(format!(
                "group {}: no other healthy member took over {} from {} within {}; nothing was stopped",
                group.name,
                group.vips(),
                names.join(", "),
                berth_plan::format_duration_ms(group.healthy_deadline_ms)
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(group.drain_ms));
    Ok(())
}

fn undrain(engine: &Engine, names: &[String]) {
    for n in names {
        let _ = engine.clear_drain(n);
    }
    if let Err(e) = crate::vip::reconcile(engine) {
        tracing::warn!("service addresses: {e}");
    }
}

/// Moves one member (and its companions) from `from` to `to` configs.
#[allow(clippy::too_many_arguments)]
fn switch(
    engine: &Engine,
    name: &str,
    kind: ActionKind,
    from: &[(&str, Option<&Guest>)],
    to: &Guests,
    old_of: &dyn Fn(&str) -> Option<Guest>,
    generation: i64,
    plan_id: i64,
) -> Result<(), EngineError> {
    // Companions first (a member usually needs its database), then the member.
    for (n, old) in from {
        let Some(new) = to.get(*n) else {
            continue;
        };
        let replace = kind == ActionKind::Replace && *n == name
            || old.is_none_or(|o| o.index != new.index || o.kind != new.kind);
        let res = if replace || old.is_none() {
            // Disks made from images stay unless the new config needs new ones.
            let recreate = match (old.and_then(|o| o.vm.as_ref()), new.vm.as_ref()) {
                (Some(a), Some(b)) => berth_plan::recreated_disks(a, b),
                _ => Vec::new(),
            };
            match engine.destroy_keeping_disks(n, plan_id, &recreate) {
                Ok(_) | Err(EngineError::NoSuchGuest(_)) => {}
                Err(e) => return Err(e),
            }
            engine.create(new, new.autostart, generation, plan_id)
        } else {
            let o = old.cloned().or_else(|| old_of(n));
            match o {
                Some(o) => engine.restart_with(&o, new, new.autostart, generation, plan_id),
                None => engine.create(new, new.autostart, generation, plan_id),
            }
        };
        res?;
        engine.health.reset(n);
    }
    Ok(())
}

/// Runs one rollout. `Err` says what failed (and whether it was reverted).
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &Engine,
    desired: &Desired,
    observed: &Observed,
    plan: &Plan,
    r: &Rollout,
    generation: i64,
    plan_id: i64,
    send: Send<'_>,
) -> Result<(), String> {
    let Some(group) = desired.groups.get(&r.group) else {
        return Ok(());
    };
    let kind_of = |m: &str| -> ActionKind {
        plan.actions
            .iter()
            .find(|a: &&Action| a.guest.as_deref() == Some(m))
            .map_or(ActionKind::Restart, |a| a.kind)
    };
    let old_of = |n: &str| observed.guests.get(n).map(|o| o.applied.clone());
    let order = |m: &str| -> Vec<String> {
        let mut v: Vec<String> = companions(desired, m)
            .iter()
            .map(|g| g.name.clone())
            .collect();
        v.push(m.to_owned());
        v
    };
    let mut updated: Vec<String> = Vec::new();
    for chunk in r.members.chunks(r.batch.max(1) as usize) {
        let chunk: Vec<String> = chunk.to_vec();
        let t = Instant::now();
        let label = chunk.join(", ");
        // min_available: enough healthy members besides this batch.
        let need = group.min_available as usize;
        let deadline = Instant::now() + Duration::from_millis(group.healthy_deadline_ms);
        if !wait_for(engine, deadline, || {
            available(engine, group, &chunk) >= need
        }) {
            let msg = format!(
                "group {}: only {} healthy member(s) besides {label}, and min_available is {need}; not taking {label} out (nothing changed for it)",
                r.group,
                available(engine, group, &chunk)
            );
            for m in &chunk {
                send(event(m, StepStatus::Failed, msg.clone(), t));
            }
            return Err(msg);
        }
        for m in &chunk {
            send(event(
                m,
                StepStatus::Started,
                format!("taking {m} out of {} and updating it", group.vips()),
                t,
            ));
        }
        drain(engine, group, &chunk)?;
        let results: Vec<Result<(), EngineError>> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|m| {
                    let names = order(m);
                    s.spawn(move || {
                        let olds: Vec<(String, Option<Guest>)> =
                            names.iter().map(|n| (n.clone(), old_of(n))).collect();
                        let from: Vec<(&str, Option<&Guest>)> =
                            olds.iter().map(|(n, g)| (n.as_str(), g.as_ref())).collect();
                        switch(
                            engine,
                            m,
                            kind_of(m),
                            &from,
                            &desired.guests,
                            &old_of,
                            generation,
                            plan_id,
                        )
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(EngineError::Host("internal error: update panicked".into()))
                    })
                })
                .collect()
        });
        updated.extend(chunk.iter().cloned());
        let started_ok = results.iter().all(Result::is_ok);
        let failure = if !started_ok {
            Some(
                results
                    .iter()
                    .filter_map(|r| r.as_ref().err())
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        } else {
            let min_healthy = Duration::from_millis(group.min_healthy_time_ms);
            let deadline = Instant::now() + Duration::from_millis(group.healthy_deadline_ms);
            let ok = wait_for(engine, deadline, || {
                chunk.iter().all(|m| {
                    engine
                        .health
                        .get(m)
                        .is_some_and(|s| s.healthy_for(min_healthy))
                })
            });
            (!ok).then(|| {
                let why: Vec<String> = chunk
                    .iter()
                    .map(|m| {
                        let s = engine.health.get(m);
                        format!(
                            "{m} is {}{}",
                            s.as_ref().map_or("unknown", |s| s.status.as_str()),
                            s.and_then(|s| s.last_error)
                                .map(|e| format!(" ({e})"))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                format!(
                    "not healthy for {} within {}: {}",
                    berth_plan::format_duration_ms(group.min_healthy_time_ms),
                    berth_plan::format_duration_ms(group.healthy_deadline_ms),
                    why.join(", ")
                )
            })
        };
        match failure {
            None => {
                undrain(engine, &chunk);
                for m in &chunk {
                    send(event(
                        m,
                        StepStatus::Done,
                        format!("healthy and back in {}", group.vips()),
                        t,
                    ));
                }
            }
            Some(why) => {
                for m in &chunk {
                    send(event(m, StepStatus::Failed, why.clone(), t));
                }
                if !group.auto_revert {
                    undrain(engine, &chunk);
                    return Err(format!(
                        "rolling update of group {} stopped: {why} (auto_revert = false: left as is)",
                        r.group
                    ));
                }
                let reverted = revert(engine, group, observed, &updated, &order, plan_id, send);
                return Err(format!(
                    "rolling update of group {} failed: {why}; {reverted}",
                    r.group
                ));
            }
        }
    }
    Ok(())
}

/// Puts `members` (newest first) back on their previous config, one by
/// one, make-before-break as well. Returns a sentence for the report.
fn revert(
    engine: &Engine,
    group: &Group,
    observed: &Observed,
    members: &[String],
    order: &dyn Fn(&str) -> Vec<String>,
    plan_id: i64,
    send: Send<'_>,
) -> String {
    let previous: Guests = observed
        .guests
        .iter()
        .map(|(n, o)| (n.clone(), o.applied.clone()))
        .collect();
    let mut failed = Vec::new();
    for m in members.iter().rev() {
        let t = Instant::now();
        send(event(
            m,
            StepStatus::Started,
            format!("reverting {m} to its previous config"),
            t,
        ));
        let _ = engine.take_out(m, "rollout", group.drain_ms);
        let names = order(m);
        let current: Vec<(String, Option<Guest>)> = names
            .iter()
            .map(|n| {
                let g = engine
                    .store
                    .guest(n)
                    .ok()
                    .flatten()
                    .and_then(|r| serde_json::from_str::<Guest>(&r.config_json).ok());
                (n.clone(), g)
            })
            .collect();
        let from: Vec<(&str, Option<&Guest>)> = current
            .iter()
            .map(|(n, g)| (n.as_str(), g.as_ref()))
            .collect();
        let generation = engine
            .store
            .guest(m)
            .ok()
            .flatten()
            .map_or(0, |r| r.generation);
        let none = |_: &str| None;
        let res = switch(
            engine,
            m,
            ActionKind::Restart,
            &from,
            &previous,
            &none,
            generation,
            plan_id,
        );
        let deadline = Instant::now() + Duration::from_millis(group.healthy_deadline_ms);
        let healthy = res.is_ok()
            && wait_for(engine, deadline, || {
                engine.health.status(m) == Status::Healthy
            });
        let _ = engine.clear_drain(m);
        let _ = crate::vip::reconcile(engine);
        if healthy {
            send(event(
                m,
                StepStatus::RolledBack,
                "back on its previous config".into(),
                t,
            ));
        } else {
            let why = res.err().map_or("not healthy".into(), |e| e.to_string());
            send(event(m, StepStatus::Failed, format!("revert: {why}"), t));
            failed.push(format!("{m} ({why})"));
        }
    }
    if failed.is_empty() {
        format!(
            "reverted {} to the previous config (auto_revert)",
            members.join(", ")
        )
    } else {
        format!("reverting failed for {}", failed.join(", "))
    }
}
