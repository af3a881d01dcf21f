//! Keeps running guests registered with systemd-machined on systemd hosts.
//!
//! Each supervisor registers its guest when it starts (berth_shim::machined).
//! machined forgets a machine whose unit it sees inactive: with guests in
//! berth.service's cgroup, a restart of the daemon's unit dropped them (the
//! guests ran on, unlisted). Guests now live in scopes of their own
//! (berth_container::cgroup), which a daemon restart does not touch; as a
//! safety net the daemon still compares machined's list with the running
//! guests when it starts and every few seconds, and registers again what is
//! missing. One `busctl` call per round; nothing at all without systemd.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_shim::machined::{self, Machine};

use crate::engine::Engine;

/// How often machined's list is compared with the running guests.
const EVERY: Duration = Duration::from_secs(5);

/// Registers every running guest machined does not list. Returns the names
/// registered again.
pub fn reconcile(engine: &Engine) -> Result<Vec<String>, String> {
    let known: BTreeSet<String> = machined::list()?.into_iter().collect();
    let roots: BTreeMap<String, PathBuf> = engine
        .applied_guests()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|g| (g.name.clone(), g.rootfs.clone()))
        .collect();
    let mut done = Vec::new();
    for g in engine.list().map_err(|e| e.to_string())? {
        let running = matches!(g.state.as_str(), "running" | "booting");
        let Some(pid) = g.pid.filter(|_| running) else {
            continue;
        };
        if known.contains(&machined::machine_name(&g.name)) {
            continue;
        }
        let vm = g.kind.starts_with("vm");
        let root = match (vm, roots.get(&g.name)) {
            (false, Some(r)) => r.clone(),
            _ => PathBuf::new(),
        };
        let m = Machine {
            guest: &g.name,
            class: if vm { "vm" } else { "container" },
            leader: pid as u32,
            root: &root,
            link: &g.link,
        };
        match machined::register(true, &m) {
            Ok(()) => done.push(g.name.clone()),
            Err(e) => tracing::warn!(guest = %g.name, "{e}"),
        }
    }
    Ok(done)
}

/// Runs [`reconcile`] now and every [`EVERY`], on systemd hosts only.
pub fn keeper(engine: Arc<Engine>) {
    if !berth_container::systemd_available() {
        return;
    }
    loop {
        match reconcile(&engine) {
            Ok(names) if !names.is_empty() => {
                tracing::info!(
                    "registered with systemd-machined again: {}",
                    names.join(", ")
                )
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("checking systemd-machined's machines: {e}"),
        }
        std::thread::sleep(EVERY);
    }
}
