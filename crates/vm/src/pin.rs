//! CPU pinning of QEMU's threads and reading thread affinities back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::{Result, VmError};

/// What a pinned thread does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinRole {
    /// Runs these vCPU indices (more than one only with single-threaded TCG).
    Vcpu(Vec<u32>),
    /// Any other QEMU thread (main loop, I/O, RCU, workers).
    Emulator,
}

/// One thread pinned by [`pin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub tid: i32,
    pub role: PinRole,
    pub cpus: Vec<usize>,
}

/// Parses a kernel CPU list such as `0-3,6` (also `""` -> empty).
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>> {
    let bad = || VmError::Parse {
        what: "CPU list".into(),
        text: text.to_string(),
    };
    let mut out = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(part.parse().map_err(|_| bad())?);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Formats CPUs the kernel's way (`[0,1,2,3,6]` -> `0-3,6`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let set: BTreeSet<usize> = cpus.iter().copied().collect();
    let mut parts = Vec::new();
    let mut it = set.into_iter().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// The CPUs thread (or process) `tid` may run on, from the
/// `Cpus_allowed_list` line of `/proc/<tid>/status`.
pub fn thread_affinity(tid: i32) -> Result<Vec<usize>> {
    let path = PathBuf::from(format!("/proc/{tid}/status"));
    let text = std::fs::read_to_string(&path).map_err(|source| VmError::ReadFile {
        path: path.clone(),
        source,
    })?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| VmError::Parse {
            what: format!("{} (no Cpus_allowed_list)", path.display()),
            text: String::new(),
        })?;
    parse_cpu_list(line)
}

/// The host's online CPUs (/sys/devices/system/cpu/online; if unreadable,
/// this process's own affinity).
pub fn host_cpus() -> Vec<usize> {
    if let Ok(text) = std::fs::read_to_string("/sys/devices/system/cpu/online")
        && let Ok(cpus) = parse_cpu_list(&text)
        && !cpus.is_empty()
    {
        return cpus;
    }
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => vec![0],
    }
}

fn set_affinity(tid: i32, cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).map_err(|source| VmError::Pin {
            tid,
            cpus: cpus.to_vec(),
            source,
        })?;
    }
    sched_setaffinity(Pid::from_raw(tid), &set).map_err(|source| VmError::Pin {
        tid,
        cpus: cpus.to_vec(),
        source,
    })
}

/// The threads of process `pid` (/proc/PID/task).
fn task_ids(pid: i32) -> Result<Vec<i32>> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|source| VmError::ReadFile {
        path: dir.clone(),
        source,
    })?;
    let mut tids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    Ok(tids)
}

/// Decides the pinning: vCPU `i` (in `vcpus` order) goes to
/// `cpus[i % cpus.len()]`; every other thread to `emulator`, or if that is
/// empty to the online CPUs not in `cpus` (all online CPUs if none are left).
pub(crate) fn plan_pinning(
    tids: &[i32],
    vcpus: &[(u32, i32)],
    cpus: &[usize],
    emulator: &[usize],
    online: &[usize],
) -> Result<Vec<Pinned>> {
    if cpus.is_empty() {
        return Err(VmError::NoCpus { what: "vCPUs" });
    }
    for &c in cpus.iter().chain(emulator) {
        if !online.contains(&c) {
            return Err(VmError::CpuNotOnline {
                cpu: c,
                online: format_cpu_list(online),
            });
        }
    }
    // A thread can run several vCPUs (single-threaded TCG): give it the
    // union of their CPUs.
    let mut by_tid: BTreeMap<i32, (Vec<u32>, BTreeSet<usize>)> = BTreeMap::new();
    for (i, &(idx, tid)) in vcpus.iter().enumerate() {
        let e = by_tid.entry(tid).or_default();
        e.0.push(idx);
        e.1.insert(cpus[i % cpus.len()]);
    }
    let emu: Vec<usize> = if emulator.is_empty() {
        let rest: Vec<usize> = online
            .iter()
            .copied()
            .filter(|c| !cpus.contains(c))
            .collect();
        if rest.is_empty() {
            online.to_vec()
        } else {
            rest
        }
    } else {
        let set: BTreeSet<usize> = emulator.iter().copied().collect();
        set.into_iter().collect()
    };
    let mut out: Vec<Pinned> = by_tid
        .into_iter()
        .map(|(tid, (idx, set))| Pinned {
            tid,
            role: PinRole::Vcpu(idx),
            cpus: set.into_iter().collect(),
        })
        .collect();
    for &tid in tids {
        if !out.iter().any(|p| p.tid == tid) {
            out.push(Pinned {
                tid,
                role: PinRole::Emulator,
                cpus: emu.clone(),
            });
        }
    }
    Ok(out)
}

