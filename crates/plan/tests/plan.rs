//! Planner tests: a table over every field, plus the scenarios that matter
//! to operators (renames, subnet moves, interrupted applies, idempotence).

use std::path::Path;

use berth_plan::{
    Action, ActionKind, GuestStatus, Impact, Observed, ObservedGuest, Plan, format_duration_ms,
    plan,
};
use berth_spec::{ByteSize, Desired, Format, GuestKind, NoProbe, RestartPolicy, Spec};

const BASE: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"
subnet6 = "fd42:b:e:1::/64"

[guest.a]
kind = "container"
index = 2
rootfs = "/var/lib/berth/rootfs/a"
memory = "128M"
env = { FOO = "bar" }

[guest.b]
kind = "container"
index = 3
rootfs = "/var/lib/berth/rootfs/b"
command = ["/bin/sh", "-c", "httpd -f -p 80"]
"#;

fn base() -> Spec {
    berth_spec::parse(BASE, Format::Toml, Path::new("base.toml")).expect("base parses")
}

fn desired(s: &Spec) -> Desired {
    match berth_spec::validate(s, Path::new("t.toml"), &NoProbe) {
        Ok(d) => d,
        Err(es) => panic!("invalid test spec:\n{}", berth_spec::format_errors(&es)),
    }
}

fn desired_with(tweak: impl FnOnce(&mut Spec)) -> Desired {
    let mut s = base();
    tweak(&mut s);
    desired(&s)
}

fn running(d: &Desired) -> Observed {
    Observed::from_desired(d, GuestStatus::Running)
}

fn g<'a>(s: &'a mut Spec, name: &str) -> &'a mut berth_spec::GuestSpec {
    s.guest.get_mut(name).expect("guest in base spec")
}

/// (guest or "host", kind, impact) per action, in plan order.
fn shape(p: &Plan) -> Vec<(String, ActionKind, Impact)> {
    p.actions
        .iter()
        .map(|a| {
            (
                a.guest.clone().unwrap_or_else(|| "host".into()),
                a.kind,
                a.impact,
            )
        })
        .collect()
}

fn action<'a>(p: &'a Plan, guest: &str) -> &'a Action {
    p.action(guest)
        .unwrap_or_else(|| panic!("no action for {guest} in\n{p}"))
}

type Tweak = fn(&mut Spec);

