//! Groups: expansion into members and companions, and every bad input the
//! issue names, reported before anything changes.

use std::path::Path;

use berth_spec::{Format, NoProbe, Probe, Spec, VipMode, parse, validate};

const FILE: &str = "/etc/berth/spec.toml";

const BASE: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"
subnet6 = "fd42:b:e:1::/64"

[group.web]
replicas = 2
index_base = 10
vip4 = "10.0.1.10"
max_parallel = 1
min_available = 1

[group.web.template]
kind = "container"
rootfs = "/var/lib/berth/rootfs/busybox"
ephemeral = true
command = ["/bin/sh", "-c", "exec httpd -f -p 80 -h /www"]
health = { http = "http://{addr}:80/", expect = 200, interval = "200ms", timeout = "500ms", healthy_after = 2, unhealthy_after = 2 }
"#;

fn spec(text: &str) -> Spec {
    parse(text, Format::Toml, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn errors(text: &str) -> Vec<String> {
    match validate(&spec(text), Path::new(FILE), &NoProbe) {
        Ok(d) => panic!("expected errors, got {d:?}"),
        Err(es) => es.iter().map(ToString::to_string).collect(),
    }
}

fn one_error(text: &str, needles: &[&str]) {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "{:?} lacks {n:?}", errs[0]);
    }
}

#[test]
fn the_issue_example_expands_into_members() {
    let d = validate(&spec(BASE), Path::new(FILE), &NoProbe).expect("valid");
    let names: Vec<&String> = d.guests.keys().collect();
    assert_eq!(names, ["web-0", "web-1"]);
    let (w0, w1) = (&d.guests["web-0"], &d.guests["web-1"]);
    assert_eq!((w0.index, w1.index), (10, 11));
    assert_eq!(w0.addr4.to_string(), "10.0.0.10");
    assert_eq!(w0.group.as_deref(), Some("web"));
    assert_eq!(w0.vip4.map(|a| a.to_string()).as_deref(), Some("10.0.1.10"));
    let h = w0.health.as_ref().expect("health");
    assert_eq!(
        h.probe,
        Probe::Http {
            url: "http://{addr}:80/".into(),
            port: 80,
            path: "/".into(),
            expect: 200
        }
    );
    assert_eq!((h.interval_ms, h.timeout_ms), (200, 500));
    let g = &d.groups["web"];
    assert_eq!(g.members, ["web-0", "web-1"]);
    assert_eq!(g.mode, VipMode::Active);
    assert_eq!((g.max_parallel, g.min_available), (1, 1));
    assert!(g.auto_revert);
}

#[test]
fn companions_get_their_own_indexes() {
    let text = format!(
        "{BASE}\n[[group.web.template.companions]]\nname = \"db\"\nindex_base = 20\nkind = \"container\"\nrootfs = \"/r\"\nephemeral = true\n"
    );
    let d = validate(&spec(&text), Path::new(FILE), &NoProbe).expect("valid");
    let db1 = &d.guests["web-1-db"];
    assert_eq!(db1.index, 21);
    assert_eq!(db1.companion_of.as_deref(), Some("web-1"));
    assert!(db1.group.is_none() && db1.vip4.is_none());
}

#[test]
fn replicas_zero_is_an_empty_group() {
    let d = validate(
        &spec(
            &BASE
                .replace("replicas = 2", "replicas = 0\nmin_available = 0")
                .replace("min_available = 1\n", ""),
        ),
        Path::new(FILE),
        &NoProbe,
    )
    .expect("valid");
    assert!(d.guests.is_empty());
}

#[test]
fn two_groups_with_the_same_vip() {
    let other = BASE
        .replace(
            "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\nsubnet6 = \"fd42:b:e:1::/64\"\n",
            "",
        )
        .replace("group.web", "group.api")
        .replace("index_base = 10", "index_base = 20");
    let errs = errors(&format!("{BASE}\n{other}"));
    assert!(
        errs.iter()
            .any(|e| e.contains("10.0.1.10") && e.contains("also the service address")),
        "{errs:#?}"
    );
}

#[test]
fn vip_inside_the_guest_subnet() {
    one_error(
        &BASE.replace("10.0.1.10", "10.0.0.10"),
        &["group.web.vip4", "inside host.subnet4", "10.0.0.10"],
    );
}

#[test]
fn min_available_above_replicas() {
    one_error(
        &BASE.replace("min_available = 1", "min_available = 3"),
        &["min_available", "more than replicas"],
    );
}

#[test]
fn probes_that_cannot_be_parsed() {
    for (probe, needle) in [
        ("{ http = \"https://{addr}/\" }", "only http://"),
        ("{ http = \"http://10.0.0.1/\" }", "{addr}"),
        (
            "{ tcp = 80, http = \"http://{addr}/\" }",
            "exactly one probe",
        ),
        ("{ tcp = 80, interval = \"soon\" }", "invalid duration"),
        ("{ exec = [] }", "empty"),
        (
            "{ tcp = 80, expect = 200 }",
            "`expect` goes with an `http` probe",
        ),
        (
            "{ http = \"http://{addr}/\", expect = 42 }",
            "not an HTTP status",
        ),
    ] {
        let text = BASE.replace(
            "health = { http = \"http://{addr}:80/\", expect = 200, interval = \"200ms\", timeout = \"500ms\", healthy_after = 2, unhealthy_after = 2 }",
            &format!("health = {probe}"),
        );
        one_error(&text, &["health", needle]);
    }
    // Unknown probe kinds are parse errors naming the field.
    let text = BASE.replace("health = { http", "health = { grpc = 1, http");
    let e = parse(&text, Format::Toml, Path::new(FILE)).expect_err("unknown field");
    assert!(e.to_string().contains("grpc"), "{e}");
}

#[test]
fn member_index_clash_and_name_clash() {
    let text = format!("{BASE}\n[guest.db]\nkind = \"container\"\nindex = 11\nrootfs = \"/r\"\n");
    one_error(&text, &["index 11", "web-1"]);
    let text =
        format!("{BASE}\n[guest.web-1]\nkind = \"container\"\nindex = 40\nrootfs = \"/r\"\n");
    let errs = errors(&text);
    assert!(
        errs.iter().any(|e| e.contains("more than once")),
        "{errs:#?}"
    );
}

#[test]
fn template_and_guest_field_mistakes() {
    one_error(
        &BASE.replace(
            "kind = \"container\"\nrootfs",
            "kind = \"container\"\nindex = 3\nrootfs",
        ),
        &["template.index", "index_base"],
    );
    one_error(
        &format!("{BASE}\n[guest.x]\nkind = \"container\"\nrootfs = \"/r\"\n"),
        &["index", "needs an `index`"],
    );
    one_error(
        &format!(
            "{BASE}\n[guest.x]\nkind = \"container\"\nindex = 3\nrootfs = \"/r\"\nindex_base = 4\n"
        ),
        &["index_base", "group template"],
    );
    one_error(
        &BASE
            .replace("max_parallel = 1", "max_parallel = 0")
            .replace("min_available = 1\n", ""),
        &["max_parallel", "at least 1"],
    );
}
