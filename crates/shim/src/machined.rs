//! VMs in systemd-machined (`machinectl list` shows them) on systemd hosts.
//!
//! Containers register themselves: systemd-nspawn runs with `--register=yes`
//! when systemd and D-Bus run. For a VM the shim registers the QEMU process
//! once it runs, as machine `berth-<guest>` of class `vm`, and unregisters it
//! when QEMU has exited:
//!
//! ```text
//! RegisterMachineWithNetwork("berth-r1", [], "berth", "vm", <qemu pid>, "", [<tap ifindex>])
//! UnregisterMachine("berth-r1")      (not TerminateMachine: that kills)
//! ```
//!
//! `RegisterMachine*` (not `CreateMachine*`) keeps QEMU in the cgroup berth
//! put it in; machined records the unit QEMU runs under (berth.service).
//! The calls go through `busctl` (part of systemd, so present wherever
//! machined is) rather than a D-Bus library: two fire-and-forget calls per
//! VM start do not justify an async D-Bus stack in the shim, which must stay
//! small, and only the exit status is looked at. Without systemd as PID 1
//! (containers, CI, this project's build machine) nothing is run and
//! nothing is said.

use std::process::{Command, Stdio};

/// The machine name berth uses (the same as nspawn's for containers).
pub fn machine_name(guest: &str) -> String {
    format!("berth-{guest}")
}

const DEST: [&str; 3] = [
    "org.freedesktop.machine1",
    "/org/freedesktop/machine1",
    "org.freedesktop.machine1.Manager",
];

/// `busctl call` arguments that register `guest`'s QEMU (`leader`) as a VM,
/// with the host side of its link (`ifindex`) when known.
pub fn register_argv(guest: &str, leader: u32, ifindex: Option<u32>) -> Vec<String> {
    let mut v: Vec<String> = ["--system", "--timeout=5", "call"]
        .into_iter()
        .chain(DEST)
        .map(str::to_owned)
        .collect();
    let name = machine_name(guest);
    let common = [
        name,
        "0".into(),
        "berth".into(),
        "vm".into(),
        leader.to_string(),
        String::new(),
    ];
    match ifindex {
        Some(i) => {
            v.push("RegisterMachineWithNetwork".into());
            v.push("sayssusai".into());
            v.extend(common);
            v.push("1".into());
            v.push(i.to_string());
        }
        None => {
            v.push("RegisterMachine".into());
            v.push("sayssus".into());
            v.extend(common);
        }
    }
    v
}

/// `busctl call` arguments that drop the registration of `guest`.
pub fn unregister_argv(guest: &str) -> Vec<String> {
    ["--system", "--timeout=5", "call"]
        .into_iter()
        .chain(DEST)
        .map(str::to_owned)
        .chain(["UnregisterMachine".into(), "s".into(), machine_name(guest)])
        .collect()
}

/// The ifindex of host interface `link` (the VM's tap), if it exists.
fn ifindex(link: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/sys/class/net/{link}/ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn busctl(argv: &[String]) -> Result<(), String> {
    let out = Command::new("busctl")
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running busctl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Registers the VM with machined when systemd runs; `Ok` and silent when
/// it does not. An error is a warning for the supervisor log: the VM runs
/// either way.
pub fn register(systemd: bool, guest: &str, leader: u32, link: &str) -> Result<(), String> {
    if !systemd {
        return Ok(());
    }
    busctl(&register_argv(guest, leader, ifindex(link)))
        .map_err(|e| format!("registering with systemd-machined: {e}"))
}

/// Drops the registration (best effort: machined also forgets a machine
/// whose leader is gone). Silent without systemd.
pub fn unregister(systemd: bool, guest: &str) {
    if systemd {
        let _ = busctl(&unregister_argv(guest));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_call_matches_machined_signature() {
        let v = register_argv("r1", 4242, Some(7));
        assert_eq!(
            v,
            [
                "--system",
                "--timeout=5",
                "call",
                "org.freedesktop.machine1",
                "/org/freedesktop/machine1",
                "org.freedesktop.machine1.Manager",
                "RegisterMachineWithNetwork",
                "sayssusai",
                "berth-r1",
                "0",
                "berth",
                "vm",
                "4242",
                "",
                "1",
                "7"
            ]
        );
        let v = register_argv("r1", 4242, None);
        assert_eq!(
            v[6..],
            [
                "RegisterMachine",
                "sayssus",
                "berth-r1",
                "0",
                "berth",
                "vm",
                "4242",
                ""
            ]
        );
    }

    #[test]
    fn unregister_does_not_terminate() {
        let v = unregister_argv("r1");
        assert_eq!(v[6..], ["UnregisterMachine", "s", "berth-r1"]);
        assert!(
            !v.iter()
                .any(|a| a.contains("Terminate") || a.contains("Kill"))
        );
    }

    #[test]
    fn without_systemd_nothing_runs() {
        // No busctl is started (there is none on the build machine either):
        // success, no message.
        assert_eq!(register(false, "r1", 1234, "vb5"), Ok(()));
        unregister(false, "r1");
    }
}
