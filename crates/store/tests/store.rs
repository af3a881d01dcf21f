#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use berth_store::{
    GuestRecord, Phase, Resource, RunState, SCHEMA_VERSION, StepStatus, Store, StoreError,
};

fn guest(name: &str, index: u32) -> GuestRecord {
    GuestRecord {
        name: name.into(),
        kind: "container".into(),
        index,
        config_json: format!(r#"{{"name":"{name}"}}"#),
        run: RunState::Running,
        phase: Phase::Creating,
        generation: 1,
        updated_at: 0,
    }
}

fn res(kind: &str, name: &str, guest: Option<&str>) -> Resource {
    Resource {
        kind: kind.into(),
        name: name.into(),
        guest: guest.map(Into::into),
        detail: String::new(),
    }
}

#[test]
fn migrates_from_empty() {
    let s = Store::open_in_memory().unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    const { assert!(SCHEMA_VERSION >= 1) };
    assert!(s.latest_spec().unwrap().is_none());
    assert!(s.applied_generation().unwrap().is_none());
    assert!(s.host().unwrap().is_none());
    assert!(s.guests().unwrap().is_empty());
    assert!(s.unfinished_steps().unwrap().is_empty());

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("a/b/state");
    let s = Store::open(&state).unwrap();
    assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "state dir mode {mode:o}");
    let mode = std::fs::metadata(state.join("berth.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "db mode {mode:o}");
}

#[test]
fn reopen_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let (g1, plan) = {
        let s = Store::open(dir.path()).unwrap();
        let g1 = s.save_spec("a.toml", r#"{"v":1}"#).unwrap();
        let g2 = s.save_spec("a.toml", r#"{"v":2}"#).unwrap();
        assert!(g2 > g1);
        s.mark_applied(g1).unwrap();
        s.put_host(r#"{"uplink":"up0"}"#).unwrap();
        s.put_guest(&guest("web", 1)).unwrap();
        s.add_resource(&res("link", "bt-web", Some("web"))).unwrap();
        let plan = s.next_plan_id().unwrap();
        s.journal(plan, Some("web"), "net.link", StepStatus::Started, "")
            .unwrap();
        (g1, plan)
    };
    let s = Store::open(dir.path()).unwrap();
    let latest = s.latest_spec().unwrap().unwrap();
    assert_eq!(latest.spec_json, r#"{"v":2}"#);
    assert_eq!(latest.source, "a.toml");
    assert!(latest.created_at > 0);
    assert_eq!(s.spec(g1).unwrap().unwrap().spec_json, r#"{"v":1}"#);
    assert_eq!(s.applied_generation().unwrap(), Some(g1));
    assert_eq!(s.host().unwrap().as_deref(), Some(r#"{"uplink":"up0"}"#));
    assert_eq!(s.guest("web").unwrap().unwrap().index, 1);
    assert_eq!(s.resources(Some("web")).unwrap().len(), 1);
    assert_eq!(s.journal_entries(plan).unwrap().len(), 1);
    assert!(s.next_plan_id().unwrap() > plan);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    {
        let c = rusqlite::Connection::open(dir.path().join("berth.db")).unwrap();
        c.pragma_update(None, "user_version", 5).unwrap();
    }
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 5, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "state store schema v5 is newer than this berth (v{SCHEMA_VERSION}); upgrade berth"
        )
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn assert_not_writable(state: &Path) {
    let err = Store::open(state).unwrap_err();
    assert!(matches!(err, StoreError::NotWritable { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("state dir {} is not writable: ", state.display())),
        "{msg}"
    );
    assert!(
        msg.ends_with("; run as root or pass --state-dir / BERTH_STATE_DIR"),
        "{msg}"
    );
}

#[test]
fn not_writable_dir_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    // Works for root and others alike: a path under a regular file.
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert_not_writable(&file.join("state"));

    if !is_root() {
        // chmod does not stop root, so only meaningful for other users.
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o500)).unwrap();
        assert_not_writable(&ro);
        assert_not_writable(&ro.join("state"));
    }
}

#[test]
fn guest_upsert_list_delete_cascades_resources() {
    let s = Store::open_in_memory().unwrap();
    s.put_guest(&guest("web", 2)).unwrap();
    s.put_guest(&guest("db", 1)).unwrap();
    s.put_guest(&guest("app", 3)).unwrap();
    let names: Vec<_> = s.guests().unwrap().into_iter().map(|g| g.name).collect();
    assert_eq!(names, ["app", "db", "web"]);

    // Upsert replaces.
    let mut g = guest("web", 7);
    g.config_json = r#"{"mem":512}"#.into();
    g.generation = 3;
    s.put_guest(&g).unwrap();
    let got = s.guest("web").unwrap().unwrap();
    assert_eq!((got.index, got.generation), (7, 3));
    assert_eq!(got.config_json, r#"{"mem":512}"#);
    assert!(got.updated_at > 0);
    assert_eq!(s.guests().unwrap().len(), 3);

    s.set_phase("web", Phase::Ready).unwrap();
    s.set_run_state("web", RunState::Stopped).unwrap();
    let got = s.guest("web").unwrap().unwrap();
    assert_eq!((got.phase, got.run), (Phase::Ready, RunState::Stopped));
    assert!(matches!(
        s.set_phase("nope", Phase::Ready),
        Err(StoreError::NoSuchGuest(n)) if n == "nope"
    ));
    assert!(s.set_run_state("nope", RunState::Running).is_err());

    s.add_resource(&res("link", "bt-web0", Some("web")))
        .unwrap();
    s.add_resource(&res("cgroup", "berth/web", Some("web")))
        .unwrap();
    s.add_resource(&res("link", "bt-db0", Some("db"))).unwrap();
    s.add_resource(&res("nft_table", "berth", None)).unwrap();
    // Idempotent on (kind, name); detail updated.
    let mut again = res("link", "bt-web0", Some("web"));
    again.detail = "ifindex=9".into();
    s.add_resource(&again).unwrap();
    let web = s.resources(Some("web")).unwrap();
    assert_eq!(web.len(), 2);
    assert_eq!(web[0], again, "creation order kept");
    assert_eq!(s.resources(None).unwrap().len(), 4);

    s.delete_guest("web").unwrap();
    assert!(s.guest("web").unwrap().is_none());
    assert!(s.resources(Some("web")).unwrap().is_empty());
    let left: Vec<_> = s
        .resources(None)
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(left, ["bt-db0", "berth"]);
    s.delete_guest("web").unwrap(); // idempotent

    s.remove_resource("link", "bt-db0").unwrap();
    s.remove_resource("link", "bt-db0").unwrap();
    assert_eq!(s.resources(None).unwrap().len(), 1);
}

#[test]
fn host_and_specs() {
    let s = Store::open_in_memory().unwrap();
    s.put_host("{}").unwrap();
    s.put_host(r#"{"a":1}"#).unwrap();
    assert_eq!(s.host().unwrap().as_deref(), Some(r#"{"a":1}"#));
    s.delete_host().unwrap();
    s.delete_host().unwrap();
    assert!(s.host().unwrap().is_none());

    assert!(matches!(
        s.mark_applied(42),
        Err(StoreError::NoSuchGeneration(42))
    ));
    let g = s.save_spec("api", "{}").unwrap();
    s.mark_applied(g).unwrap();
    let g2 = s.save_spec("api", "{}").unwrap();
    assert_eq!(s.applied_generation().unwrap(), Some(g));
    s.mark_applied(g2).unwrap();
    assert_eq!(s.applied_generation().unwrap(), Some(g2));
    assert_eq!(s.latest_spec().unwrap().unwrap().generation, g2);
}

#[test]
fn journal_and_unfinished_steps() {
    let s = Store::open_in_memory().unwrap();
    let p1 = s.next_plan_id().unwrap();
    let p2 = s.next_plan_id().unwrap();
    assert!(p2 > p1);
    use StepStatus::*;
    // plan 1: a finished, b failed and undone, c crashed mid-step,
    // d crashed mid-undo, host-level step crashed.
    for (g, step, st) in [
        (Some("web"), "net.link", Started),
        (Some("web"), "net.link", Done),
        (Some("web"), "fs.dir", Started),
        (Some("web"), "fs.dir", Failed),
        (Some("web"), "net.link", UndoStarted),
        (Some("web"), "net.link", UndoDone),
        (Some("db"), "net.link", Started),
        (Some("app"), "net.link", Started),
        (Some("app"), "net.link", Done),
        (Some("app"), "net.link", UndoStarted),
        (None, "nft.table", Started),
    ] {
        s.journal(p1, g, step, st, "x").unwrap();
    }
    // plan 2: same step name for the same guest, finished; must not hide
    // plan 1's unfinished one.
    s.journal(p2, Some("db"), "net.link", Started, "").unwrap();
    s.journal(p2, Some("db"), "net.link", Done, "").unwrap();
    // null guest groups with null guest
    s.journal(p2, None, "nft.table", Started, "").unwrap();
    s.journal(p2, None, "nft.table", Done, "").unwrap();

    let entries = s.journal_entries(p1).unwrap();
    assert_eq!(entries.len(), 11);
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(entries[0].status, Started);
    assert_eq!(entries[0].detail, "x");
    assert_eq!(entries[0].guest.as_deref(), Some("web"));
    assert!(entries[0].at > 0);
    assert_eq!(s.journal_entries(p2).unwrap().len(), 4);

    let unfinished: Vec<_> = s
        .unfinished_steps()
        .unwrap()
        .into_iter()
        .map(|e| (e.plan_id, e.guest, e.step, e.status))
        .collect();
    assert_eq!(
        unfinished,
        [
            (p1, Some("db".to_string()), "net.link".to_string(), Started),
            (
                p1,
                Some("app".to_string()),
                "net.link".to_string(),
                UndoStarted
            ),
            (p1, None, "nft.table".to_string(), Started),
        ]
    );
}

#[test]
fn enums_round_trip() {
    for s in StepStatus::ALL {
        assert_eq!(s.to_string().parse::<StepStatus>().unwrap(), *s);
        let json = serde_json::to_string(s).unwrap();
        assert_eq!(json, format!("\"{s}\""));
    }
    assert_eq!(
        "undo_done".parse::<StepStatus>().unwrap(),
        StepStatus::UndoDone
    );
    for p in Phase::ALL {
        assert_eq!(p.to_string().parse::<Phase>().unwrap(), *p);
    }
    for r in RunState::ALL {
        assert_eq!(r.to_string().parse::<RunState>().unwrap(), *r);
    }
    assert_eq!(
        "paused".parse::<RunState>().unwrap_err().to_string(),
        "unknown run state `paused`"
    );
}

#[test]
fn concurrent_use_from_two_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();

    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(dir.path()).unwrap());
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for i in 0..100 {
                    let name = format!("g{t}-{i:03}");
                    s.put_guest(&guest(&name, i)).unwrap();
                    s.add_resource(&res("dir", &name, Some(&name))).unwrap();
                    let plan = s.next_plan_id().unwrap();
                    s.journal(plan, Some(&name), "x", StepStatus::Done, "")
                        .unwrap();
                    ids.push(plan);
                }
                ids
            })
        })
        .collect();
    let mut ids: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(s.guests().unwrap().len(), 200);
    assert_eq!(s.resources(None).unwrap().len(), 200);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "plan ids are unique");
}

#[test]
fn two_stores_on_one_db() {
    // Two connections (as daemon and a CLI would have) share the WAL database.
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(dir.path()).unwrap();
    let b = Store::open(dir.path()).unwrap();
    let t = std::thread::spawn({
        let path = dir.path().to_path_buf();
        move || {
            let c = Store::open(&path).unwrap();
            for i in 0..50 {
                c.put_guest(&guest(&format!("c{i}"), i)).unwrap();
            }
        }
    });
    for i in 0..50 {
        a.put_guest(&guest(&format!("a{i}"), i)).unwrap();
    }
    t.join().unwrap();
    assert_eq!(b.guests().unwrap().len(), 100);
}

#[test]
fn kv_round_trip() {
    let s = Store::open_in_memory().unwrap();
    assert_eq!(s.kv("a").unwrap(), None);
    s.set_kv("drain/web-0", "1").unwrap();
    s.set_kv("drain/web-1", "1").unwrap();
    s.set_kv("apply", "7").unwrap();
    s.set_kv("apply", "8").unwrap();
    assert_eq!(s.kv("apply").unwrap().as_deref(), Some("8"));
    let d = s.kv_prefix("drain/").unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].0, "drain/web-0");
    s.delete_kv("drain/web-0").unwrap();
    s.delete_kv("nothing").unwrap();
    assert_eq!(s.kv_prefix("drain/").unwrap().len(), 1);
}
