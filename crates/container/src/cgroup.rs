//! Per-guest cgroups: limits and a reliable "kill everything of this guest".
//!
//! cgroup v2 first (real NixOS hosts are pure v2): `<v2 root>/berth/<guest>`
//! with `memory.max` / `cpu.max`. On hybrid hosts (v1 controllers plus an empty
//! cgroup2 at `/sys/fs/cgroup/unified`, like the build machine) the v2 group
//! still exists — nspawn keeps its `supervisor`/`payload` children there and
//! `cgroup.kill` works — and limits go to the v1 `memory` and `cpu`
//! hierarchies, with a warning. Where neither has a controller (or the v1
//! group cannot be made: read-only v1 mounts inside a container), the limit
//! is skipped with a warning, never a crash.
//!
//! Where `berth/` lives ([`guest_parent`]): at the root without systemd;
//! under systemd in a scope of the guest's own, `machine.slice/berth-<guest>.scope`
//! (`Delegate=yes`), in every hierarchy: the supervisor asks for it with
//! `systemd-run --scope` ([`scope_argv`]) and moves itself into its
//! `supervisor` leaf ([`enter_guest_scope`]), so the guest's group is
//! `machine.slice/berth-<guest>.scope/berth/<guest>`. Guests are thus never
//! in berth.service's cgroup: a restart of the daemon's unit cannot touch
//! them, and systemd never has to start a daemon into a cgroup whose
//! controllers berth enabled (which fails with EBUSY, 219/CGROUP, on the
//! systemd versions without `DelegateSubgroup=`). `BERTH_CGROUP_PARENT` (a
//! path in the v2 tree) puts every guest under one parent instead.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("cgroup {0}: processes still running after kill")]
    StillPopulated(PathBuf),
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const CPU_PERIOD_US: u64 = 100_000;

/// Where the hierarchies are mounted on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup2 mount, if any (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`).
    pub v2: Option<PathBuf>,
    /// Controllers the v2 root offers to its children.
    pub v2_controllers: Vec<String>,
    /// v1 `memory` and `cpu` mounts, if any.
    pub v1_memory: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
    /// Where `berth/` is in the v2 tree, relative to its root: empty (the
    /// root) or, under systemd, the guest's scope ([`guest_parent`]).
    pub v2_parent: PathBuf,
    /// The same for the v1 `memory` and `cpu` hierarchies (systemd puts a
    /// scope at the same path in each hierarchy on hybrid hosts).
    pub v1_memory_parent: PathBuf,
    pub v1_cpu_parent: PathBuf,
}

impl Layout {
    /// Reads the layout of this host under `/sys/fs/cgroup` (parents: the root).
    pub fn detect() -> Layout {
        let base = Path::new("/sys/fs/cgroup");
        let v2 = [base.to_path_buf(), base.join("unified")]
            .into_iter()
            .find(|p| is_cgroup2(p));
        let v2_controllers = v2
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p.join("cgroup.controllers")).ok())
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let v1 = |c: &str| {
            let p = base.join(c);
            (v2.as_deref() != Some(base) && p.join("cgroup.procs").exists()).then_some(p)
        };
        Layout {
            v1_memory: v1("memory"),
            v1_cpu: v1("cpu"),
            v2,
            v2_controllers,
            v2_parent: PathBuf::new(),
            v1_memory_parent: PathBuf::new(),
            v1_cpu_parent: PathBuf::new(),
        }
    }

    /// This host's layout with the parents of guest `name`'s groups
    /// ([`guest_parent`]).
    pub fn for_guest(name: &str) -> Layout {
        let parent = host_guest_parent(name);
        Layout {
            v2_parent: parent.clone(),
            v1_memory_parent: parent.clone(),
            v1_cpu_parent: parent,
            ..Layout::detect()
        }
    }

    /// `<v2 root>/<v2_parent>/berth`, the parent of every guest's group.
    pub fn v2_berth(&self) -> Option<PathBuf> {
        self.v2
            .as_ref()
            .map(|r| r.join(&self.v2_parent).join("berth"))
    }

    fn v2_has(&self, controller: &str) -> bool {
        self.v2_controllers.iter().any(|c| c == controller)
    }
}

