//! Planner and extra NICs: every NIC change restarts the guest, and the
//! plan names the NIC and the field.

use std::path::Path;

use berth_plan::{ActionKind, GuestStatus, Impact, Observed, plan};
use berth_spec::{Desired, Format, NoProbe};

const HEAD: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"

[guest.r1]
kind = "vm"
index = 2
kernel = "/k"
"#;

fn desired(nics: &str) -> Desired {
    let text = format!("{HEAD}{nics}");
    let spec = berth_spec::parse(&text, Format::Toml, Path::new("t.toml")).expect("parses");
    berth_spec::validate(&spec, Path::new("t.toml"), &NoProbe)
        .unwrap_or_else(|e| panic!("{}", berth_spec::format_errors(&e)))
}

const LAN: &str = "[[guest.r1.nic]]\nmode = \"macvtap\"\nparent = \"lan0\"\n";
const SYNC: &str = "[[guest.r1.nic]]\nmode = \"segment\"\nsegment = \"sync\"\n";

/// (field, from, to) of r1's one action, which must be a restart.
fn restart(from: &str, to: &str) -> Vec<(String, String, String)> {
    let old = desired(from);
    let p = plan(
        &desired(to),
        &Observed::from_desired(&old, GuestStatus::Running),
    );
    assert_eq!(p.actions.len(), 1, "{p}");
    let a = &p.actions[0];
    assert_eq!(
        (a.kind, a.impact),
        (ActionKind::Restart, Impact::Restart),
        "{p}"
    );
    assert!(p.to_string().contains("nic["), "{p}");
    a.changes
        .iter()
        .map(|c| (c.field.clone(), c.from.clone(), c.to.clone()))
        .collect()
}

#[test]
fn unchanged_nics_plan_nothing() {
    let d = desired(&format!("{LAN}{SYNC}"));
    assert!(plan(&d, &Observed::from_desired(&d, GuestStatus::Running)).is_empty());
}

#[test]
fn adding_and_removing_a_nic_restarts() {
    let c = restart(LAN, &format!("{LAN}{SYNC}"));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, "nic[2]");
    assert_eq!(c[0].1, "none");
    assert!(c[0].2.starts_with("segment sync, mac 52:54:"), "{c:?}");
    let c = restart(&format!("{LAN}{SYNC}"), LAN);
    assert_eq!((c[0].0.as_str(), c[0].2.as_str()), ("nic[2]", "none"));
}

#[test]
fn mac_and_parent_changes_restart() {
    let c = restart(LAN, &format!("{LAN}mac = \"52:54:00:12:34:01\"\n"));
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, "nic[1].mac");
    assert_eq!(c[0].2, "52:54:00:12:34:01");
    let c = restart(LAN, &LAN.replace("lan0", "lan1"));
    assert_eq!(
        c,
        [(
            "nic[1].parent".to_string(),
            "lan0".to_string(),
            "lan1".to_string()
        )]
    );
    // Another mode: the whole NIC, old and new.
    let c = restart(LAN, SYNC);
    assert_eq!(c[0].0, "nic[1]");
    assert!(
        c[0].1.starts_with("macvtap on lan0") && c[0].2.starts_with("segment sync"),
        "{c:?}"
    );
}

#[test]
fn a_stopped_guest_changes_without_interruption() {
    let old = desired(LAN);
    let p = plan(
        &desired(&format!("{LAN}{SYNC}")),
        &Observed::from_desired(&old, GuestStatus::Stopped),
    );
    assert_eq!(p.actions[0].impact, Impact::None, "{p}");
}
