//! Finding a container's leader process and ending it for sure.

use std::time::{Duration, Instant};

/// Parent PID of `pid`, from /proc.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 (after the parenthesised comm) is the state.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The container's PID 1 as seen from the host: the child of `nspawn_pid`
/// that runs in a PID namespace of its own and has exec'd berth-init (so
/// nspawn is done setting the container up). Waits up to `timeout`.
pub fn find_leader(nspawn_pid: i32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = leader_now(nspawn_pid) {
            return Some(pid);
        }
        if Instant::now() > deadline || !alive(nspawn_pid) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn leader_now(nspawn_pid: i32) -> Option<i32> {
    children(nspawn_pid)
        .into_iter()
        .find(|&pid| nspid_is_one(pid) && runs_berth_init(pid))
}

/// Direct children of `pid`, from `/proc/PID/task/*/children` (cheap: no
/// scan of all of /proc, which matters when many shims poll at once).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}

/// The leader has exec'd `/.berth-init`: nspawn has finished setting up the
/// container (mounts, its own loopback setup), so the host can configure the
/// network without racing it.
fn runs_berth_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == ".berth-init")
        .unwrap_or(false)
}

/// `NSpid:` lists the PID in each nested namespace; the leader's last is 1.
fn nspid_is_one(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .map(|v| v.split_whitespace().last() == Some("1"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lists_a_spawned_child() {
        let mut c = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let kids = children(std::process::id() as i32);
        let _ = c.kill();
        let _ = c.wait();
        assert!(kids.contains(&(c.id() as i32)), "{kids:?}");
    }

    #[test]
    fn self_is_alive_and_has_parent() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(ppid(me).is_some());
        assert!(!alive(i32::MAX));
    }
}
