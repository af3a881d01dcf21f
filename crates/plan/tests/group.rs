//! The planner on groups: scaling touches only the members it adds or
//! removes, member changes become a rolling update, companions follow their
//! member.

use std::path::Path;

use berth_plan::{ActionKind, GuestStatus, Observed, plan};
use berth_spec::{Desired, Format, NoProbe, parse, validate};

fn desired(replicas: u32, command: &str, extra: &str) -> Desired {
    let text = format!(
        r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"

[group.web]
replicas = {replicas}
index_base = 10
vip4 = "10.0.1.10"
{extra}

[group.web.template]
kind = "container"
rootfs = "/r"
ephemeral = true
command = ["/bin/sh", "-c", "{command}"]
health = {{ tcp = 80 }}

[[group.web.template.companions]]
name = "db"
index_base = 20
kind = "container"
rootfs = "/r"
ephemeral = true
"#
    );
    let spec = parse(&text, Format::Toml, Path::new("g.toml")).expect("parse");
    validate(&spec, Path::new("g.toml"), &NoProbe).expect("valid")
}

fn running(d: &Desired) -> Observed {
    Observed::from_desired(d, GuestStatus::Running)
}

#[test]
fn scaling_adds_and_removes_members_only() {
    let two = desired(2, "httpd", "");
    let up = plan(&desired(4, "httpd", ""), &running(&two));
    let created: Vec<&str> = up
        .actions
        .iter()
        .map(|a| {
            assert_eq!(a.kind, ActionKind::Create, "{a:?}");
            a.guest.as_deref().unwrap_or("")
        })
        .collect();
    assert_eq!(created, ["web-2", "web-2-db", "web-3", "web-3-db"]);
    assert!(up.rollouts.is_empty());

    let four = desired(4, "httpd", "");
    let down = plan(&desired(1, "httpd", ""), &running(&four));
    let order: Vec<&str> = down
        .actions
        .iter()
        .map(|a| {
            assert_eq!(a.kind, ActionKind::Destroy, "{a:?}");
            a.guest.as_deref().unwrap_or("")
        })
        .collect();
    // Highest index first (members and their companions alike).
    assert_eq!(
        order,
        [
            "web-3-db", "web-2-db", "web-1-db", "web-3", "web-2", "web-1"
        ]
    );
    assert!(!down.to_string().contains("web-0 "), "{down}");
}

#[test]
fn a_member_change_is_a_rolling_update_with_companions() {
    let old = desired(2, "httpd", "");
    let p = plan(&desired(2, "httpd -v", ""), &running(&old));
    assert_eq!(p.rollouts.len(), 1, "{p}");
    let r = &p.rollouts[0];
    assert_eq!(r.members, ["web-0", "web-1"]);
    assert_eq!(r.batch, 1);
    assert!(r.service_stays_up && r.blocked.is_none(), "{r:?}");
    // Each member's companion restarts with it.
    for c in ["web-0-db", "web-1-db"] {
        let a = p.action(c).expect("companion action");
        assert_eq!(a.kind, ActionKind::Restart);
        assert!(a.reason.contains("restarts with its member"), "{a:?}");
    }
    let text = p.to_string();
    assert!(text.contains("rolling update of group web"), "{text}");
    assert!(text.contains("10.0.1.10 stays up"), "{text}");
    assert!(p.summary().contains("service stays up"), "{}", p.summary());
}

#[test]
fn health_changes_are_live() {
    let old = desired(2, "httpd", "");
    let mut new = old.clone();
    for g in new.guests.values_mut() {
        if let Some(h) = g.health.as_mut() {
            h.interval_ms = 250;
        }
    }
    let p = plan(&new, &running(&old));
    assert!(p.rollouts.is_empty(), "{p}");
    assert!(
        p.actions.iter().all(|a| a.kind == ActionKind::Update),
        "{p}"
    );
}

#[test]
fn min_available_that_leaves_no_room_blocks_the_rollout() {
    let old = desired(1, "httpd", "min_available = 1");
    let p = plan(&desired(1, "httpd -v", "min_available = 1"), &running(&old));
    let r = &p.rollouts[0];
    assert!(
        r.blocked
            .as_deref()
            .is_some_and(|b| b.contains("replicas = 2")),
        "{r:?}"
    );
    assert!(!r.service_stays_up);
    assert!(p.to_string().contains("refused"), "{p}");
    // Without min_available the single member restarts and the plan says
    // the service address goes down.
    let old = desired(1, "httpd", "");
    let p = plan(&desired(1, "httpd -v", ""), &running(&old));
    let r = &p.rollouts[0];
    assert!(r.blocked.is_none() && !r.service_stays_up, "{r:?}");
    assert!(r.service.contains("DOWN"), "{r:?}");
}