#[test]
fn table_every_field() {
    use ActionKind as K;
    use Impact as I;
    let none: Tweak = |_| {};
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Tweak, Tweak, Vec<(&str, ActionKind, Impact)>)> = vec![
        ("nothing", none, none, vec![]),
        (
            "memory change",
            none,
            |s| g(s, "a").memory = Some(ByteSize(256 << 20)),
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "memory added",
            none,
            |s| g(s, "b").memory = Some(ByteSize(64 << 20)),
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "memory removed",
            none,
            |s| g(s, "a").memory = None,
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "cpus",
            none,
            |s| g(s, "a").cpus = Some(2.0),
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "cpus changed",
            |s| g(s, "a").cpus = Some(1.0),
            |s| g(s, "a").cpus = Some(1.5),
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "rootfs",
            none,
            |s| g(s, "b").rootfs = Some("/srv/other".into()),
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "binds added",
            none,
            |s| {
                g(s, "b").binds = vec![berth_spec::BindSpec {
                    source: "/nix/store".into(),
                    target: None,
                    read_only: None,
                }]
            },
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "bind made writable",
            |s| {
                g(s, "b").binds = vec![berth_spec::BindSpec {
                    source: "/srv".into(),
                    target: None,
                    read_only: None,
                }]
            },
            |s| {
                g(s, "b").binds = vec![berth_spec::BindSpec {
                    source: "/srv".into(),
                    target: None,
                    read_only: Some(false),
                }]
            },
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "command",
            none,
            |s| g(s, "b").command = Some(vec!["/bin/httpd".into()]),
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "command to default",
            none,
            |s| g(s, "b").command = None,
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "env value",
            none,
            |s| {
                g(s, "a").env.insert("FOO".into(), "baz".into());
            },
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "env added",
            none,
            |s| {
                g(s, "b").env.insert("X".into(), "1".into());
            },
            vec![("b", K::Restart, I::Restart)],
        ),
        (
            "env removed",
            none,
            |s| g(s, "a").env.clear(),
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "autostart",
            none,
            |s| g(s, "a").autostart = Some(false),
            vec![("a", K::Update, I::Live)],
        ),
        (
            "autostart explicit default is no change",
            none,
            |s| g(s, "a").autostart = Some(true),
            vec![],
        ),
        (
            "restart policy",
            none,
            |s| g(s, "a").restart = Some(RestartPolicy::Always),
            vec![("a", K::Update, I::Live)],
        ),
        (
            "stop_timeout",
            none,
            |s| g(s, "b").stop_timeout = Some("30s".into()),
            vec![("b", K::Update, I::Live)],
        ),
        (
            "stop_timeout same value other spelling",
            |s| g(s, "b").stop_timeout = Some("60s".into()),
            |s| g(s, "b").stop_timeout = Some("1m".into()),
            vec![],
        ),
        (
            "index",
            none,
            |s| g(s, "a").index = Some(7),
            vec![("a", K::Replace, I::Replace)],
        ),
        (
            "live + restart = restart",
            none,
            |s| {
                let a = g(s, "a");
                a.autostart = Some(false);
                a.memory = Some(ByteSize(1 << 30));
            },
            vec![("a", K::Restart, I::Restart)],
        ),
        (
            "restart + replace = replace",
            none,
            |s| {
                let a = g(s, "a");
                a.index = Some(9);
                a.memory = Some(ByteSize(1 << 30));
            },
            vec![("a", K::Replace, I::Replace)],
        ),
        (
            "subnet4",
            none,
            |s| s.host.subnet4 = "10.9.0.0/24".into(),
            vec![
                ("host", K::HostUpdate, I::Live),
                ("a", K::Replace, I::Replace),
                ("b", K::Replace, I::Replace),
            ],
        ),
        (
            "subnet6 added",
            |s| s.host.subnet6 = None,
            none,
            vec![
                ("host", K::HostUpdate, I::Live),
                ("a", K::Replace, I::Replace),
                ("b", K::Replace, I::Replace),
            ],
        ),
        (
            "subnet6 changed",
            none,
            |s| s.host.subnet6 = Some("fd42:b:e:2::/64".into()),
            vec![
                ("host", K::HostUpdate, I::Live),
                ("a", K::Replace, I::Replace),
                ("b", K::Replace, I::Replace),
            ],
        ),
        (
            "subnet4 wider, same network: addresses stay",
            none,
            |s| s.host.subnet4 = "10.0.0.0/23".into(),
            vec![("host", K::HostUpdate, I::Live)],
        ),
        (
            "uplink",
            none,
            |s| s.host.uplink = "eth1".into(),
            vec![("host", K::HostUpdate, I::Live)],
        ),
        (
            "max_guests",
            none,
            |s| s.host.max_guests = 128,
            vec![("host", K::HostUpdate, I::None)],
        ),
        (
            "guest removed",
            none,
            |s| {
                s.guest.remove("a");
            },
            vec![("a", K::Destroy, I::Replace)],
        ),
        (
            "guest added",
            none,
            |s| {
                let mut c = s.guest["b"].clone();
                c.index = Some(4);
                c.rootfs = Some("/var/lib/berth/rootfs/c".into());
                s.guest.insert("c".into(), c);
            },
            vec![("c", K::Create, I::None)],
        ),
        (
            "mixed: destroy, host, change, create in that order",
            none,
            |s| {
                s.guest.remove("b");
                s.host.uplink = "eth1".into();
                g(s, "a").restart = Some(RestartPolicy::Never);
                let mut c = s.guest["a"].clone();
                c.index = Some(3);
                c.rootfs = Some("/var/lib/berth/rootfs/c".into());
                s.guest.insert("c".into(), c);
            },
            vec![
                ("b", K::Destroy, I::Replace),
                ("host", K::HostUpdate, I::Live),
                ("a", K::Update, I::Live),
                ("c", K::Create, I::None),
            ],
        ),
    ];

    for (name, old, new, want) in cases {
        let before = desired_with(old);
        let after = desired_with(new);
        let p = plan(&after, &running(&before));
        let want: Vec<(String, ActionKind, Impact)> = want
            .into_iter()
            .map(|(g, k, i)| (g.to_string(), k, i))
            .collect();
        assert_eq!(shape(&p), want, "case {name:?}:\n{p}");
        // Every guest with a non-destroy action is running afterwards, and
        // every desired guest is either acted on or unchanged.
        for gname in after.guests.keys() {
            let acted = p.action(gname).is_some();
            assert!(
                acted != p.unchanged.contains(gname),
                "case {name:?}: {gname} must be acted on xor unchanged\n{p}"
            );
        }
        // Changed guests list their changes.
        for a in &p.actions {
            if matches!(
                a.kind,
                ActionKind::Update
                    | ActionKind::Restart
                    | ActionKind::Replace
                    | ActionKind::HostUpdate
            ) {
                assert!(!a.changes.is_empty(), "case {name:?}: {a:?}");
            }
        }
    }
}

