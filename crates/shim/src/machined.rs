//! Guests in systemd-machined (`machinectl list` shows them) on systemd hosts.
//!
//! The shim registers each guest once it runs, as machine `berth-<guest>` of
//! class `vm` (the QEMU process) or `container` (the container's first
//! process, with its root directory), and unregisters it when the guest has
//! exited:
//!
//! ```text
//! RegisterMachineWithNetwork("berth-r1", [], "berth", "vm", <qemu pid>, "", [<tap ifindex>])
//! RegisterMachineWithNetwork("berth-db", [], "berth", "container", <leader>, "/rootfs", [<veth ifindex>])
//! UnregisterMachine("berth-r1")      (not TerminateMachine: that kills)
//! ```
//!
//! Containers are not registered by systemd-nspawn (`--register=no`): both
//! kinds are registered the same way, from the guest's own scope
//! (`machine.slice/berth-<guest>.scope`, see berth_container::cgroup), which
//! is the machine's unit. While guests lived in berth.service's cgroup,
//! machined dropped them when berth.service restarted (tests/e2e_systemd.rs
//! checks they stay).
//!
//! `RegisterMachine*` (not `CreateMachine*`) keeps QEMU in the cgroup berth
//! put it in; machined records the unit QEMU runs under (berth.service).
//! The calls go through `busctl` (part of systemd, so present wherever
//! machined is) rather than a D-Bus library: two fire-and-forget calls per
//! VM start do not justify an async D-Bus stack in the shim, which must stay
//! small, and only the exit status is looked at. Without systemd as PID 1
//! (containers, CI, this project's build machine) nothing is run and
//! nothing is said.

use std::path::Path;
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

/// A running guest as machined sees it.
#[derive(Debug, Clone, Copy)]
pub struct Machine<'a> {
    pub guest: &'a str,
    /// `vm` or `container`.
    pub class: &'a str,
    /// QEMU, or the container's first process (in the host's PID namespace).
    pub leader: u32,
    /// The container's root directory; empty for a VM.
    pub root: &'a Path,
    /// The host side of the guest's link (its ifindex goes to machined).
    pub link: &'a str,
}

/// `busctl call` arguments that register `m` (`leader`), with the host side
/// of its link (`ifindex`) when known.
pub fn register_argv(m: &Machine, ifindex: Option<u32>) -> Vec<String> {
    let mut v: Vec<String> = ["--system", "--timeout=5", "call"]
        .into_iter()
        .chain(DEST)
        .map(str::to_owned)
        .collect();
    let common = [
        machine_name(m.guest),
        "0".into(),
        "berth".into(),
        m.class.into(),
        m.leader.to_string(),
        m.root.to_string_lossy().into_owned(),
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

/// `busctl` arguments that list the machines machined knows, as JSON.
pub fn list_argv() -> Vec<String> {
    ["--system", "--timeout=5", "--json=short", "call"]
        .into_iter()
        .chain(DEST)
        .chain(["ListMachines"])
        .map(str::to_owned)
        .collect()
}

/// The machine names in `busctl --json=short call ... ListMachines` output:
/// `{"type":"a(ssso)","data":[[["berth-db","container","berth","/org/..."],...]]}`.
pub fn parse_list(json: &str) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        data: (Vec<(String, String, String, String)>,),
    }
    let r: Reply =
        serde_json::from_str(json).map_err(|e| format!("unexpected ListMachines reply: {e}"))?;
    Ok(r.data.0.into_iter().map(|m| m.0).collect())
}

/// The machines machined knows right now.
pub fn list() -> Result<Vec<String>, String> {
    let out = Command::new("busctl")
        .args(list_argv())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running busctl: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    parse_list(&String::from_utf8_lossy(&out.stdout))
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

/// Registers the guest with machined when systemd runs; `Ok` and silent
/// when it does not. An error is a warning for the supervisor log: the
/// guest runs either way.
pub fn register(systemd: bool, m: &Machine) -> Result<(), String> {
    if !systemd {
        return Ok(());
    }
    busctl(&register_argv(m, ifindex(m.link)))
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

    fn vm(leader: u32) -> Machine<'static> {
        Machine {
            guest: "r1",
            class: "vm",
            leader,
            root: Path::new(""),
            link: "vb5",
        }
    }

    #[test]
    fn register_call_matches_machined_signature() {
        let v = register_argv(&vm(4242), Some(7));
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
        let v = register_argv(&vm(4242), None);
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
    fn a_container_is_registered_with_its_root() {
        let m = Machine {
            guest: "db",
            class: "container",
            leader: 99,
            root: Path::new("/srv/db"),
            link: "vb2",
        };
        let v = register_argv(&m, Some(3));
        assert_eq!(
            v[6..],
            [
                "RegisterMachineWithNetwork",
                "sayssusai",
                "berth-db",
                "0",
                "berth",
                "container",
                "99",
                "/srv/db",
                "1",
                "3"
            ]
        );
    }

    #[test]
    fn list_reply_is_parsed() {
        let json = r#"{"type":"a(ssso)","data":[[["berth-sc","container","berth","/org/freedesktop/machine1/machine/berth_2dsc"],[".host","host","","/org/freedesktop/machine1/machine/_2ehost"]]]}"#;
        assert_eq!(
            parse_list(json),
            Ok(vec!["berth-sc".into(), ".host".into()])
        );
        assert_eq!(parse_list(r#"{"type":"a(ssso)","data":[[]]}"#), Ok(vec![]));
        assert!(parse_list("Call failed").is_err());
        assert_eq!(list_argv()[3], "call");
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
        assert_eq!(register(false, &vm(1234)), Ok(()));
        unregister(false, "r1");
    }
}
