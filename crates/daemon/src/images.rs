//! The daemon's part of images: pull what an apply needs before any guest
//! is touched, refuse an apply that would delete disks made from images
//! unless asked to, and remove such disks with their guest.

use std::path::Path;
use std::time::Instant;

use berth_api::{ApplyEvent, StepStatus};
use berth_plan::{ActionKind, Observed, Plan};
use berth_spec::Desired;
use berth_spec::vm::managed_disk_dir;

use crate::engine::EngineError;

/// The images the guests that this plan starts (creates, restarts,
/// replaces, starts) use, by name, deduplicated.
fn needed<'a>(plan: &Plan, desired: &'a Desired) -> Vec<&'a berth_spec::image::Image> {
    let mut out: Vec<&berth_spec::image::Image> = Vec::new();
    for a in &plan.actions {
        if a.kind == ActionKind::Destroy {
            continue;
        }
        let Some(vm) = a
            .guest
            .as_deref()
            .and_then(|n| desired.guests.get(n))
            .and_then(|g| g.vm.as_ref())
        else {
            continue;
        };
        for img in vm.images.values() {
            if !out.iter().any(|o| o.identity() == img.identity()) {
                out.push(img);
            }
        }
    }
    out
}

/// Refuses (with every reason) a plan that deletes what a guest wrote on a
/// disk berth made from an image, unless `allow` (`--allow-disruption`).
pub fn check_disruption(
    plan: &Plan,
    desired: &Desired,
    observed: &Observed,
    allow: bool,
) -> Result<(), String> {
    if allow {
        return Ok(());
    }
    let mut why = Vec::new();
    for a in &plan.actions {
        let disks = berth_plan::deleted_disks(a, desired, observed);
        if !disks.is_empty() {
            why.push(format!(
                "guest `{}` ({}): deletes its disk(s) {} made from images",
                a.guest.as_deref().unwrap_or("?"),
                a.kind,
                disks.join(", ")
            ));
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "refusing to apply: {}; what the guests wrote there would be lost. Check `berth plan`, back up what you need, then run `berth apply --allow-disruption`",
            why.join("; ")
        ))
    }
}

/// Pulls every image the plan needs (cached ones without a request), one
/// step event each. Returns the cache hold that keeps `berth image gc` away
/// until the apply has recorded the guests that use them.
pub fn pull_all(
    state_dir: &Path,
    plan: &Plan,
    desired: &Desired,
    send: &(dyn Fn(ApplyEvent) + Sync),
) -> Result<Option<berth_image::cache::Lock>, String> {
    let imgs = needed(plan, desired);
    if imgs.is_empty() {
        return Ok(None);
    }
    let cache = berth_image::Cache::new(state_dir);
    let hold = cache.hold().map_err(|e| e.to_string())?;
    for img in imgs {
        let t = Instant::now();
        let step = format!("image {}", img.name);
        let ev = |status, message: String| ApplyEvent::Step {
            guest: None,
            step: step.clone(),
            status,
            message,
            elapsed_ms: t.elapsed().as_millis() as u64,
        };
        send(ev(StepStatus::Started, img.url.clone()));
        let mut note = String::new();
        let mut last_pct = 0;
        let res = cache.pull(img, false, &mut |e| match e {
            berth_image::Event::Cached { .. } => note = "cached".into(),
            berth_image::Event::Verified { sha256, .. } => {
                note = format!("downloaded, sha256 {sha256}")
            }
            berth_image::Event::Bytes {
                done,
                total: Some(t),
            } if t > 0 => {
                let pct = done * 100 / t;
                if pct >= last_pct + 25 && pct < 100 {
                    last_pct = pct - pct % 25;
                    send(ev(
                        StepStatus::Started,
                        format!("{pct}% of {} MiB", t >> 20),
                    ));
                }
            }
            berth_image::Event::Retry { error, .. } => {
                send(ev(StepStatus::Started, format!("{error}; retrying")));
            }
            _ => {}
        });
        match res {
            Ok(_) => send(ev(StepStatus::Done, note)),
            Err(e) => {
                send(ev(StepStatus::Failed, e.to_string()));
                return Err(format!("not touching any guest: image `{}`: {e}", img.name));
            }
        }
    }
    // Disks that would be smaller than their image: say so now, before any
    // guest is touched (the supervisor would refuse later, half-way).
    for a in plan
        .actions
        .iter()
        .filter(|a| a.kind != ActionKind::Destroy)
    {
        let Some(g) = a.guest.as_deref().and_then(|n| desired.guests.get(n)) else {
            continue;
        };
        let Some(vm) = &g.vm else { continue };
        for (k, d) in vm.disks.iter().enumerate() {
            let (Some(name), Some(size)) = (&d.image, d.size) else {
                continue;
            };
            let Some(img) = vm.images.get(name) else {
                continue;
            };
            let Ok(artifact) = cache.resolve(img) else {
                continue;
            };
            if let Ok((_, image_size, _)) = berth_image::disk::image_info(&artifact)
                && size < image_size
            {
                return Err(format!(
                    "not touching any guest: guest `{}`: disk {k} from image `{name}` would be {size} bytes, smaller than the image ({image_size} bytes); give it a `size` of at least that",
                    g.name
                ));
            }
        }
    }
    Ok(Some(hold))
}

/// Deletes the disks berth made from images for `guest`: all of them
/// (`None`), or the listed ones (paths relative to the guest's disk dir).
pub fn remove_managed_disks(
    state_dir: &Path,
    guest: &str,
    only: Option<&[String]>,
) -> Result<Vec<String>, EngineError> {
    let dir = managed_disk_dir(state_dir, guest);
    let mut removed = Vec::new();
    match only {
        None => {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| {
                    EngineError::guest(guest, format!("removing {}: {e}", dir.display()))
                })?;
                removed.push(format!("disks {}", dir.display()));
            }
        }
        Some(list) => {
            for p in list {
                let f = dir.join(p);
                match std::fs::remove_file(&f) {
                    Ok(()) => removed.push(format!("disk {}", f.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(EngineError::guest(
                            guest,
                            format!("removing {}: {e}", f.display()),
                        ));
                    }
                }
            }
        }
    }
    Ok(removed)
}