#[test]
fn kind_change_replaces() {
    let d = desired(&base());
    let mut o = running(&d);
    if let Some(og) = o.guests.get_mut("a") {
        og.applied.kind = GuestKind::Vm;
    }
    let p = plan(&d, &o);
    assert_eq!(
        shape(&p),
        vec![("a".to_string(), ActionKind::Replace, Impact::Replace)]
    );
    let a = action(&p, "a");
    assert!(
        a.reason.contains("kind vm→container needs replace"),
        "{}",
        a.reason
    );
}

#[test]
fn memory_change_restarts_only_that_guest() {
    let old = desired(&base());
    let new = desired_with(|s| g(s, "a").memory = Some(ByteSize(256 << 20)));
    let p = plan(&new, &running(&old));
    assert_eq!(p.actions.len(), 1);
    let a = action(&p, "a");
    assert_eq!(
        (a.kind, a.impact, a.start),
        (ActionKind::Restart, Impact::Restart, true)
    );
    assert_eq!(a.reason, "memory 128M→256M needs restart");
    assert_eq!(a.changes.len(), 1);
    assert_eq!(
        (
            a.changes[0].field.as_str(),
            a.changes[0].from.as_str(),
            a.changes[0].to.as_str()
        ),
        ("memory", "128M", "256M")
    );
    assert_eq!(p.unchanged, vec!["b"]);
    assert_eq!(p.interrupted().len(), 1);
}

#[test]
fn all_changes_listed_impact_is_max() {
    let old = desired(&base());
    let new = desired_with(|s| {
        let a = g(s, "a");
        a.memory = Some(ByteSize(1 << 30));
        a.cpus = Some(0.5);
        a.stop_timeout = Some("500ms".into());
        a.env.insert("NEW".into(), "x y".into());
    });
    let p = plan(&new, &running(&old));
    let a = action(&p, "a");
    assert_eq!(a.impact, Impact::Restart);
    let fields: Vec<&str> = a.changes.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(fields, vec!["memory", "cpus", "env.NEW", "stop_timeout"]);
    assert!(
        a.reason.contains("memory 128M→1G needs restart"),
        "{}",
        a.reason
    );
    assert!(
        a.reason.contains("cpus unlimited→0.5 needs restart"),
        "{}",
        a.reason
    );
    assert!(
        a.reason.contains("env.NEW unset→\"x y\" needs restart"),
        "{}",
        a.reason
    );
    assert!(
        a.reason.contains("stop_timeout 10s→500ms applies live"),
        "{}",
        a.reason
    );
}

#[test]
fn rename_is_destroy_then_create() {
    let old = desired(&base());
    let new = desired_with(|s| {
        let a = s.guest.remove("a").expect("a");
        s.guest.insert("z".into(), a);
    });
    let p = plan(&new, &running(&old));
    assert_eq!(
        shape(&p),
        vec![
            ("a".to_string(), ActionKind::Destroy, Impact::Replace),
            ("z".to_string(), ActionKind::Create, Impact::None),
        ]
    );
    assert_eq!(
        action(&p, "a").reason,
        "removed from the spec: will be stopped and deleted"
    );
    assert!(!action(&p, "a").start);
    assert!(action(&p, "z").start);
    assert_eq!(p.unchanged, vec!["b"]);
}

