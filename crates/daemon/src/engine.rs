//! The executor: turns plan actions into shim, network and store operations.
//!
//! Every operation is blocking and idempotent (run it twice, get the same
//! host); the daemon calls them from `spawn_blocking`. Each guest step is
//! journalled and the guest's `phase` says whether its record can be trusted:
//! `creating`/`removing` left behind by a crash make the planner replace the
//! guest, and resource names are derived from the guest (link `vb<index>`,
//! cgroup `berth/<name>`, dir `guests/<name>`), so cleanup never guesses.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use berth_api::GuestInfo;
use berth_container::Cgroup;
use berth_plan::{GuestStatus, Observed, ObservedGuest};
use berth_shim::{GuestPaths, Request, ShimState, ShimStatus, client};
use berth_spec::{Desired, Guest, Host};
use berth_store::{GuestRecord, Phase, Resource, RunState, StepStatus, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("guest `{0}` does not exist (see `berth ps`)")]
    NoSuchGuest(String),
    #[error("guest `{guest}`: {message}")]
    Guest { guest: String, message: String },
    #[error("{0}")]
    Host(String),
    /// The request is fine but the guest's state does not allow it.
    #[error("{0}")]
    Conflict(String),
}

impl EngineError {
    pub(crate) fn guest(guest: &str, message: impl Into<String>) -> EngineError {
        EngineError::Guest {
            guest: guest.to_owned(),
            message: message.into(),
        }
    }
}

/// What an exec gives back: exit code (or 128 + signal), stdout, stderr.
pub type ExecOutput = (i32, Vec<u8>, Vec<u8>);