/// The slice guests' scopes go in on systemd hosts (as libvirt's and
/// nspawn's machines do).
pub const GUEST_SLICE: &str = "machine.slice";

/// The systemd scope guest `guest` lives in on systemd hosts.
pub fn guest_scope(guest: &str) -> String {
    format!("berth-{guest}.scope")
}

/// Where guest `guest`'s `berth/` goes, relative to each hierarchy's root:
/// `explicit` (`BERTH_CGROUP_PARENT`) if given; under systemd (`systemd`:
/// PID 1 is systemd and D-Bus runs) the guest's scope, `machine.slice/berth-<guest>.scope`;
/// otherwise the root.
pub fn guest_parent(explicit: Option<&str>, systemd: bool, guest: &str) -> PathBuf {
    if let Some(p) = explicit.map(str::trim).filter(|p| !p.is_empty()) {
        return PathBuf::from(p.trim_start_matches('/'));
    }
    if systemd {
        Path::new(GUEST_SLICE).join(guest_scope(guest))
    } else {
        PathBuf::new()
    }
}

/// [`guest_parent`] on this host: `BERTH_CGROUP_PARENT` from the
/// environment, systemd as detected.
fn host_guest_parent(guest: &str) -> PathBuf {
    guest_parent(
        std::env::var("BERTH_CGROUP_PARENT").ok().as_deref(),
        crate::nspawn::systemd_available(),
        guest,
    )
}

/// The cgroup2 path of guest `guest`'s scope, if this host puts guests in
/// scopes ([`guest_parent`]) and has cgroup2.
pub fn scope_dir(guest: &str) -> Option<PathBuf> {
    let parent = host_guest_parent(guest);
    if parent != Path::new(GUEST_SLICE).join(guest_scope(guest)) {
        return None;
    }
    Layout::detect().v2.map(|r| r.join(parent))
}