#[test]
fn destroy_sorts_before_create_regardless_of_name() {
    // "a" is created, "z" destroyed: the destroy still goes first.
    let old = desired_with(|s| {
        let a = s.guest.remove("a").expect("a");
        s.guest.insert("z".into(), a);
    });
    let new = desired(&base());
    let p = plan(&new, &running(&old));
    assert_eq!(p.actions[0].kind, ActionKind::Destroy);
    assert_eq!(p.actions[0].guest.as_deref(), Some("z"));
    assert_eq!(p.actions[1].kind, ActionKind::Create);
}

#[test]
fn subnet_change_replaces_all_and_updates_host() {
    let old = desired(&base());
    let new = desired_with(|s| s.host.subnet4 = "10.1.0.0/24".into());
    let p = plan(&new, &running(&old));
    for name in ["a", "b"] {
        let a = action(&p, name);
        assert_eq!((a.kind, a.impact), (ActionKind::Replace, Impact::Replace));
        assert!(a.changes.iter().any(|c| c.field == "addresses"), "{a:?}");
    }
    assert!(
        action(&p, "a")
            .reason
            .contains("addresses 10.0.0.2, fd42:b:e:1::2→10.1.0.2, fd42:b:e:1::2 needs replace"),
        "{}",
        action(&p, "a").reason
    );
    let h = p.host_action().expect("host action");
    assert_eq!(h.changes[0].field, "host.subnet4");
    assert_eq!(p.interrupted().len(), 2);
}

#[test]
fn uplink_change_is_one_host_update() {
    let old = desired(&base());
    let new = desired_with(|s| s.host.uplink = "eth1".into());
    let p = plan(&new, &running(&old));
    assert_eq!(p.actions.len(), 1);
    let h = &p.actions[0];
    assert_eq!(h.guest, None);
    assert_eq!((h.kind, h.impact), (ActionKind::HostUpdate, Impact::Live));
    assert_eq!(h.reason, "NAT moves from eth0 to eth1");
    assert_eq!(p.unchanged, vec!["a", "b"]);
    assert!(p.interrupted().is_empty());
}

#[test]
fn empty_observed_creates_everything() {
    let d = desired(&base());
    let p = plan(&d, &Observed::default());
    assert_eq!(
        shape(&p),
        vec![
            ("host".to_string(), ActionKind::HostUpdate, Impact::None),
            ("a".to_string(), ActionKind::Create, Impact::None),
            ("b".to_string(), ActionKind::Create, Impact::None),
        ]
    );
    assert!(
        action(&p, "a")
            .reason
            .contains("new container at 10.0.0.2, fd42:b:e:1::2"),
        "{}",
        action(&p, "a").reason
    );
    assert!(
        p.host_action()
            .expect("host")
            .reason
            .contains("NAT out of eth0")
    );
    assert!(p.interrupted().is_empty());
}

#[test]
fn create_without_autostart_does_not_start() {
    let d = desired_with(|s| g(s, "a").autostart = Some(false));
    let p = plan(&d, &Observed::default());
    let a = action(&p, "a");
    assert!(!a.start);
    assert!(a.reason.contains("autostart is off"), "{}", a.reason);
    assert!(action(&p, "b").start);
}

#[test]
fn idempotent_when_applied_and_running() {
    let d = desired(&base());
    let p = plan(&d, &running(&d));
    assert!(p.is_empty(), "{p}");
    assert_eq!(p.unchanged, vec!["a", "b"]);
    assert_eq!(p.to_string(), "No changes.");
    // Same for the example spec of berth-spec, through JSON (as the store keeps it).
    let j = serde_json::to_string(&running(&d)).expect("ser");
    let o: Observed = serde_json::from_str(&j).expect("de");
    assert!(plan(&d, &o).is_empty());
}

#[test]
fn partial_is_replaced() {
    let d = desired(&base());
    let mut o = running(&d);
    if let Some(og) = o.guests.get_mut("b") {
        og.status = GuestStatus::Partial;
    }
    let p = plan(&d, &o);
    assert_eq!(
        shape(&p),
        vec![("b".to_string(), ActionKind::Replace, Impact::Replace)]
    );
    let b = action(&p, "b");
    assert_eq!(b.reason, "an earlier apply was interrupted; recreating");
    assert!(b.start);
}