/// `pid` exists (signal 0). The supervisor's reaper thread (client::spawn)
/// reaps it at once when it exits, so a dead one is gone, not a zombie.
fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// How long a started guest must stay up before `apply` calls it started.
/// A guest that exits within this window is reported as failing at once.
pub fn start_grace() -> Duration {
    let ms = std::env::var("BERTH_START_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_millis(ms)
}

pub struct Engine {
    pub state_dir: PathBuf,
    pub store: Store,
    /// The berth executable shims are started from.
    pub exe: PathBuf,
    /// Health of probed guests (in memory; see [`crate::health`]).
    pub health: crate::health::HealthBoard,
    /// Members each service address is routed to, as last set (see
    /// [`crate::vip`]); its lock serialises route changes.
    pub vip_routes: std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, Vec<String>>>,
    /// Bumped whenever a guest record changes.
    pub guests_gen: std::sync::atomic::AtomicU64,
    /// The standby member of each active-mode VIP, as last set.
    pub vip_backups: std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, String>>,
    /// Members whose connection pinning is in place: index -> ifindex of
    /// the link it was set up for.
    pub pins: std::sync::Mutex<std::collections::BTreeMap<u32, u32>>,
}

/// Store key of the groups as last applied (JSON).
const GROUPS_KEY: &str = "groups";
/// Store key prefix of drained guests (value: why).
const DRAIN_KEY: &str = "drain/";
/// Store key of the host drain flag.
const HOST_DRAIN_KEY: &str = "host/drain";
/// Store key of the generation an apply is working on (gone when it ends).
pub const APPLY_KEY: &str = "apply/running";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Engine {
    pub fn new(state_dir: PathBuf, store: Store, exe: PathBuf) -> Engine {
        Engine {
            state_dir,
            store,
            exe,
            health: Default::default(),
            vip_routes: Default::default(),
            guests_gen: Default::default(),
            pins: Default::default(),
            vip_backups: Default::default(),
        }
    }

    /// Changes whenever a guest record changes (for the health monitor).
    pub fn guests_changed(&self) -> u64 {
        self.guests_gen.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn touch_guests(&self) {
        self.guests_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.health.poke();
    }

    /// Every recorded guest's applied config (unreadable records skipped).
    pub fn applied_guests(&self) -> Result<Vec<Guest>, EngineError> {
        Ok(self
            .store
            .guests()?
            .iter()
            .filter(|r| r.phase == Phase::Ready)
            .filter_map(|r| self.applied(r).ok())
            .collect())
    }

    /// Groups as last applied.
    pub fn applied_groups(
        &self,
    ) -> Result<std::collections::BTreeMap<String, berth_spec::Group>, EngineError> {
        Ok(self
            .store
            .kv(GROUPS_KEY)?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default())
    }

    pub fn set_groups(
        &self,
        groups: &std::collections::BTreeMap<String, berth_spec::Group>,
    ) -> Result<(), EngineError> {
        let j = serde_json::to_string(groups).map_err(|e| EngineError::Host(e.to_string()))?;
        self.store.set_kv(GROUPS_KEY, &j)?;
        self.health.poke();
        Ok(())
    }

    /// Guests taken out of their service address.
    pub fn drained(&self) -> Result<std::collections::BTreeSet<String>, EngineError> {
        Ok(self
            .store
            .kv_prefix(DRAIN_KEY)?
            .into_iter()
            .map(|(k, _)| k[DRAIN_KEY.len()..].to_owned())
            .collect())
    }

    /// Takes `guest` out of its service address (`why`: "rollout", "scale", "operator").
    pub fn set_drain(&self, guest: &str, why: &str) -> Result<(), EngineError> {
        self.store.set_kv(&format!("{DRAIN_KEY}{guest}"), why)?;
        self.health.poke();
        Ok(())
    }

    /// Takes `guest` out of its service address now (the route has moved
    /// when this returns), then waits `drain_ms` for requests in flight.
    pub fn take_out(&self, guest: &str, why: &str, drain_ms: u64) -> Result<(), EngineError> {
        self.set_drain(guest, why)?;
        if let Err(e) = crate::vip::reconcile(self) {
            tracing::warn!("service addresses: {e}");
        }
        std::thread::sleep(Duration::from_millis(drain_ms));
        Ok(())
    }

    pub fn clear_drain(&self, guest: &str) -> Result<(), EngineError> {
        self.store.delete_kv(&format!("{DRAIN_KEY}{guest}"))?;
        self.health.poke();
        Ok(())
    }

    /// Why `guest` is drained, if it is.
    pub fn drain_reason(&self, guest: &str) -> Result<Option<String>, EngineError> {
        Ok(self.store.kv(&format!("{DRAIN_KEY}{guest}"))?)
    }

    pub fn host_drained(&self) -> Result<bool, EngineError> {
        Ok(self.store.kv(HOST_DRAIN_KEY)?.is_some())
    }

    /// `berth drain`: withdraws every service address from this host (or
    /// brings them back with `on = false`), and waits until the routes follow.
    pub fn set_host_drain(&self, on: bool) -> Result<(), EngineError> {
        if on {
            self.store.set_kv(HOST_DRAIN_KEY, "1")?;
        } else {
            self.store.delete_kv(HOST_DRAIN_KEY)?;
        }
        crate::vip::reconcile(self).map_err(EngineError::Host)?;
        self.health.poke();
        Ok(())
    }

    /// Whether a service address currently routes to `guest`.
    pub fn carries_vip(&self, guest: &str) -> bool {
        self.vip_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|v| v.iter().any(|m| m == guest))
    }

    pub fn paths(&self, guest: &str) -> GuestPaths {
        GuestPaths::new(&self.state_dir, guest)
    }

    pub(crate) fn record(&self, name: &str) -> Result<GuestRecord, EngineError> {
        self.store
            .guest(name)?
            .ok_or_else(|| EngineError::NoSuchGuest(name.to_owned()))
    }

    pub(crate) fn applied(&self, rec: &GuestRecord) -> Result<Guest, EngineError> {
        serde_json::from_str(&rec.config_json)
            .map_err(|e| EngineError::guest(&rec.name, format!("stored config is unreadable: {e}")))
    }

    /// Current state of every recorded guest, for the planner.
    pub fn observed(&self) -> Result<Observed, EngineError> {
        let host = match self.store.host()? {
            Some(j) => serde_json::from_str::<Host>(&j).ok(),
            None => None,
        };
        let mut guests = std::collections::BTreeMap::new();
        for rec in self.store.guests()? {
            let Ok(applied) = self.applied(&rec) else {
                continue;
            };
            let status = if rec.phase != Phase::Ready {
                GuestStatus::Partial
            } else {
                match client::status(&self.paths(&rec.name)) {
                    Some(s) => match s.state {
                        ShimState::Failed => GuestStatus::Failed,
                        ShimState::Stopped => GuestStatus::Stopped,
                        _ => GuestStatus::Running,
                    },
                    None if rec.run == RunState::Stopped => GuestStatus::Stopped,
                    None => match client::last_status(&self.paths(&rec.name)).map(|s| s.state) {
                        Some(ShimState::Failed) => GuestStatus::Failed,
                        Some(ShimState::Stopped) => GuestStatus::Stopped,
                        _ => GuestStatus::Missing,
                    },
                }
            };
            guests.insert(rec.name.clone(), ObservedGuest { applied, status });
        }
        Ok(Observed {
            host,
            guests,
            groups: self.applied_groups()?,
        })
    }

    /// `berth ps` rows.
    pub fn list(&self) -> Result<Vec<GuestInfo>, EngineError> {
        self.store
            .guests()?
            .iter()
            .map(|r| self.info_of(r))
            .collect()
    }

    pub fn info(&self, name: &str) -> Result<GuestInfo, EngineError> {
        let rec = self.record(name)?;
        self.info_of(&rec)
    }

    fn info_of(&self, rec: &GuestRecord) -> Result<GuestInfo, EngineError> {
        let g = self.applied(rec)?;
        let paths = self.paths(&rec.name);
        let live = client::status(&paths);
        let last = live.clone().or_else(|| client::last_status(&paths));
        let state = match (&rec.phase, &live) {
            (Phase::Creating, _) => "creating".to_owned(),
            (Phase::Removing, _) => "removing".to_owned(),
            (_, Some(s)) => s.state.as_str().to_owned(),
            (_, None) => match (&rec.run, last.as_ref().map(|s| s.state)) {
                // A VM that ended in failure crashed (QEMU died or the guest
                // could not be started), in the words VM operators use.
                (_, Some(ShimState::Failed)) if g.vm.is_some() => "crashed".to_owned(),
                (_, Some(ShimState::Failed)) => "failed".to_owned(),
                (RunState::Running, _) => "missing".to_owned(),
                (RunState::Stopped, _) => "stopped".to_owned(),
            },
        };
        Ok(GuestInfo {
            name: rec.name.clone(),
            kind: rec.kind.clone(),
            index: rec.index,
            state,
            pid: live.as_ref().and_then(|s| s.leader_pid),
            shim_pid: live.as_ref().map(|s| s.shim_pid),
            addresses: g.addresses(),
            link: g.link.clone(),
            restarts: live.as_ref().map(|s| s.restarts).unwrap_or(0),
            memory: g.memory,
            restart: format!("{:?}", g.restart)
                .to_lowercase()
                .replace("onfailure", "on-failure"),
            autostart: g.autostart,
            started_at: live.as_ref().and_then(|s| s.started_at),
            last_exit: last
                .as_ref()
                .and_then(|s| s.last_exit.as_ref())
                .map(|e| e.describe()),
            accel: last.as_ref().and_then(|s| s.accel.clone()),
            message: last.and_then(|s| s.message),
            health: (g.health.is_some() || g.group.is_some())
                .then(|| self.health.status(&rec.name).as_str().to_owned()),
            health_error: self
                .health
                .get(&rec.name)
                .filter(|h| h.status != crate::health::Status::Healthy)
                .and_then(|h| h.last_error),
            group: g.group.clone(),
            serving: crate::vip::serving(self)
                .remove(&rec.name)
                .unwrap_or_default()
                .iter()
                .map(|a| a.to_string())
                .collect(),
            drained: match (g.group.is_some(), self.drain_reason(&rec.name)?) {
                (_, Some(why)) => Some(why),
                (true, None) if self.host_drained()? => Some("host".into()),
                _ => None,
            },
        })
    }

    // ----- host --------------------------------------------------------------

    /// Forwarding on and the `inet berth` table for `host`. The table's
    /// source filters list every index the host allows (1..max_guests), so it
    /// depends on the host config alone: creating or removing a guest never
    /// touches it, and it is rewritten only when the host config changes.
    pub fn apply_host(
        &self,
        host: &Host,
        groups: &[&std::collections::BTreeMap<String, berth_spec::Group>],
    ) -> Result<(), EngineError> {
        berth_net::enable_forwarding().map_err(|e| EngineError::Host(e.to_string()))?;
        if groups
            .iter()
            .flat_map(|m| m.values())
            .any(|g| g.mode == berth_spec::VipMode::Ecmp)
        {
            berth_net::enable_l4_multipath_hash().map_err(|e| EngineError::Host(e.to_string()))?;
        }
        berth_net::apply_ruleset(&firewall_of(host, groups))
            .map_err(|e| EngineError::Host(e.to_string()))?;
        self.store.add_resource(&Resource {
            kind: "nft_table".into(),
            name: "inet berth".into(),
            guest: None,
            detail: format!("NAT {} out of {}", host.subnet4, host.uplink),
        })?;
        let nets: Vec<ipnet::IpNet> = std::iter::once(ipnet::IpNet::V4(host.subnet4))
            .chain(host.subnet6.map(ipnet::IpNet::V6))
            .collect();
        // Routes of an earlier subnet go first.
        for r in self.store.resources(None)? {
            if r.kind == "unreachable_route"
                && let Ok(old) = r.name.parse::<ipnet::IpNet>()
                && !nets.contains(&old)
            {
                berth_net::delete_subnet_unreachable(old)
                    .map_err(|e| EngineError::Host(e.to_string()))?;
                self.store.remove_resource(&r.kind, &r.name)?;
            }
        }
        for net in nets {
            berth_net::set_subnet_unreachable(net).map_err(|e| EngineError::Host(e.to_string()))?;
            self.store.add_resource(&Resource {
                kind: "unreachable_route".into(),
                name: net.to_string(),
                guest: None,
                detail: "guest addresses without a guest answer unreachable".into(),
            })?;
        }
        Ok(())
    }

    /// Restores the host's network setup from the store (daemon start).
    pub fn refresh_firewall(&self) -> Result<(), EngineError> {
        match self
            .store
            .host()?
            .and_then(|j| serde_json::from_str::<Host>(&j).ok())
        {
            Some(host) => self.apply_host(&host, &[&self.applied_groups()?]),
            None => Ok(()),
        }
    }

    // ----- guests -----------------------------------------------------------

    /// Records `g` (phase `creating`), writes its config, starts it if
    /// `start`, and marks it `ready`. Shared by create and restart.
    fn bring_up(&self, g: &Guest, start: bool, generation: i64) -> Result<(), EngineError> {
        let run = if start {
            RunState::Running
        } else {
            RunState::Stopped
        };
        self.put(g, run, Phase::Creating, generation)?;
        self.write_config(g)?;
        if start {
            self.start_shim(g)?;
        }
        self.store.set_phase(&g.name, Phase::Ready)?;
        Ok(())
    }

    /// Creates guest `g` and starts it if `start`. On failure the guest is
    /// removed again, leaving the host as it was.
    pub fn create(
        &self,
        g: &Guest,
        start: bool,
        generation: i64,
        plan_id: i64,
    ) -> Result<(), EngineError> {
        self.step(plan_id, &g.name, "create", StepStatus::Started, "")?;
        match self.bring_up(g, start, generation) {
            Ok(()) => self.step(plan_id, &g.name, "create", StepStatus::Done, ""),
            Err(e) => {
                self.step(
                    plan_id,
                    &g.name,
                    "create",
                    StepStatus::Failed,
                    &e.to_string(),
                )?;
                let _ = self.remove(&g.name, g);
                Err(e)
            }
        }
    }

    /// Stops the guest if running, records the new config, starts it again.
    /// If the new config fails to start, the previous one is brought back.
    pub fn restart_with(
        &self,
        old: &Guest,
        new: &Guest,
        start: bool,
        generation: i64,
        plan_id: i64,
    ) -> Result<(), EngineError> {
        self.step(plan_id, &new.name, "restart", StepStatus::Started, "")?;
        self.store.set_phase(&new.name, Phase::Creating)?;
        self.stop_shim(&new.name)?;
        match self.bring_up(new, start, generation) {
            Ok(()) => self.step(plan_id, &new.name, "restart", StepStatus::Done, ""),
            Err(e) => {
                self.step(
                    plan_id,
                    &new.name,
                    "restart",
                    StepStatus::Failed,
                    &e.to_string(),
                )?;
                // Undo: the previous config, as it was.
                let _ = self.stop_shim(&new.name);
                let before = self
                    .store
                    .guest(&old.name)?
                    .map(|r| r.generation)
                    .unwrap_or(generation);
                if let Err(undo) = self.bring_up(old, true, before) {
                    tracing::warn!(guest = %old.name, "bringing back the previous config failed: {undo}");
                }
                Err(e)
            }
        }
    }

    /// Records a live change (no restart). The shim rereads its config when
    /// it needs the changed fields (restart policy, stop timeout).
    pub fn update_live(&self, g: &Guest, generation: i64, plan_id: i64) -> Result<(), EngineError> {
        let rec = self.record(&g.name)?;
        self.step(plan_id, &g.name, "update", StepStatus::Started, "")?;
        self.put(g, rec.run, rec.phase, generation)?;
        self.write_config(g)?;
        // A running shim applies what can change live (policy, pinning).
        if let Err(e) = client::request(
            &self.paths(&g.name).socket(),
            &Request::Reload,
            Duration::from_secs(10),
        ) && !matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ) {
            return Err(EngineError::guest(
                &g.name,
                format!("applying the change live: {e}"),
            ));
        }
        self.step(plan_id, &g.name, "update", StepStatus::Done, "")?;
        Ok(())
    }

    /// Starts a recorded guest (no-op if its shim runs).
    pub fn start(&self, name: &str) -> Result<(), EngineError> {
        let rec = self.record(name)?;
        let g = self.applied(&rec)?;
        self.store.set_run_state(name, RunState::Running)?;
        self.start_shim(&g)
    }

    /// Stops a recorded guest and remembers it should stay stopped. A group
    /// member first leaves its service address and drains.
    pub fn stop(&self, name: &str) -> Result<(), EngineError> {
        let rec = self.record(name)?;
        let drained = self.drain_member(&rec)?;
        self.store.set_run_state(name, RunState::Stopped)?;
        let res = self.stop_shim(name);
        if drained {
            self.clear_drain(name)?;
        }
        res
    }

    /// `berth restart`: stop and start; a group member leaves its service
    /// address first and competes for it again once healthy.
    pub fn restart(&self, name: &str) -> Result<(), EngineError> {
        let rec = self.record(name)?;
        let drained = self.drain_member(&rec)?;
        let res = self
            .stop_shim(name)
            .and_then(|()| self.start(name))
            .map(|()| self.health.reset(name));
        if drained {
            self.clear_drain(name)?;
        }
        res
    }

    /// If `rec` is a running group member: takes it out of the service
    /// address and waits `drain_time`. True if it did.
    fn drain_member(&self, rec: &GuestRecord) -> Result<bool, EngineError> {
        let g = self.applied(rec)?;
        let Some(group) = g.group.as_deref() else {
            return Ok(false);
        };
        if client::status(&self.paths(&rec.name)).is_none() {
            return Ok(false);
        }
        let drain_ms = self.applied_groups()?.get(group).map_or(0, |g| g.drain_ms);
        self.take_out(&rec.name, "stop", drain_ms)?;
        Ok(true)
    }

    /// Stops and deletes a guest and everything berth made for it,
    /// including the disks it made from images.
    pub fn destroy(&self, name: &str, plan_id: i64) -> Result<Vec<String>, EngineError> {
        let mut removed = self.destroy_keeping_disks(name, plan_id, &[])?;
        removed.extend(crate::images::remove_managed_disks(
            &self.state_dir,
            name,
            None,
        )?);
        Ok(removed)
    }

    /// [`Engine::destroy`] for the first half of a replace: the disks made
    /// from images stay (the new guest uses them), except `recreate`.
    pub fn destroy_keeping_disks(
        &self,
        name: &str,
        plan_id: i64,
        recreate: &[String],
    ) -> Result<Vec<String>, EngineError> {
        let rec = self.record(name)?;
        let g = self.applied(&rec)?;
        self.step(plan_id, name, "destroy", StepStatus::Started, "")?;
        self.store.set_phase(name, Phase::Removing)?;
        let mut removed = self.remove(name, &g)?;
        if !recreate.is_empty() {
            removed.extend(crate::images::remove_managed_disks(
                &self.state_dir,
                name,
                Some(recreate),
            )?);
        }
        self.step(plan_id, name, "destroy", StepStatus::Done, "")?;
        Ok(removed)
    }

    fn remove(&self, name: &str, g: &Guest) -> Result<Vec<String>, EngineError> {
        let mut removed = Vec::new();
        let _ = self.stop_shim(name);
        let cg = Cgroup::for_guest(name);
        if cg.exists() {
            cg.kill_all(Duration::from_secs(5))
                .map_err(|e| EngineError::guest(name, e.to_string()))?;
            cg.remove()
                .map_err(|e| EngineError::guest(name, e.to_string()))?;
            removed.push(format!("cgroup berth/{name}"));
        }
        let mut links = vec![g.link.clone()];
        for r in self.store.resources(Some(name))? {
            if r.kind == "link" && !links.contains(&r.name) {
                links.push(r.name);
            }
        }
        for l in links {
            if berth_net::delete_link(&l).map_err(|e| EngineError::guest(name, e.to_string()))? {
                removed.push(format!("link {l}"));
            }
        }
        let dir = self.paths(name).dir;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| {
                EngineError::guest(name, format!("removing {}: {e}", dir.display()))
            })?;
            removed.push(format!("dir {}", dir.display()));
        }
        self.store.delete_guest(name)?;
        self.touch_guests();
        removed.extend(self.gc_segments()?);
        Ok(removed)
    }

    fn put(
        &self,
        g: &Guest,
        run: RunState,
        phase: Phase,
        generation: i64,
    ) -> Result<(), EngineError> {
        let config_json = serde_json::to_string(g)
            .map_err(|e| EngineError::guest(&g.name, format!("serializing config: {e}")))?;
        self.store.put_guest(&GuestRecord {
            name: g.name.clone(),
            kind: format!("{:?}", g.kind).to_lowercase(),
            index: g.index,
            config_json,
            run,
            phase,
            generation,
            updated_at: now(),
        })?;
        self.touch_guests();
        for (kind, rname) in [
            ("link", g.link.clone()),
            ("cgroup", format!("berth/{}", g.name)),
        ] {
            self.store.add_resource(&Resource {
                kind: kind.into(),
                name: rname,
                guest: Some(g.name.clone()),
                detail: String::new(),
            })?;
        }
        self.record_nics(g)
    }

    /// Records the links of `g`'s extra NICs (the shim creates them at
    /// start) and the bridges of its segments (created on demand, shared),
    /// before anything exists, so a crash never leaves one unrecorded; then
    /// removes bridges no guest names any more.
    fn record_nics(&self, g: &Guest) -> Result<(), EngineError> {
        for nic in &g.nics {
            if let Some(link) = nic.link() {
                self.store.add_resource(&Resource {
                    kind: "link".into(),
                    name: link.to_string(),
                    guest: Some(g.name.clone()),
                    detail: format!("nic[{}]: {}", nic.position, nic.describe()),
                })?;
            }
            if let berth_spec::nic::NicKind::Segment {
                segment, bridge, ..
            } = &nic.kind
            {
                self.store.add_resource(&Resource {
                    kind: "bridge".into(),
                    name: bridge.clone(),
                    guest: None,
                    detail: format!("segment {segment}"),
                })?;
            }
        }
        self.gc_segments().map(drop)
    }

    /// Deletes the segment bridges that no recorded guest names (a segment
    /// whose last member was destroyed or moved), and forgets them.
    pub fn gc_segments(&self) -> Result<Vec<String>, EngineError> {
        // Every record counts, whatever its phase: a guest being created
        // or restarted is about to use its segments.
        let records = self.store.guests()?;
        let used: std::collections::BTreeSet<String> = records
            .iter()
            .filter_map(|r| self.applied(r).ok())
            .flat_map(|g| g.nics)
            .filter_map(|n| match n.kind {
                berth_spec::nic::NicKind::Segment { bridge, .. } => Some(bridge),
                _ => None,
            })
            .collect();
        let mut removed = Vec::new();
        for r in self.store.resources(None)? {
            if r.kind != "bridge" || used.contains(&r.name) {
                continue;
            }
            if berth_net::delete_link(&r.name).map_err(|e| EngineError::Host(e.to_string()))? {
                tracing::info!(bridge = %r.name, "segment bridge removed: no guest uses it");
                removed.push(format!("bridge {}", r.name));
            }
            self.store.remove_resource(&r.kind, &r.name)?;
        }
        Ok(removed)
    }

    fn write_config(&self, g: &Guest) -> Result<(), EngineError> {
        let paths = self.paths(&g.name);
        std::fs::create_dir_all(&paths.dir).map_err(|e| {
            EngineError::guest(&g.name, format!("creating {}: {e}", paths.dir.display()))
        })?;
        let tmp = paths.config().with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(g).map_err(|e| EngineError::guest(&g.name, e.to_string()))?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, paths.config()))
            .map_err(|e| EngineError::guest(&g.name, format!("writing config: {e}")))
    }

    fn step(
        &self,
        plan_id: i64,
        guest: &str,
        step: &str,
        status: StepStatus,
        detail: &str,
    ) -> Result<(), EngineError> {
        if plan_id > 0 {
            self.store
                .journal(plan_id, Some(guest), step, status, detail)?;
        }
        Ok(())
    }

    /// Spawns the guest's shim unless one already answers, then waits until
    /// the guest runs and has stayed up for the start grace period.
    pub fn start_shim(&self, g: &Guest) -> Result<(), EngineError> {
        let paths = self.paths(&g.name);
        if client::status(&paths).is_some_and(|s| !s.state.is_final()) {
            return Ok(());
        }
        let _ = std::fs::remove_file(paths.status());
        let pid = client::spawn(&self.exe, &self.state_dir, &g.name)
            .map_err(|e| EngineError::guest(&g.name, format!("starting its supervisor: {e}")))?;
        self.wait_started(g, &paths, pid)
    }

    /// Waits for the supervisor spawned as `pid` to report the guest up.
    fn wait_started(&self, g: &Guest, paths: &GuestPaths, pid: u32) -> Result<(), EngineError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let failed = |s: Option<&ShimStatus>| -> EngineError {
            let how = s
                .and_then(|s| {
                    s.last_exit
                        .as_ref()
                        .map(|e| e.describe())
                        .or_else(|| s.message.clone())
                })
                .unwrap_or_else(|| "did not start".into());
            let tail = berth_shim::tail_lines(&paths.console_log(), 5);
            let shim_tail = berth_shim::tail_lines(&paths.shim_log(), 3);
            let mut msg = format!("{how} right after start");
            if !tail.is_empty() {
                msg.push_str(&format!("; last output: {tail}"));
            } else if !shim_tail.is_empty() {
                msg.push_str(&format!("; supervisor log: {shim_tail}"));
            }
            EngineError::guest(&g.name, msg)
        };
        // The shim needs a moment to bind its socket; then one request waits
        // until the guest has left `starting`.
        let live = loop {
            match client::request(
                &paths.socket(),
                &Request::WaitStarted,
                Duration::from_secs(90),
            ) {
                Ok(s) => break s,
                Err(_) => {
                    // The shim may have exited already (policy never); its file says why.
                    if let Some(last) = client::last_status(paths).filter(|s| s.state.is_final()) {
                        return Err(failed(Some(&last)));
                    }
                    // It died before it could say anything (systemd-run
                    // refused the scope, a broken binary): its log says why.
                    if !process_alive(pid) && client::status(paths).is_none() {
                        let tail = berth_shim::tail_lines(&paths.shim_log(), 3);
                        return Err(EngineError::guest(
                            &g.name,
                            format!("its supervisor exited before it started: {tail}"),
                        ));
                    }
                    if Instant::now() > deadline {
                        let _ = self.stop_shim(&g.name);
                        return Err(EngineError::guest(
                            &g.name,
                            "its supervisor did not come up within 60 s",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        let up = |s: ShimState| matches!(s, ShimState::Running | ShimState::Booting);
        if !up(live.state) {
            let _ = self.stop_shim(&g.name);
            return Err(failed(Some(&live)));
        }
        std::thread::sleep(start_grace());
        match client::status(paths) {
            Some(s) if up(s.state) && s.restarts == 0 => Ok(()),
            s => {
                let s = s.or_else(|| client::last_status(paths));
                let _ = self.stop_shim(&g.name);
                Err(failed(s.as_ref()))
            }
        }
    }

    /// Asks the shim to stop the guest and waits for it; no shim is fine.
    pub fn stop_shim(&self, name: &str) -> Result<(), EngineError> {
        let paths = self.paths(name);
        let timeout = self
            .store
            .guest(name)?
            .and_then(|r| serde_json::from_str::<Guest>(&r.config_json).ok())
            .map(|g| Duration::from_millis(g.stop_timeout_ms) + Duration::from_secs(10))
            .unwrap_or(Duration::from_secs(30));
        match client::request(&paths.socket(), &Request::Stop, timeout) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(EngineError::guest(name, format!("stopping: {e}"))),
        }
        // The shim removes its socket as it exits; wait for that so a new
        // shim can bind it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while paths.socket().exists()
            && client::status(&paths).is_some()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Runs `argv` inside a running container (all its namespaces, as its
    /// root user, with the container's environment) and returns the exit
    /// code and the exact stdout and stderr bytes.
    pub fn exec(
        &self,
        name: &str,
        argv: &[String],
        stdin: Vec<u8>,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), EngineError> {
        self.exec_as(name, argv, stdin, timeout, None)
    }

    /// [`Engine::exec`] as `user` (a name from the guest's /etc/passwd, or
    /// `uid[:gid]`); containers only.
    pub fn exec_as(
        &self,
        name: &str,
        argv: &[String],
        stdin: Vec<u8>,
        timeout: Duration,
        user: Option<&str>,
    ) -> Result<ExecOutput, EngineError> {
        self.exec_via(name, argv, stdin, timeout, user)
            .map(|(r, _)| r)
    }

    /// [`Engine::exec_as`], also saying which channel carried the command:
    /// `nsenter` (containers); for VMs `agent` (QEMU guest agent,
    /// `guest-exec`), `exec-port` (berth's virtio-serial shell) or `console`
    /// (serial console), tried in that order.
    pub fn exec_via(
        &self,
        name: &str,
        argv: &[String],
        stdin: Vec<u8>,
        timeout: Duration,
        user: Option<&str>,
    ) -> Result<(ExecOutput, &'static str), EngineError> {
        let rec = self.record(name)?;
        let g = self.applied(&rec)?;
        if g.vm.is_some() {
            if user.is_some() {
                return Err(EngineError::Conflict(format!(
                    "exec as another user is for containers; in VM `{name}` use e.g. `su USER -c ...` in the command"
                )));
            }
            if let Some(r) = self.exec_agent(name, argv, &stdin, timeout)? {
                return Ok((r, "agent"));
            }
            return self.exec_console(name, argv, &stdin, timeout);
        }
        let pid = self.running_leader(name, &[ShimState::Running])?;
        let cmd = self.enter(name, pid, user, &g)?;
        crate::stream_exec::run_with_stdin(name, cmd, argv, std::io::Cursor::new(stdin), timeout)
            .map(|r| (r, "nsenter"))
    }

    /// exec through the VM's QEMU guest agent; `None` when no agent answers
    /// (nothing ran: the caller tries the next channel).
    fn exec_agent(
        &self,
        name: &str,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<Option<ExecOutput>, EngineError> {
        use base64::Engine as _;
        use berth_shim::proto::AgentExecReply as R;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.running_leader(name, &[ShimState::Running, ShimState::Booting])?;
        let reply = match client::agent_exec(&self.paths(name), argv, stdin, timeout) {
            Ok(r) => r,
            // A shim from before the agent channel answers with an error
            // object, which is no reply of this type: nothing ran.
            Err(e) if e.get_ref().is_some_and(|i| i.is::<serde_json::Error>()) => {
                tracing::debug!(guest = name, error = %e, "no guest agent exec in this shim");
                return Ok(None);
            }
            Err(e) => {
                return Err(EngineError::guest(
                    name,
                    format!("exec through the guest agent: {e}"),
                ));
            }
        };
        match reply {
            R::NoAgent { reason } => {
                tracing::debug!(guest = name, reason, "no guest agent; exec falls back");
                Ok(None)
            }
            R::Failed { error } => Err(EngineError::guest(name, error)),
            R::Done {
                exit_code,
                stdout,
                stderr,
            } => {
                let dec = |s: &str, what: &str| {
                    b64.decode(s).map_err(|e| {
                        EngineError::guest(name, format!("{what} from the shim is not base64: {e}"))
                    })
                };
                Ok(Some((
                    exit_code,
                    dec(&stdout, "stdout")?,
                    dec(&stderr, "stderr")?,
                )))
            }
        }
    }

    fn backup_spec(&self, name: &str) -> Result<berth_spec::Backup, EngineError> {
        let g = self.applied(&self.record(name)?)?;
        g.backup.ok_or_else(|| {
            EngineError::Conflict(format!("guest `{name}` declares no backup; add backup = {{ command = [...], recipients = [\"age1...\"] }} to its spec"))
        })
    }

    fn backup_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("backups").join(name)
    }

    /// Runs the guest's backup command and stores its stdout encrypted with
    /// age to the spec's recipients. The plain text exists only in memory.
    pub fn backup(&self, name: &str) -> Result<berth_api::BackupInfo, EngineError> {
        use std::io::Write;
        let spec = self.backup_spec(name)?;
        let recipients: Vec<age::x25519::Recipient> = spec
            .recipients
            .iter()
            .map(|r| {
                r.parse()
                    .map_err(|e| EngineError::Conflict(format!("backup recipient `{r}`: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let (code, out, err) =
            self.exec(name, &spec.command, Vec::new(), Duration::from_secs(600))?;
        if code != 0 {
            return Err(EngineError::guest(
                name,
                format!(
                    "backup command {:?} exited with {code}: {}",
                    spec.command,
                    String::from_utf8_lossy(&err).trim()
                ),
            ));
        }
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|e| EngineError::guest(name, format!("encrypting: {e}")))?;
        let mut sealed = Vec::with_capacity(out.len() + 512);
        let mut w = encryptor
            .wrap_output(&mut sealed)
            .map_err(|e| EngineError::guest(name, format!("encrypting: {e}")))?;
        w.write_all(&out)
            .and_then(|()| w.finish().map(|_| ()))
            .map_err(|e| EngineError::guest(name, format!("encrypting: {e}")))?;
        let dir = self.backup_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::guest(name, format!("creating {}: {e}", dir.display())))?;
        let created = now() as u64;
        let file = dir.join(format!("{}-{}.age", utc_stamp(created), std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)
            .map_err(|e| EngineError::guest(name, format!("writing {}: {e}", file.display())))?;
        f.write_all(&sealed)
            .and_then(|()| f.sync_all())
            .map_err(|e| EngineError::guest(name, format!("writing {}: {e}", file.display())))?;
        Ok(berth_api::BackupInfo {
            file: file.display().to_string(),
            created,
            bytes: sealed.len() as u64,
        })
    }

    /// Stored backups of a guest, oldest first.
    pub fn backups(&self, name: &str) -> Result<Vec<berth_api::BackupInfo>, EngineError> {
        self.record(name)?;
        let mut list: Vec<berth_api::BackupInfo> = std::fs::read_dir(self.backup_dir(name))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "age"))
                    .filter_map(|e| {
                        let m = e.metadata().ok()?;
                        let created = m
                            .modified()
                            .ok()?
                            .duration_since(UNIX_EPOCH)
                            .ok()?
                            .as_secs();
                        Some(berth_api::BackupInfo {
                            file: e.path().display().to_string(),
                            created,
                            bytes: m.len(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        list.sort_by(|a, b| (a.created, &a.file).cmp(&(b.created, &b.file)));
        Ok(list)
    }

    /// Feeds a decrypted configuration to the guest's restore command.
    pub fn restore(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<(i32, Vec<u8>, Vec<u8>), EngineError> {
        let spec = self.backup_spec(name)?;
        let cmd = spec.restore_command.ok_or_else(|| {
            EngineError::Conflict(format!("guest `{name}` declares no backup.restore_command"))
        })?;
        self.exec(name, &cmd, data, Duration::from_secs(600))
    }

    /// Starts `argv` in a running container on a new pty (a session of its
    /// own, the pty as controlling terminal) for an interactive exec; returns
    /// the child and the pty master. `rows`/`cols` size the terminal.
    pub fn exec_tty(
        &self,
        name: &str,
        argv: &[String],
        user: Option<&str>,
        rows: u16,
        cols: u16,
    ) -> Result<(std::process::Child, std::fs::File), EngineError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let rec = self.record(name)?;
        let g = self.applied(&rec)?;
        if g.vm.is_some() {
            return Err(EngineError::Conflict(format!(
                "an interactive session in VM `{name}` is its console: `berth console {name}`"
            )));
        }
        let pid = self.running_leader(name, &[ShimState::Running])?;
        let ws = nix::pty::Winsize {
            ws_row: rows.max(1),
            ws_col: cols.max(1),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None)
            .map_err(|e| EngineError::guest(name, format!("pty: {e}")))?;
        let mut cmd = self.enter(name, pid, user, &g)?;
        let slave = pty.slave;
        let fd = slave.as_raw_fd();
        let io = |f: &std::os::fd::OwnedFd| f.try_clone().map(std::process::Stdio::from);
        let err = |e: std::io::Error| EngineError::guest(name, format!("pty: {e}"));
        cmd.args(argv)
            .env(
                "TERM",
                std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
            )
            // The guest's own TERM, if its spec sets one, wins.
            .envs(&g.env)
            .stdin(io(&slave).map_err(err)?)
            .stdout(io(&slave).map_err(err)?)
            .stderr(io(&slave).map_err(err)?);
        // SAFETY: between fork and exec only setsid(2) and ioctl(2) on a
        // descriptor the parent keeps open until spawn() returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| EngineError::guest(name, format!("running nsenter (util-linux): {e}")))?;
        drop(slave);
        Ok((child, std::fs::File::from(pty.master)))
    }

    /// The leader PID of guest `name` if its supervisor reports one of
    /// `states`; otherwise a conflict that says how to start it.
    pub(crate) fn running_leader(
        &self,
        name: &str,
        states: &[ShimState],
    ) -> Result<i32, EngineError> {
        let live = client::status(&self.paths(name));
        match live
            .as_ref()
            .filter(|s| states.contains(&s.state))
            .and_then(|s| s.leader_pid)
        {
            Some(pid) => Ok(pid),
            None => {
                let state = live.map(|s| s.state.as_str()).unwrap_or("stopped");
                Err(EngineError::Conflict(format!(
                    "guest `{name}` is not running ({state}); start it with `berth start {name}`"
                )))
            }
        }
    }

    /// `nsenter` into all namespaces of container `name` (leader `pid`), as
    /// `user` (default root), with the container's environment; the caller
    /// appends the command.
    pub(crate) fn enter(
        &self,
        name: &str,
        pid: i32,
        user: Option<&str>,
        g: &Guest,
    ) -> Result<std::process::Command, EngineError> {
        let mut cmd = nsenter(pid);
        if let Some(u) = user {
            let (uid, gid) = self.container_user(name, pid, u)?;
            cmd.arg(format!("--setuid={uid}"))
                .arg(format!("--setgid={gid}"));
        }
        cmd.arg("--").env("HOME", "/root").envs(&g.env);
        Ok(cmd)
    }

    /// uid and gid of `user` inside container `name` (leader `pid`):
    /// `uid[:gid]` as given, or a name looked up in the container's passwd.
    fn container_user(&self, name: &str, pid: i32, user: &str) -> Result<(u32, u32), EngineError> {
        let bad =
            |why: String| EngineError::Conflict(format!("guest `{name}`: user `{user}`: {why}"));
        if let Some((u, g)) = user.split_once(':') {
            return Ok((
                u.parse().map_err(|_| bad("not a uid".into()))?,
                g.parse().map_err(|_| bad("not a gid".into()))?,
            ));
        }
        if let Ok(uid) = user.parse::<u32>() {
            return Ok((uid, uid));
        }
        let out = nsenter(pid)
            .args(["--", "cat", "/etc/passwd"])
            .output()
            .map_err(|e| bad(format!("reading the guest's /etc/passwd: {e}")))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&user))
            .and_then(|f| Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?)))
            .ok_or_else(|| bad("not in the guest's /etc/passwd; give a numeric uid[:gid]".into()))
    }

    /// exec for guests reached only through their serial console (VMs): the
    /// command is typed into the shell at the console prompt, with its
    /// output redirected to files that are then printed base64-encoded
    /// between markers the typed line itself cannot contain (they are built
    /// by printf), so output is exact and binary-safe. Needs a POSIX shell
    /// with `base64` at the console (busybox, FreeBSD/pfSense's sh + b64 via
    /// base64 where present).
    fn exec_console(
        &self,
        name: &str,
        argv: &[String],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<(ExecOutput, &'static str), EngineError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let paths = self.paths(name);
        self.running_leader(name, &[ShimState::Running, ShimState::Booting])?;
        let id = format!(
            "{:x}{:x}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let quote = |a: &str| format!("'{}'", a.replace('\'', "'\\''"));
        let cmd: Vec<String> = argv.iter().map(|a| quote(a)).collect();
        let input = if stdin.is_empty() {
            String::new()
        } else {
            format!("printf '%s' {} | base64 -d | ", quote(&b64.encode(stdin)))
        };
        let (o, e) = (format!("/tmp/.berth-o-{id}"), format!("/tmp/.berth-e-{id}"));
        let script = format!(
            " {input}({}) {redir}>{o} 2>{e}; printf 'BERTH-%s-{id} %s\\n' RC $?; base64 {o}; printf 'BERTH-%s-{id}\\n' ERR; base64 {e}; printf 'BERTH-%s-{id}\\n' END; rm -f {o} {e}\n",
            cmd.join(" "),
            redir = if stdin.is_empty() { "</dev/null " } else { "" },
        );
        // A terminal in canonical mode takes lines of at most 4095 bytes.
        if script.len() > 4000 {
            return Err(EngineError::Conflict(format!(
                "the command (with its stdin) is too long for the serial console of `{name}` ({} bytes, at most 4000)",
                script.len()
            )));
        }
        let reply = client::console_script(&paths, &script, &format!("BERTH-END-{id}"), timeout)
            .map_err(|e| EngineError::guest(name, format!("exec over the console: {e}")))?;
        let channel = match reply.channel.as_deref() {
            Some("exec-port") => "exec-port",
            _ => "console",
        };
        let text = match (reply.output, reply.error) {
            (Some(t), _) => t,
            (None, Some(e)) => return Err(EngineError::Conflict(format!("guest `{name}`: {e}"))),
            (None, None) => String::new(),
        };
        parse_console_exec(&text, &id)
            .map(|r| (r, channel))
            .map_err(|e| EngineError::guest(name, e))
    }

    /// At daemon start: guests that should run but whose shim is gone get a
    /// new one. Guests whose shim runs are left alone (no interruption).
    pub fn readopt(&self) -> Result<Vec<String>, EngineError> {
        let mut notes = Vec::new();
        let rebooted = self.note_boot();
        if rebooted {
            notes.push("first start since the host booted: starting autostart guests".into());
        }
        for rec in self.store.guests()? {
            let paths = self.paths(&rec.name);
            match (rec.phase, rec.run, client::status(&paths)) {
                (Phase::Ready, _, Some(s)) => {
                    notes.push(format!("{}: re-adopted (shim {}, leader {:?})", rec.name, s.shim_pid, s.leader_pid))
                }
                (Phase::Ready, RunState::Running, None) if rebooted && !self.applied(&rec)?.autostart => {
                    // After a reboot only autostart guests come back.
                    self.store.set_run_state(&rec.name, RunState::Stopped)?;
                    notes.push(format!("{}: host rebooted; not started (autostart = false)", rec.name));
                }
                (Phase::Ready, RunState::Running, None) => {
                    let g = self.applied(&rec)?;
                    match self.start_shim(&g) {
                        Ok(()) => notes.push(format!("{}: supervisor was gone; restarted the guest", rec.name)),
                        Err(e) => notes.push(format!("{}: supervisor was gone and restart failed: {e}", rec.name)),
                    }
                }
                (Phase::Ready, RunState::Stopped, None) => {}
                (phase, _, _) => notes.push(format!(
                    "{}: an earlier apply stopped half-way ({}); the next `berth apply` recreates it",
                    rec.name,
                    phase.as_str()
                )),
            }
        }
        Ok(notes)
    }

    /// Records this boot's id; true if the last daemon ran in another boot
    /// (no record counts as the same boot: nothing to start on a fresh store).
    fn note_boot(&self) -> bool {
        let Ok(now) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
            return false;
        };
        let file = self.state_dir.join("boot_id");
        let before = std::fs::read_to_string(&file).ok();
        let _ = std::fs::write(&file, &now);
        before.is_some_and(|b| b.trim() != now.trim())
    }

    /// Removes every guest and every host resource berth recorded.
    pub fn destroy_all(&self) -> Result<Vec<String>, EngineError> {
        let mut removed = Vec::new();
        let mut errors = Vec::new();
        for rec in self.store.guests()? {
            match self.destroy(&rec.name, 0) {
                Ok(r) => removed.extend(r),
                Err(e) => errors.push(e.to_string()),
            }
        }
        for r in self.store.resources(None)? {
            let gone = match r.kind.as_str() {
                "nft_table" => berth_net::delete_table().map_err(|e| e.to_string()),
                "link" | "bridge" => berth_net::delete_link(&r.name).map_err(|e| e.to_string()),
                "unreachable_route" => match r.name.parse::<ipnet::IpNet>() {
                    Ok(net) => berth_net::delete_subnet_unreachable(net).map_err(|e| e.to_string()),
                    Err(_) => Ok(false),
                },
                "cgroup" => {
                    let name = r.name.trim_start_matches("berth/");
                    let cg = Cgroup::for_guest(name);
                    let existed = cg.exists();
                    cg.kill_all(Duration::from_secs(5))
                        .and_then(|()| cg.remove())
                        .map(|()| existed)
                        .map_err(|e| e.to_string())
                }
                _ => Ok(false),
            };
            match gone {
                Ok(true) => removed.push(format!("{} {}", r.kind, r.name)),
                Ok(false) => {}
                Err(e) => {
                    errors.push(format!("{} {}: {e}", r.kind, r.name));
                    continue;
                }
            }
            self.store.remove_resource(&r.kind, &r.name)?;
        }
        // Service addresses and connection pinning.
        for (key, _) in self.store.kv_prefix("vip/")? {
            if let Ok(vip) = key["vip/".len()..].parse::<std::net::IpAddr>() {
                match berth_net::delete_vip_route(vip) {
                    Ok(true) => removed.push(format!("route {vip}")),
                    Ok(false) => {}
                    Err(e) => errors.push(format!("route {vip}: {e}")),
                }
            }
            self.store.delete_kv(&key)?;
        }
        match berth_net::remove_pins() {
            Ok(0) => {}
            Ok(n) => removed.push(format!("{n} connection-pinning rule(s)")),
            Err(e) => errors.push(format!("connection-pinning rules: {e}")),
        }
        self.pins.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.vip_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for k in ["groups", "firewall/vips"] {
            self.store.delete_kv(k)?;
        }
        for (k, _) in self.store.kv_prefix(DRAIN_KEY)? {
            self.store.delete_kv(&k)?;
        }
        // Every supervisor is gone now: sweep links with berth's NIC names
        // that no record covers any more (a segment bridge re-created by a
        // supervisor that was still starting when its record was removed).
        match berth_net::list_links("b") {
            Ok(links) => {
                for l in links.into_iter().filter(|l| is_berth_nic_link(l)) {
                    match berth_net::delete_link(&l) {
                        Ok(true) => removed.push(format!("link {l}")),
                        Ok(false) => {}
                        Err(e) => errors.push(format!("link {l}: {e}")),
                    }
                }
            }
            Err(e) => errors.push(format!("listing links: {e}")),
        }
        for p in berth_container::cgroup::remove_parents_if_empty() {
            removed.push(format!("cgroup {}", p.display()));
        }
        for d in [
            berth_shim::paths::lib_dir(&self.state_dir),
            self.state_dir.join("guests"),
            self.state_dir.join("disks"),
        ] {
            if d.exists() && std::fs::remove_dir_all(&d).is_ok() {
                removed.push(format!("dir {}", d.display()));
            }
        }
        if !errors.is_empty() {
            return Err(EngineError::Host(format!(
                "destroy left some resources: {}",
                errors.join("; ")
            )));
        }
        self.store.delete_host()?;
        Ok(removed)
    }

    /// Applies the part of a plan that concerns one guest.
    pub fn guest_of<'a>(desired: &'a Desired, name: &str) -> Option<&'a Guest> {
        desired.guests.get(name)
    }
}

/// Names berth gives extra-NIC links: segment bridges `bs-<segment>`,
/// macvtaps `bm<index>n<k>`, segment ports `bp<index>n<k>`.
fn is_berth_nic_link(name: &str) -> bool {
    let numbered = |rest: &str| {
        rest.split_once('n').is_some_and(|(i, k)| {
            !i.is_empty()
                && !k.is_empty()
                && i.bytes().all(|b| b.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_digit())
        })
    };
    name.starts_with("bs-")
        || name.strip_prefix("bm").is_some_and(numbered)
        || name.strip_prefix("bp").is_some_and(numbered)
}

/// The firewall of a host: NAT for its subnets, and source filters for
/// every guest index it allows.
pub fn firewall_of(
    host: &Host,
    groups: &[&std::collections::BTreeMap<String, berth_spec::Group>],
) -> berth_net::Firewall {
    berth_net::Firewall {
        uplink: host.uplink.clone(),
        subnet4: host.subnet4,
        subnet6: host.subnet6,
        guests: (1..host.max_guests)
            .map(|i| berth_net::GuestLink {
                name: format!("vb{i}"),
                guest4: host.addr4(i),
                host4: host.subnet4.network(),
                guest6: host.addr6(i),
                host6: host.subnet6.map(|n| n.network()),
            })
            .collect(),
        vips: vip_pairs(groups),
    }
}

/// `(link, VIP)` for every index a member of each group may have, sorted
/// and without repeats: members answer from their group's service address.
pub fn vip_pairs(
    groups: &[&std::collections::BTreeMap<String, berth_spec::Group>],
) -> Vec<(String, std::net::IpAddr)> {
    let mut out: Vec<(String, std::net::IpAddr)> = groups
        .iter()
        .flat_map(|m| m.values())
        .flat_map(|g| {
            let vips: Vec<std::net::IpAddr> = g
                .vip4
                .map(std::net::IpAddr::V4)
                .into_iter()
                .chain(g.vip6.map(std::net::IpAddr::V6))
                .collect();
            (0..g.replicas).flat_map(move |i| {
                let link = format!("vb{}", g.index_base + i);
                vips.clone().into_iter().map(move |v| (link.clone(), v))
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn link_of(g: &Guest) -> berth_net::GuestLink {
    berth_net::GuestLink {
        name: g.link.clone(),
        guest4: g.addr4,
        host4: g.host4,
        guest6: g.addr6,
        host6: g.host6,
    }
}

/// `nsenter --target=PID --all` with a clean environment and a standard PATH.
fn nsenter(pid: i32) -> std::process::Command {
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--target={pid}"))
        .arg("--all")
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    cmd
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time (UTC), for backup file names.
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads what [`Engine::exec_console`]'s script printed: the exit code after
/// `BERTH-RC-<id>`, then base64 stdout up to `BERTH-ERR-<id>`, then base64
/// stderr up to `BERTH-END-<id>`.
pub fn parse_console_exec(text: &str, id: &str) -> Result<(i32, Vec<u8>, Vec<u8>), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (rc_tag, err_tag, end_tag) = (
        format!("BERTH-RC-{id} "),
        format!("BERTH-ERR-{id}"),
        format!("BERTH-END-{id}"),
    );
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let rc = lines
        .by_ref()
        .find_map(|l| {
            l.find(&rc_tag)
                .map(|i| l[i + rc_tag.len()..].trim().to_string())
        })
        .ok_or("the console gave no exit code")?;
    let code: i32 = rc.parse().map_err(|_| format!("bad exit code {rc:?}"))?;
    let mut out = String::new();
    for l in lines.by_ref() {
        if l.contains(&err_tag) {
            break;
        }
        out.push_str(l.trim());
    }
    let mut err = String::new();
    for l in lines.by_ref() {
        if l.contains(&end_tag) {
            break;
        }
        err.push_str(l.trim());
    }
    let out = b64
        .decode(out)
        .map_err(|e| format!("stdout did not come back intact: {e}"))?;
    let err = b64
        .decode(err)
        .map_err(|e| format!("stderr did not come back intact: {e}"))?;
    Ok((code, out, err))
}

/// Host facts for spec validation, read in the daemon's own network namespace.
pub struct LocalProbe;

impl berth_spec::HostProbe for LocalProbe {
    fn is_dir(&self, p: &Path) -> bool {
        p.is_dir()
    }
    fn exists(&self, p: &Path) -> bool {
        p.exists() || p.symlink_metadata().is_ok()
    }
    fn interface_exists(&self, name: &str) -> Option<bool> {
        Some(berth_net::interface_exists(name))
    }
    fn host_cpus(&self) -> Option<Vec<usize>> {
        Some(berth_vm::host_cpus())
    }
    fn kvm(&self) -> Option<Result<(), String>> {
        // BERTH_ACCEL overrides the spec's accel, so KVM need not work.
        if std::env::var_os("BERTH_ACCEL").is_some() {
            return None;
        }
        Some(berth_vm::kvm_usable())
    }
    fn vfio_problem(&self, pci: &str, bind: bool) -> Option<String> {
        berth_vm::vfio::vfio_problem(Path::new("/sys"), pci, bind)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn console_exec_output_is_parsed_exactly() {
        // As a terminal shows it: the echoed command line, CRLF endings.
        let text = " ('x') </dev/null >/tmp/o 2>/tmp/e; printf 'BERTH-%s-7 %s\\n' RC $?; ...\r\nBERTH-RC-7 3\r\naGVs\r\nbG8K\r\nBERTH-ERR-7\r\nZXJy\r\nBERTH-END-7\r\n# ";
        let (code, out, err) = super::parse_console_exec(text, "7").expect("parse");
        assert_eq!(
            (code, out.as_slice(), err.as_slice()),
            (3, b"hello\n".as_slice(), b"err".as_slice())
        );
        assert!(super::parse_console_exec("nothing", "7").is_err());
    }

    #[test]
    fn berth_nic_link_names() {
        for n in ["bs-sync", "bm10n1", "bp7n2"] {
            assert!(super::is_berth_nic_link(n), "{n}");
        }
        for n in ["bond0", "bpf0", "bmx1n2", "bm1n", "br0", "vb3", "bs"] {
            assert!(!super::is_berth_nic_link(n), "{n}");
        }
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_795_758_755), "20261127T055235Z");
        assert_eq!(super::utc_stamp(951_782_400), "20000229T000000Z");
    }
}
