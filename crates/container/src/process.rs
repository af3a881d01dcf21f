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
    let rd = std::fs::read_dir("/proc").ok()?;
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| ppid(pid) == Some(nspawn_pid))
        .find(|&pid| nspid_is_one(pid) && runs_berth_init(pid))
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
    fn self_is_alive_and_has_parent() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(ppid(me).is_some());
        assert!(!alive(i32::MAX));
    }
}