#[test]
fn not_running_guests_start() {
    let d = desired(&base());
    for status in [
        GuestStatus::Stopped,
        GuestStatus::Failed,
        GuestStatus::Missing,
    ] {
        let mut o = running(&d);
        if let Some(og) = o.guests.get_mut("a") {
            og.status = status;
        }
        let p = plan(&d, &o);
        assert_eq!(
            shape(&p),
            vec![("a".to_string(), ActionKind::Start, Impact::None)],
            "{status}"
        );
        let a = action(&p, "a");
        assert_eq!(a.reason, format!("not running ({status}); will start"));
        assert!(a.start);
        assert!(a.changes.is_empty());
    }
}

#[test]
fn stopped_without_autostart_stays_stopped() {
    let d = desired_with(|s| g(s, "a").autostart = Some(false));
    let o = Observed::from_desired(&d, GuestStatus::Stopped);
    let p = plan(&d, &o);
    assert_eq!(
        shape(&p),
        vec![("b".to_string(), ActionKind::Start, Impact::None)]
    );
    assert_eq!(p.unchanged, vec!["a"]);
}

#[test]
fn changed_while_not_running_interrupts_nothing() {
    let old = desired(&base());
    let new = desired_with(|s| {
        g(s, "a").memory = Some(ByteSize(256 << 20));
        g(s, "b").restart = Some(RestartPolicy::Always);
    });
    let p = plan(&new, &Observed::from_desired(&old, GuestStatus::Failed));
    assert_eq!(
        shape(&p),
        vec![
            ("a".to_string(), ActionKind::Restart, Impact::None),
            ("b".to_string(), ActionKind::Update, Impact::None),
        ]
    );
    let a = action(&p, "a");
    assert!(a.start);
    assert!(
        a.reason.contains(
            "memory 128M→256M needs restart; not running (failed), will start with the new config"
        ),
        "{}",
        a.reason
    );
    assert!(p.interrupted().is_empty());
    assert!(p.summary().ends_with("no interruptions"), "{}", p.summary());

    // A stopped guest whose addresses move is still replaced.
    let new = desired_with(|s| g(s, "a").index = Some(20));
    let p = plan(&new, &Observed::from_desired(&old, GuestStatus::Stopped));
    let a = action(&p, "a");
    assert_eq!((a.kind, a.impact), (ActionKind::Replace, Impact::Replace));
}

#[test]
fn summary_and_display() {
    let old = desired(&base());
    let new = desired_with(|s| {
        s.guest.remove("b");
        g(s, "a").memory = Some(ByteSize(256 << 20));
        let mut c = s.guest["a"].clone();
        c.index = Some(3);
        c.rootfs = Some("/var/lib/berth/rootfs/db2".into());
        s.guest.insert("db2".into(), c);
        let mut d = s.guest["a"].clone();
        d.index = Some(4);
        d.rootfs = Some("/var/lib/berth/rootfs/db3".into());
        s.guest.insert("db3".into(), d);
    });
    let p = plan(&new, &running(&old));
    assert_eq!(
        p.summary(),
        "2 to create, 1 to restart, 1 to destroy; interrupts: b, a"
    );
    let text = p.to_string();
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("  - b "), "{text}");
    assert!(lines[0].contains("destroy"), "{text}");
    assert!(lines[0].contains("(replace)"), "{text}");
    assert!(text.contains("  ~ a "), "{text}");
    assert!(
        text.contains("restart      (restart)  memory 128M→256M needs restart"),
        "{text}"
    );
    assert!(text.contains("      memory: 128M → 256M"), "{text}");
    assert!(text.contains("  + db2"), "{text}");
    assert!(
        text.contains("create       (none)     new container at 10.0.0.3"),
        "{text}"
    );
    assert!(text.ends_with(&p.summary()), "{text}");

    let replace = plan(&desired_with(|s| g(s, "a").index = Some(9)), &running(&old));
    let text = replace.to_string();
    assert!(text.starts_with("-/+ a "), "{text}");
    assert!(text.contains("unchanged: b"), "{text}");
    assert!(
        replace.summary().contains("1 to replace") && replace.summary().contains("interrupts: a"),
        "{}",
        replace.summary()
    );
}