/// Whether a supervisor for `guest` must ask systemd for a new scope
/// (`Some(scope_argv)`) or join the existing one itself (`None`, also when
/// scopes are not used). A scope whose processes have all exited is on its
/// way out: systemd removes it within moments, so wait for that (up to
/// `wait`) rather than join a cgroup no unit will own.
pub fn scope_to_create(guest: &str, wait: std::time::Duration) -> Option<Vec<String>> {
    let dir = scope_dir(guest)?;
    let deadline = Instant::now() + wait;
    while dir.is_dir() && !populated(&dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    (!dir.is_dir()).then(|| scope_argv(guest))
}

/// `populated 1` in the group's `cgroup.events`: a process is in it or
/// below it.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// The `systemd-run` arguments that run `command` in a new scope for
/// `guest` (systemd-run execs it in place: same PID, same file descriptors).
pub fn scope_argv(guest: &str) -> Vec<String> {
    vec![
        "systemd-run".into(),
        "--quiet".into(),
        "--scope".into(),
        "--collect".into(),
        format!("--unit={}", guest_scope(guest)),
        format!("--slice={GUEST_SLICE}"),
        "--property=Delegate=yes".into(),
        format!("--description=berth guest {guest}"),
        "--".into(),
    ]
}

/// Under systemd, moves the calling supervisor into `<scope>/supervisor`:
/// out of the scope's own cgroup (so it can hand controllers to `berth/`)
/// when systemd-run put it there, or into the scope when it was started
/// while the scope already existed (its guest outlived an earlier
/// supervisor). Returns the leaf joined; `None` without systemd or scope.
pub fn enter_guest_scope(guest: &str) -> Result<Option<PathBuf>, CgroupError> {
    let Some(scope) = scope_dir(guest).filter(|d| d.is_dir()) else {
        return Ok(None);
    };
    let leaf = scope.join("supervisor");
    std::fs::create_dir_all(&leaf).map_err(io(&leaf, "create"))?;
    let procs = leaf.join("cgroup.procs");
    write_file(&procs, &std::process::id().to_string()).map_err(io(&procs, "join"))?;
    Ok(Some(leaf))
}

fn is_cgroup2(p: &Path) -> bool {
    nix::sys::statfs::statfs(p)
        .map(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The cgroups of one guest.
#[derive(Debug, Clone)]
pub struct Cgroup {
    pub layout: Layout,
    /// `<v2>/berth/<guest>`
    pub v2: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
    pub v1_cpu: Option<PathBuf>,
}

impl Cgroup {
    /// Paths for guest `name` on this host (no IO beyond layout detection).
    pub fn for_guest(name: &str) -> Cgroup {
        Cgroup::with_layout(Layout::for_guest(name), name)
    }

    pub fn with_layout(layout: Layout, name: &str) -> Cgroup {
        let at = |root: &Option<PathBuf>, parent: &Path| {
            root.as_ref()
                .map(|r| r.join(parent).join("berth").join(name))
        };
        Cgroup {
            v2: layout.v2_berth().map(|b| b.join(name)),
            v1_memory: at(&layout.v1_memory, &layout.v1_memory_parent),
            v1_cpu: at(&layout.v1_cpu, &layout.v1_cpu_parent),
            layout,
        }
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.v2
            .iter()
            .chain(self.v1_memory.iter())
            .chain(self.v1_cpu.iter())
    }

    /// Creates the groups (idempotent) and enables the v2 controllers berth
    /// uses for children of `berth/`.
    pub fn create(&self) -> Result<(), CgroupError> {
        if let (Some(root), Some(parent), Some(_)) =
            (&self.layout.v2, self.layout.v2_berth(), &self.v2)
        {
            std::fs::create_dir_all(&parent).map_err(io(&parent, "create"))?;
            let wanted: Vec<&str> = ["memory", "cpu", "pids"]
                .into_iter()
                .filter(|c| self.layout.v2_has(c))
                .collect();
            // The root, each group down to the parent (under systemd: the
            // slice, which systemd manages, and the guest's delegated scope), and
            // `berth/` itself.
            let mut chain = vec![root.clone()];
            let mut at = root.clone();
            for c in self.layout.v2_parent.components() {
                at = at.join(c);
                chain.push(at.clone());
            }
            chain.push(parent.clone());
            for c in &wanted {
                // Best effort: a group must get a controller from its parent
                // before it can hand it on (systemd enables them down to a
                // delegated scope). What did not get enabled shows up as a
                // missing `memory.max`/`cpu.max`; set_limits falls back or warns.
                for g in &chain {
                    let _ = write_file(&g.join("cgroup.subtree_control"), &format!("+{c}"));
                }
            }
        }
        if let Some(d) = &self.v2 {
            std::fs::create_dir_all(d).map_err(io(d, "create"))?;
        }
        // v1 groups only carry limits cgroup v2 cannot: where they cannot
        // be made (read-only v1 mounts in a container, an undelegated
        // hierarchy) the limit is not enforced, with a warning from
        // set_limits, and the guest still starts.
        for d in self.v1_memory.iter().chain(self.v1_cpu.iter()) {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::debug!(group = %d.display(), "cgroup v1 group not created: {e}");
            }
        }
        Ok(())
    }

    /// Applies memory (bytes) and CPU (in CPUs) limits. Returns warnings for
    /// limits this host cannot enforce.
    pub fn set_limits(
        &self,
        memory: Option<u64>,
        cpus: Option<f64>,
    ) -> Result<Vec<String>, CgroupError> {
        let mut warnings = Vec::new();
        if let Some(bytes) = memory {
            match (&self.v2, &self.v1_memory) {
                (Some(d), _) if d.join("memory.max").exists() => {
                    let p = d.join("memory.max");
                    write_file(&p, &bytes.to_string()).map_err(io(&p, "set memory.max"))?;
                    let p = d.join("memory.swap.max");
                    let _ = write_file(&p, "0");
                }
                (_, Some(d)) if d.is_dir() => {
                    let p = d.join("memory.limit_in_bytes");
                    write_file(&p, &bytes.to_string())
                        .map_err(io(&p, "set memory.limit_in_bytes"))?;
                    warnings.push("cgroup v2 has no memory controller here; memory limit set through cgroup v1".into());
                }
                _ => warnings.push(
                    "no usable memory cgroup controller here (none in cgroup v2, no writable v1 group); memory limit not enforced".into(),
                ),
            }
        }
        if let Some(cpus) = cpus {
            let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
            match (&self.v2, &self.v1_cpu) {
                (Some(d), _) if d.join("cpu.max").exists() => {
                    let p = d.join("cpu.max");
                    write_file(&p, &format!("{quota} {CPU_PERIOD_US}"))
                        .map_err(io(&p, "set cpu.max"))?;
                }
                (_, Some(d)) if d.is_dir() => {
                    let p = d.join("cpu.cfs_period_us");
                    write_file(&p, &CPU_PERIOD_US.to_string())
                        .map_err(io(&p, "set cpu.cfs_period_us"))?;
                    let p = d.join("cpu.cfs_quota_us");
                    write_file(&p, &quota.to_string()).map_err(io(&p, "set cpu.cfs_quota_us"))?;
                    warnings.push(
                        "cgroup v2 has no cpu controller here; CPU limit set through cgroup v1"
                            .into(),
                    );
                }
                _ => warnings
                    .push("no usable cpu cgroup controller here (none in cgroup v2, no writable v1 group); CPU limit not enforced".into()),
            }
        }
        Ok(warnings)
    }

    /// The memory limit in force, read back from the kernel.
    pub fn memory_limit(&self) -> Option<u64> {
        let v2 = self
            .v2
            .as_ref()
            .filter(|_| self.layout.v2_has("memory"))
            .map(|d| d.join("memory.max"));
        let v1 = self
            .v1_memory
            .as_ref()
            .map(|d| d.join("memory.limit_in_bytes"));
        v2.into_iter()
            .chain(v1)
            .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse().ok())
    }

    /// The guest's v2 group has this interface file (its controller is on).
    fn v2_file(&self, name: &str) -> bool {
        self.v2.as_ref().is_some_and(|d| d.join(name).exists())
    }

    /// Opens the `cgroup.procs` files a guest must join, so a child can join
    /// them between fork and exec with nothing but `write(2)` (see
    /// [`join_from_pre_exec`]): always the v2 group (kill, accounting), the
    /// v1 `memory`/`cpu` groups only when that limit is set. Moving a process
    /// into a cgroup costs a few milliseconds each (an RCU grace period), so
    /// joining hierarchies for nothing would slow every start.
    pub fn procs_files(&self, memory: bool, cpu: bool) -> Result<Vec<File>, CgroupError> {
        let v1_memory = self
            .v1_memory
            .as_ref()
            .filter(|d| memory && !self.v2_file("memory.max") && d.is_dir());
        let v1_cpu = self
            .v1_cpu
            .as_ref()
            .filter(|d| cpu && !self.v2_file("cpu.max") && d.is_dir());
        self.v2
            .iter()
            .chain(v1_memory)
            .chain(v1_cpu)
            .map(|d| {
                let p = d.join("cgroup.procs");
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(io(&p, "open"))
            })
            .collect()
    }

    /// Every process in the guest's groups, including v2 child groups.
    pub fn pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        for d in self.dirs() {
            collect_pids(d, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills every process of the guest and waits until none is left.
    pub fn kill_all(&self, wait: Duration) -> Result<(), CgroupError> {
        if let Some(d) = self.v2.as_ref().filter(|d| d.exists()) {
            // cgroup.kill (Linux 5.14) kills the whole subtree atomically,
            // including processes forked while we look.
            let _ = write_file(&d.join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + wait;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if Instant::now() > deadline {
                let d = self.dirs().next().cloned().unwrap_or_default();
                return Err(CgroupError::StillPopulated(d));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes the groups (children first). Missing groups are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for d in self.dirs() {
            remove_tree(d)?;
        }
        Ok(())
    }

    /// True if any of the guest's group directories exists.
    pub fn exists(&self) -> bool {
        self.dirs().any(|d| d.exists())
    }
}

/// Removes the shared `berth/` parent groups (at the root, or under
/// `BERTH_CGROUP_PARENT`) if no guest group is left in them. Returns the
/// paths removed. Under systemd each guest's scope has its own `berth/`,
/// which systemd removes with the scope.
pub fn remove_parents_if_empty() -> Vec<PathBuf> {
    // The parent every guest shares: BERTH_CGROUP_PARENT, else the root.
    let parent = guest_parent(
        std::env::var("BERTH_CGROUP_PARENT").ok().as_deref(),
        false,
        "",
    );
    let l = Layout::detect();
    let mut removed = Vec::new();
    let shared = [&l.v2, &l.v1_memory, &l.v1_cpu]
        .into_iter()
        .flatten()
        .map(|r| r.join(&parent).join("berth"));
    for p in shared {
        // rmdir fails (ENOTEMPTY/EBUSY) while a child group exists: fine.
        if p.is_dir() && std::fs::remove_dir(&p).is_ok() {
            removed.push(p);
        }
    }
    removed
}

/// Joins the calling process to every group in `fds` by writing "0" to each.
/// Only async-signal-safe calls: meant for `CommandExt::pre_exec`.
pub fn join_from_pre_exec(fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    for &fd in fds {
        // SAFETY: `fd` is an open descriptor owned by the parent for the whole
        // fork/exec window; write(2) with a valid 1-byte buffer is
        // async-signal-safe.
        let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn write_file(p: &Path, s: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(p)?;
    f.write_all(s.as_bytes())
}

fn collect_pids(d: &Path, out: &mut Vec<i32>) {
    if let Ok(s) = std::fs::read_to_string(d.join("cgroup.procs")) {
        out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_pids(&e.path(), out);
            }
        }
    }
}

fn remove_tree(d: &Path) -> Result<(), CgroupError> {
    let rd = match std::fs::read_dir(d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(CgroupError::Io {
                path: d.to_path_buf(),
                op: "list",
                source: e,
            });
        }
    };
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_tree(&e.path())?;
        }
    }
    match std::fs::remove_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CgroupError::Io {
            path: d.to_path_buf(),
            op: "remove",
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_on_pure_v2_host() {
        let l = Layout {
            v2: Some("/sys/fs/cgroup".into()),
            v2_controllers: vec!["memory".into(), "cpu".into()],
            v1_memory: None,
            v1_cpu: None,
            v2_parent: PathBuf::new(),
            v1_memory_parent: PathBuf::new(),
            v1_cpu_parent: PathBuf::new(),
        };
        let c = Cgroup::with_layout(l, "db1");
        assert_eq!(c.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/berth/db1")));
        assert!(c.v1_memory.is_none());
    }

    #[test]
    fn paths_on_hybrid_host() {
        let l = Layout {
            v2: Some("/sys/fs/cgroup/unified".into()),
            v2_controllers: vec![],
            v1_memory: Some("/sys/fs/cgroup/memory".into()),
            v1_cpu: Some("/sys/fs/cgroup/cpu".into()),
            v2_parent: PathBuf::new(),
            v1_memory_parent: PathBuf::new(),
            v1_cpu_parent: PathBuf::new(),
        };
        let c = Cgroup::with_layout(l, "db1");
        assert_eq!(
            c.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/berth/db1"))
        );
        assert_eq!(
            c.v1_memory.as_deref(),
            Some(Path::new("/sys/fs/cgroup/memory/berth/db1"))
        );
        assert_eq!(c.dirs().count(), 3);
    }

    #[test]
    fn no_cgroups_means_warnings_not_errors() {
        let l = Layout {
            v2: None,
            v2_controllers: vec![],
            v1_memory: None,
            v1_cpu: None,
            v2_parent: PathBuf::new(),
            v1_memory_parent: PathBuf::new(),
            v1_cpu_parent: PathBuf::new(),
        };
        let c = Cgroup::with_layout(l, "x");
        let w = c.set_limits(Some(1 << 27), Some(1.0)).expect("limits");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(c.pids().is_empty());
        c.remove().expect("remove nothing");
    }

    #[test]
    fn under_systemd_each_guest_lives_in_its_own_scope() {
        let parent = guest_parent(None, true, "db1");
        assert_eq!(parent, PathBuf::from("machine.slice/berth-db1.scope"));
        let l = Layout {
            v2: Some("/sys/fs/cgroup".into()),
            v2_controllers: vec!["memory".into()],
            v1_memory: None,
            v1_cpu: None,
            v2_parent: parent.clone(),
            v1_memory_parent: parent.clone(),
            v1_cpu_parent: parent,
        };
        let c = Cgroup::with_layout(l, "db1");
        assert_eq!(
            c.v2.as_deref(),
            Some(Path::new(
                "/sys/fs/cgroup/machine.slice/berth-db1.scope/berth/db1"
            ))
        );
    }

    #[test]
    fn guest_parent_rules() {
        // Without systemd: the root, as before.
        assert_eq!(guest_parent(None, false, "a"), PathBuf::new());
        // BERTH_CGROUP_PARENT wins, with or without systemd; blank is unset.
        assert_eq!(
            guest_parent(Some("/machine.slice/berth"), true, "a"),
            PathBuf::from("machine.slice/berth")
        );
        assert_eq!(guest_parent(Some("  "), false, "a"), PathBuf::new());
        assert_eq!(
            guest_parent(Some("  "), true, "web-1"),
            PathBuf::from("machine.slice/berth-web-1.scope")
        );
    }

    #[test]
    fn scope_is_asked_of_systemd_run_with_delegation() {
        let v = scope_argv("web-1");
        assert_eq!(v[0], "systemd-run");
        for want in [
            "--scope",
            "--unit=berth-web-1.scope",
            "--slice=machine.slice",
            "--property=Delegate=yes",
        ] {
            assert!(v.iter().any(|a| a == want), "{want} missing: {v:?}");
        }
        assert_eq!(v.last().map(String::as_str), Some("--"));
    }

    #[test]
    fn hybrid_host_under_systemd_uses_the_scopes_v1_groups() {
        let parent = guest_parent(None, true, "db1");
        let l = Layout {
            v2: Some("/sys/fs/cgroup/unified".into()),
            v2_controllers: vec![],
            v1_memory: Some("/sys/fs/cgroup/memory".into()),
            v1_cpu: Some("/sys/fs/cgroup/cpu".into()),
            v2_parent: parent.clone(),
            v1_memory_parent: parent.clone(),
            v1_cpu_parent: parent,
        };
        let c = Cgroup::with_layout(l, "db1");
        assert_eq!(
            c.v1_memory.as_deref(),
            Some(Path::new(
                "/sys/fs/cgroup/memory/machine.slice/berth-db1.scope/berth/db1"
            ))
        );
    }

    #[test]
    fn unwritable_v1_groups_mean_a_warning_not_a_failed_start() {
        let dir = std::env::temp_dir().join(format!("berth-cg-{}", std::process::id()));
        let l = Layout {
            v2: None,
            v2_controllers: vec![],
            // Groups under a path that does not exist cannot be made.
            v1_memory: Some(dir.join("missing/memory")),
            v1_cpu: Some(dir.join("missing/cpu")),
            v2_parent: PathBuf::new(),
            v1_memory_parent: PathBuf::new(),
            v1_cpu_parent: PathBuf::new(),
        };
        let c = Cgroup::with_layout(l, "x");
        let w = c.set_limits(Some(1 << 27), Some(0.5)).expect("limits");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("not enforced"), "{w:?}");
        assert!(c.procs_files(true, true).expect("files").is_empty());
    }
}