/// Pins QEMU process `qemu_pid`: each vCPU thread from
/// [`crate::Qmp::vcpu_threads`] to `cpus[i % cpus.len()]`, every other
/// thread to `emulator` (if empty: the online CPUs not in `cpus`, or all of
/// them if that leaves none). Threads QEMU starts later inherit the
/// affinity of the thread that creates them, i.e. the emulator set. See
/// [`pin_threads`] for the same with a report of what was done.
pub fn pin(qemu_pid: i32, vcpus: &[(u32, i32)], cpus: &[usize], emulator: &[usize]) -> Result<()> {
    pin_threads(qemu_pid, vcpus, cpus, emulator).map(drop)
}

/// [`pin`], returning every thread pinned, its role and its CPUs.
pub fn pin_threads(
    qemu_pid: i32,
    vcpus: &[(u32, i32)],
    cpus: &[usize],
    emulator: &[usize],
) -> Result<Vec<Pinned>> {
    let tids = task_ids(qemu_pid)?;
    let plan = plan_pinning(&tids, vcpus, cpus, emulator, &host_cpus())?;
    let mut done = Vec::with_capacity(plan.len());
    for p in plan {
        match set_affinity(p.tid, &p.cpus) {
            Ok(()) => done.push(p),
            // A short-lived worker thread may exit between listing and
            // pinning; a vCPU thread never does while QEMU runs.
            Err(VmError::Pin {
                source: nix::Error::ESRCH,
                ..
            }) if p.role == PinRole::Emulator => {}
            Err(e) => return Err(e),
        }
    }
    tracing::info!(
        pid = qemu_pid,
        vcpus = %format_cpu_list(cpus),
        threads = done.len(),
        "pinned QEMU threads"
    );
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6").expect("ok"), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("0\n").expect("ok"), vec![0]);
        assert_eq!(parse_cpu_list("\t0-1,1,3-3 ").expect("ok"), vec![0, 1, 3]);
        assert_eq!(parse_cpu_list("").expect("ok"), Vec::<usize>::new());
        for bad in ["a", "3-1", "0-", "-2", "1,,x"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpu_list(&[6, 0, 1, 2, 3]), "0-3,6");
        assert_eq!(format_cpu_list(&[1, 3, 5]), "1,3,5");
        assert_eq!(format_cpu_list(&[]), "");
        let roundtrip = [0, 2, 3, 4, 9, 10];
        assert_eq!(
            parse_cpu_list(&format_cpu_list(&roundtrip)).expect("ok"),
            roundtrip
        );
    }

    #[test]
    fn plan_spreads_vcpus_and_puts_the_rest_elsewhere() {
        let online = [0, 1, 2, 3];
        let tids = [10, 11, 12, 13, 14];
        let vcpus = [(0, 12), (1, 13), (2, 14)];
        let p = plan_pinning(&tids, &vcpus, &[2, 3], &[], &online).expect("plan");
        let get = |tid| p.iter().find(|x| x.tid == tid).expect("tid").clone();
        assert_eq!(get(12).cpus, [2]);
        assert_eq!(get(13).cpus, [3]);
        assert_eq!(get(14).cpus, [2]);
        assert_eq!(get(14).role, PinRole::Vcpu(vec![2]));
        assert_eq!(get(10).cpus, [0, 1]);
        assert_eq!(get(11).role, PinRole::Emulator);
        assert_eq!(p.len(), 5);

        // Explicit emulator set.
        let p = plan_pinning(&tids, &vcpus, &[2, 3], &[1], &online).expect("plan");
        assert_eq!(p.iter().find(|x| x.tid == 10).expect("tid").cpus, [1]);

        // vCPUs on every CPU: emulator threads may use all of them.
        let p = plan_pinning(&tids, &vcpus, &[0, 1, 2, 3], &[], &online).expect("plan");
        assert_eq!(p.iter().find(|x| x.tid == 10).expect("tid").cpus, online);
    }

    #[test]
    fn plan_single_thread_tcg_gets_union() {
        let p = plan_pinning(&[5], &[(0, 5), (1, 5)], &[0, 1], &[], &[0, 1, 2]).expect("plan");
        assert_eq!(
            p,
            [Pinned {
                tid: 5,
                role: PinRole::Vcpu(vec![0, 1]),
                cpus: vec![0, 1]
            }]
        );
    }

    #[test]
    fn plan_rejects_offline_or_empty() {
        let e = plan_pinning(&[1], &[(0, 1)], &[7], &[], &[0, 1]).expect_err("offline");
        assert!(
            e.to_string()
                .contains("CPU 7 is not an online host CPU (online: 0-1)"),
            "{e}"
        );
        assert!(plan_pinning(&[1], &[(0, 1)], &[], &[], &[0, 1]).is_err());
        assert!(plan_pinning(&[1], &[(0, 1)], &[0], &[9], &[0, 1]).is_err());
    }

    #[test]
    fn own_affinity_and_host_cpus() {
        let online = host_cpus();
        assert!(!online.is_empty());
        let mine = thread_affinity(std::process::id() as i32).expect("own affinity");
        assert!(!mine.is_empty());
        assert!(
            mine.iter().all(|c| online.contains(c)),
            "{mine:?} vs {online:?}"
        );
    }
}