#[test]
fn plan_serializes_snake_case() {
    let old = desired(&base());
    let new = desired_with(|s| s.host.uplink = "eth1".into());
    let p = plan(&new, &running(&old));
    let v = serde_json::to_value(&p).expect("ser");
    assert_eq!(v["actions"][0]["kind"], "host_update");
    assert_eq!(v["actions"][0]["impact"], "live");
    assert_eq!(v["actions"][0]["guest"], serde_json::Value::Null);
    let back: Plan = serde_json::from_value(v).expect("de");
    assert_eq!(back, p);
}

#[test]
fn impact_order_and_display() {
    assert!(Impact::None < Impact::Live);
    assert!(Impact::Live < Impact::Restart);
    assert!(Impact::Restart < Impact::Replace);
    assert_eq!(Impact::Replace.to_string(), "replace");
    assert_eq!(Impact::None.to_string(), "none");
    assert_eq!(ActionKind::HostUpdate.to_string(), "host_update");
}

#[test]
fn durations_render_like_the_spec() {
    assert_eq!(format_duration_ms(500), "500ms");
    assert_eq!(format_duration_ms(10_000), "10s");
    assert_eq!(format_duration_ms(120_000), "2m");
    assert_eq!(format_duration_ms(3_600_000), "1h");
    assert_eq!(format_duration_ms(1500), "1500ms");
}

#[test]
fn observed_guest_field_is_public() {
    // ObservedGuest is built by the daemon from its store.
    let d = desired(&base());
    let og = ObservedGuest {
        applied: d.guests["a"].clone(),
        status: GuestStatus::Running,
    };
    assert!(og.status.is_running());
}

/// Guest `a` as a microVM (NoProbe accepts any path).
fn vm_base(s: &mut Spec) {
    let a = g(s, "a");
    a.kind = GuestKind::Vm;
    a.rootfs = None;
    a.env.clear();
    a.kernel = Some("/boot/vmlinuz".into());
    a.cpus = Some(2.0);
}

type Case = (&'static str, Box<dyn Fn(&mut Spec)>, ActionKind, Impact);

#[test]
fn vm_pinning_is_live_and_qemu_args_restart() {
    let old = desired_with(vm_base);
    let cases: Vec<Case> = vec![
        (
            "pinning",
            Box::new(|s| g(s, "a").cpu_pinning = Some(vec![2, 3])),
            ActionKind::Update,
            Impact::Live,
        ),
        (
            "emulator cpus",
            Box::new(|s| g(s, "a").emulator_cpus = Some(vec![0])),
            ActionKind::Update,
            Impact::Live,
        ),
        (
            "vcpus",
            Box::new(|s| g(s, "a").cpus = Some(4.0)),
            ActionKind::Restart,
            Impact::Restart,
        ),
        (
            "memory",
            Box::new(|s| g(s, "a").memory = Some(ByteSize(512 << 20))),
            ActionKind::Restart,
            Impact::Restart,
        ),
        (
            "cmdline",
            Box::new(|s| g(s, "a").cmdline = Some("console=ttyS0".into())),
            ActionKind::Restart,
            Impact::Restart,
        ),
        (
            "hugepages",
            Box::new(|s| g(s, "a").hugepages = Some(true)),
            ActionKind::Restart,
            Impact::Restart,
        ),
        (
            "machine",
            Box::new(|s| g(s, "a").machine = Some(berth_spec::vm::Machine::Q35)),
            ActionKind::Restart,
            Impact::Restart,
        ),
    ];
    for (what, tweak, kind, impact) in cases {
        let new = desired_with(|s| {
            vm_base(s);
            tweak(s);
        });
        let p = plan(&new, &running(&old));
        assert_eq!(
            shape(&p),
            vec![("a".to_string(), kind, impact)],
            "{what}: {p}"
        );
    }
}

const IMAGES: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"

[image.root]
url = "https://example.org/root.qcow2"
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

[image.root2]
url = "https://example.org/root2.qcow2"
sha256 = "2222222222222222222222222222222222222222222222222222222222222222"

[image.vmlinuz]
url = "https://example.org/netinst.iso"
sha256 = "3333333333333333333333333333333333333333333333333333333333333333"
extract = "iso:/install/vmlinuz"

[guest.r1]
kind = "vm"
index = 5
kernel = "image:vmlinuz"
disks = [{ image = "root", size = "1G" }]
"#;

fn images_spec() -> Spec {
    berth_spec::parse(IMAGES, Format::Toml, Path::new("img.toml")).expect("parses")
}

#[test]
fn images_disks_and_seeds() {
    let before = desired(&images_spec());
    let vm = before.guests["r1"].vm.as_ref().expect("vm");
    assert_eq!(vm.disks[0].path, Path::new("disk0.qcow2"));
    assert!(vm.disks[0].managed());
    assert_eq!(vm.images.len(), 2, "only the images r1 uses");
    let obs = running(&before);
    assert!(
        plan(&before, &obs).is_empty(),
        "re-applying changes nothing"
    );

    // Another image behind the kernel: restart.
    let mut s = images_spec();
    s.image.get_mut("vmlinuz").expect("img").sha256 = Some("4".repeat(64));
    let p = plan(&desired(&s), &obs);
    assert_eq!(
        shape(&p),
        [("r1".into(), ActionKind::Restart, Impact::Restart)],
        "{p}"
    );
    assert!(p.to_string().contains("image.vmlinuz"), "{p}");

    // Another image behind the managed disk: replace, and the disk is named
    // as deleted (apply refuses it without --allow-disruption).
    let mut s = images_spec();
    g(&mut s, "r1").disks[0].image = Some("root2".into());
    let d = desired(&s);
    let p = plan(&d, &obs);
    assert_eq!(
        shape(&p),
        [("r1".into(), ActionKind::Replace, Impact::Replace)],
        "{p}"
    );
    assert_eq!(
        berth_plan::deleted_disks(action(&p, "r1"), &d, &obs),
        ["disk0.qcow2"]
    );
    assert!(p.to_string().contains("made anew"), "{p}");

    // A bigger size never recreates the disk; an index change replaces the
    // guest but keeps its disk.
    let mut s = images_spec();
    g(&mut s, "r1").disks[0].size = Some(ByteSize(2 << 30));
    g(&mut s, "r1").index = Some(6);
    let d = desired(&s);
    let p = plan(&d, &obs);
    assert_eq!(action(&p, "r1").kind, ActionKind::Replace);
    assert!(berth_plan::deleted_disks(action(&p, "r1"), &d, &obs).is_empty());

    // A seed change: restart. Removing the guest deletes its disks.
    let mut s = images_spec();
    g(&mut s, "r1").seed = Some(berth_spec::image::SeedSpec::Nocloud {
        user_data: Some("#cloud-config\n".into()),
        meta_data: None,
        network_config: None,
    });
    let p = plan(&desired(&s), &obs);
    assert_eq!(
        shape(&p),
        [("r1".into(), ActionKind::Restart, Impact::Restart)],
        "{p}"
    );
    let mut s = images_spec();
    s.guest.clear();
    let d = desired(&s);
    let p = plan(&d, &obs);
    assert_eq!(
        berth_plan::deleted_disks(action(&p, "r1"), &d, &obs),
        ["disk0.qcow2"]
    );
    assert!(action(&p, "r1").reason.contains("--allow-disruption"));
}

#[test]
fn image_reference_errors() {
    let mut s = images_spec();
    g(&mut s, "r1").initrd = Some("image:nope".into());
    g(&mut s, "r1").disks[0].size = None;
    s.image.get_mut("root2").expect("img").sha256 = None;
    let errs = berth_spec::validate(&s, Path::new("img.toml"), &NoProbe).expect_err("invalid");
    let text = berth_spec::format_errors(&errs);
    assert!(text.contains("image `nope` is not declared"), "{text}");
    assert!(text.contains("needs a `size`"), "{text}");
    assert!(text.contains("image.root2: give `sha256`"), "{text}");
    assert_eq!(errs.len(), 3, "{text}");
}
