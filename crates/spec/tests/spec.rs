//! Parsing, loading, schema and validation tests for berth-spec.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use berth_spec::{
    ByteSize, Format, GuestKind, HostProbe, NoProbe, RestartPolicy, Spec, SpecError, format_errors,
    json_schema, load, parse, validate,
};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

const FILE: &str = "/etc/berth/spec.toml";

/// A host with one rootfs, `/r`, that has /usr and /etc/os-release, and
/// interfaces `eth0` and `lo`.
struct Fake {
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    ifaces: Option<BTreeSet<String>>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            dirs: ["/r", "/r/usr", "/bare", "/half"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            files: ["/r/etc/os-release", "/file", "/half/usr"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            ifaces: Some(["eth0", "lo"].iter().map(|s| s.to_string()).collect()),
        }
    }
}

impl HostProbe for Fake {
    fn is_dir(&self, p: &Path) -> bool {
        self.dirs.contains(p)
    }
    fn exists(&self, p: &Path) -> bool {
        self.dirs.contains(p) || self.files.contains(p)
    }
    fn interface_exists(&self, name: &str) -> Option<bool> {
        self.ifaces.as_ref().map(|s| s.contains(name))
    }
    fn host_cpus(&self) -> Option<Vec<usize>> {
        Some(vec![0, 1, 2, 3])
    }
    fn kvm(&self) -> Option<Result<(), String>> {
        Some(Err("/dev/kvm: no such file".into()))
    }
}

const BASE: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"
subnet6 = "fd42:b:e:1::/64"

[guest.db1]
kind = "container"
index = 2
rootfs = "/r"
"#;

fn spec(text: &str) -> Spec {
    match parse(text, Format::Toml, Path::new(FILE)) {
        Ok(s) => s,
        Err(e) => panic!("parse failed: {e}\n{text}"),
    }
}

/// Validates and returns the error messages (panics if valid).
fn errors_of(s: &Spec) -> Vec<String> {
    match validate(s, Path::new(FILE), &Fake::new()) {
        Ok(d) => panic!("expected errors, got {d:?}"),
        Err(es) => es.iter().map(ToString::to_string).collect(),
    }
}

/// Applies `edit` to the base spec and asserts exactly one error containing
/// every needle.
fn assert_one_error(edit: impl FnOnce(&mut Spec), needles: &[&str]) {
    let mut s = spec(BASE);
    edit(&mut s);
    let errs = errors_of(&s);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "{:?} lacks {n:?}", errs[0]);
    }
    assert!(
        errs[0].starts_with(FILE),
        "{:?} should name the file",
        errs[0]
    );
}

fn db1(s: &mut Spec) -> &mut berth_spec::GuestSpec {
    s.guest.get_mut("db1").expect("db1 in base spec")
}

// ---------------------------------------------------------------- parsing

#[test]
fn example_toml_and_json_parse_to_the_same_spec() {
    let t = load(&data("example.toml")).expect("toml");
    let j = load(&data("example.json")).expect("json");
    assert_eq!(t, j);
    let db1 = &t.guest["db1"];
    assert_eq!(db1.kind, GuestKind::Container);
    assert_eq!(db1.memory, Some(ByteSize(128 << 20)));
    assert_eq!(db1.cpus, Some(1.5));
    assert_eq!(db1.restart, Some(RestartPolicy::OnFailure));
    assert_eq!(db1.env.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(t.host.max_guests, 64);
}

#[test]
fn example_validates_with_defaults_and_addresses() {
    let s = load(&data("example.toml")).expect("load");
    let d = validate(&s, &data("example.toml"), &NoProbe).expect("valid");
    let db1 = &d.guests["db1"];
    assert_eq!(db1.link, "vb2");
    assert_eq!(db1.addr4, Ipv4Addr::new(10, 0, 0, 2));
    assert_eq!(db1.host4, Ipv4Addr::new(10, 0, 0, 0));
    assert_eq!(
        db1.addr6,
        Some("fd42:b:e:1::2".parse::<Ipv6Addr>().expect("v6"))
    );
    assert_eq!(
        db1.host6,
        Some("fd42:b:e:1::".parse::<Ipv6Addr>().expect("v6"))
    );
    assert_eq!(db1.addresses(), vec!["10.0.0.2", "fd42:b:e:1::2"]);
    assert_eq!(db1.memory, Some(128 << 20));
    assert_eq!(db1.stop_timeout_ms, 10_000);

    let web = &d.guests["web"];
    assert_eq!(web.addresses(), vec!["10.0.0.26", "fd42:b:e:1::1a"]);
    assert_eq!(web.link, "vb26");
    assert_eq!(web.command, vec!["/sbin/init"]);
    assert!(web.autostart);
    assert_eq!(web.restart, RestartPolicy::OnFailure);
    assert_eq!(web.stop_timeout_ms, 10_000);
    assert_eq!(web.memory, None);

    // Desired round-trips through JSON (the store saves it).
    let j = serde_json::to_string(&d).expect("ser");
    let back: berth_spec::Desired = serde_json::from_str(&j).expect("de");
    assert_eq!(back, d);
}

#[test]
fn no_subnet6_means_v4_only() {
    let s = spec(
        r#"
[host]
uplink = "eth0"
subnet4 = "192.168.7.0/24"
[guest.a]
kind = "container"
index = 5
rootfs = "/r"
"#,
    );
    let d = validate(&s, Path::new(FILE), &Fake::new()).expect("valid");
    let a = &d.guests["a"];
    assert_eq!(a.addresses(), vec!["192.168.7.5"]);
    assert_eq!(a.addr6, None);
    assert_eq!(a.host6, None);
}

#[test]
fn spec_round_trips_through_toml_and_json() {
    let s = load(&data("example.toml")).expect("load");
    let t = toml::to_string(&s).expect("toml ser");
    assert_eq!(
        parse(&t, Format::Toml, Path::new("x.toml")).expect("toml de"),
        s
    );
    let j = serde_json::to_string_pretty(&s).expect("json ser");
    assert_eq!(
        parse(&j, Format::Json, Path::new("x.json")).expect("json de"),
        s
    );
}

fn parse_err(text: &str, format: Format) -> (usize, usize, String) {
    match parse(text, format, Path::new("s")) {
        Err(SpecError::Parse {
            line,
            column,
            message,
            ..
        }) => (line, column, message),
        other => panic!("expected parse error, got {other:?}"),
    }
}

#[test]
fn unknown_fields_rejected_with_position() {
    // top level
    let (line, _, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n\n[hosts]\nx = 1\n",
        Format::Toml,
    );
    assert_eq!(line, 5, "{msg}");
    assert!(msg.contains("unknown field `hosts`"), "{msg}");
    assert!(msg.contains("expected"), "{msg}");
    // host
    let (line, col, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\nsubnet = \"x\"\n",
        Format::Toml,
    );
    assert_eq!((line, col), (4, 1), "{msg}");
    assert!(msg.contains("unknown field `subnet`"), "{msg}");
    assert!(msg.contains("subnet4"), "{msg}");
    // guest
    let (line, _, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n[guest.a]\nkind = \"container\"\nindex = 1\nfoo = 2\n",
        Format::Toml,
    );
    assert_eq!(line, 7, "{msg}");
    assert!(msg.contains("unknown field `foo`"), "{msg}");
    // JSON
    let (line, _, msg) = parse_err(
        "{\"host\": {\"uplink\": \"eth0\",\n \"subnet4\": \"10.0.0.0/24\",\n \"bogus\": 1}}",
        Format::Json,
    );
    assert_eq!(line, 3, "{msg}");
    assert!(msg.contains("unknown field `bogus`"), "{msg}");
    assert!(!msg.contains("at line"), "position is not repeated: {msg}");
}

#[test]
fn parse_error_display_is_file_line_column() {
    let e = load(&data("unknown-guest-field.toml")).expect_err("unknown field");
    let s = e.to_string();
    let want = format!(
        "{}:9:1: unknown field `memroy`",
        data("unknown-guest-field.toml").display()
    );
    assert!(s.starts_with(&want), "{s}");
}

#[test]
fn bad_size_is_a_parse_error_naming_the_value() {
    let e = load(&data("bad-size.json")).expect_err("bad size");
    let s = e.to_string();
    assert!(s.contains("bad-size.json:4:"), "{s}");
    assert!(
        s.contains(
            r#"invalid size "12Q": use a number with an optional K, M, G or T suffix, e.g. "128M""#
        ),
        "{s}"
    );
    let (line, _, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n[guest.a]\nkind = \"container\"\nindex = 1\nmemory = \"lots\"\n",
        Format::Toml,
    );
    assert_eq!(line, 7);
    assert!(msg.contains(r#"invalid size "lots""#), "{msg}");
}

#[test]
fn bad_enum_values_are_parse_errors() {
    let (_, _, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n[guest.a]\nkind = \"jail\"\nindex = 1\n",
        Format::Toml,
    );
    assert!(msg.contains("jail") && msg.contains("container"), "{msg}");
    let (_, _, msg) = parse_err(
        "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n[guest.a]\nkind = \"container\"\nindex = 1\nrestart = \"sometimes\"\n",
        Format::Toml,
    );
    assert!(msg.contains("on-failure"), "{msg}");
}

#[test]
fn missing_host_is_a_parse_error() {
    let (_, _, msg) = parse_err("[guest.a]\nkind = \"container\"\nindex = 1\n", Format::Toml);
    assert!(msg.contains("missing field `host`"), "{msg}");
}

#[test]
fn extensions() {
    let e = load(&data("spec.yaml")).expect_err("yaml");
    let s = e.to_string();
    assert!(
        s.contains("spec.yaml") && s.contains(".toml") && s.contains(".json"),
        "{s}"
    );
    let e = load(Path::new("/nonexistent/berth")).expect_err("no ext");
    assert!(e.to_string().contains(".toml"), "{e}");
    assert_eq!(
        Format::from_path(Path::new("A.TOML")).ok(),
        Some(Format::Toml)
    );
}

#[test]
fn io_error_names_path_and_cause() {
    let p = data("does-not-exist.toml");
    let e = load(&p).expect_err("missing");
    assert!(matches!(e, SpecError::Io { .. }));
    let s = e.to_string();
    assert!(s.contains(&p.display().to_string()), "{s}");
    assert!(s.contains("No such file"), "{s}");
}

#[test]
fn schema_describes_spec() {
    let v = json_schema();
    let s = v.to_string();
    assert!(s.contains("\"guest\""), "{s}");
    assert!(s.contains("\"host\""), "{s}");
    assert!(s.contains("ByteSize"), "{s}");
    assert!(s.contains("on-failure"), "{s}");
    assert_eq!(v["additionalProperties"], serde_json::json!(false));
}

// ---------------------------------------------------------------- validation

#[test]
fn base_spec_is_valid() {
    validate(&spec(BASE), Path::new(FILE), &Fake::new()).expect("valid");
}

#[test]
fn guest_names() {
    for bad in ["Db1", "-db", "db_1", "db.1", "", &"a".repeat(33)] {
        let mut s = spec(BASE);
        let g = s.guest.remove("db1").expect("db1");
        s.guest.insert(bad.to_string(), g);
        let errs = errors_of(&s);
        assert_eq!(errs.len(), 1, "{bad}: {errs:#?}");
        assert!(errs[0].contains("field `name`"), "{}", errs[0]);
        assert!(
            errs[0].contains("1-32 characters of a-z, 0-9 and '-'"),
            "{}",
            errs[0]
        );
    }
    for good in ["a", "0", "db-1", &"a".repeat(32)] {
        let mut s = spec(BASE);
        let g = s.guest.remove("db1").expect("db1");
        s.guest.insert(good.to_string(), g);
        validate(&s, Path::new(FILE), &Fake::new()).expect(good);
    }
}

#[test]
fn uplink_rules() {
    assert_one_error(
        |s| s.host.uplink.clear(),
        &["host.uplink:", "must name the interface"],
    );
    assert_one_error(
        |s| s.host.uplink = "eth9".into(),
        &["host.uplink: interface `eth9` does not exist on this host (list them with `ip link`)"],
    );
    assert_one_error(
        |s| s.host.uplink = "a/b".into(),
        &["host.uplink:", "not a valid interface name"],
    );
    // Unknown interfaces are fine when the probe cannot tell.
    let mut s = spec(BASE);
    s.host.uplink = "eth9".into();
    let mut probe = Fake::new();
    probe.ifaces = None;
    validate(&s, Path::new(FILE), &probe).expect("probe cannot tell");
    validate(&s, Path::new(FILE), &NoProbe).expect("NoProbe");
}

#[test]
fn subnet4_rules() {
    assert_one_error(
        |s| s.host.subnet4 = "10.0.0.0".into(),
        &["host.subnet4:", "not an IPv4 network", "\"10.0.0.0/24\""],
    );
    assert_one_error(
        |s| s.host.subnet4 = "fd00::/64".into(),
        &["host.subnet4:", "CIDR"],
    );
    assert_one_error(
        |s| s.host.subnet4 = "10.0.0.5/24".into(),
        &["host.subnet4: 10.0.0.5/24 has host bits set; use 10.0.0.0/24"],
    );
    assert_one_error(
        |s| s.host.subnet4 = "10.0.0.0/28".into(),
        &[
            "host.subnet4: 10.0.0.0/28 holds 15 guest addresses but max_guests is 64; use a /25 or larger, or lower max_guests",
        ],
    );
    // A /26 holds 63; max_guests 63 fits exactly (indexes 1..62).
    let mut s = spec(BASE);
    s.host.subnet4 = "10.0.0.0/26".into();
    s.host.max_guests = 63;
    validate(&s, Path::new(FILE), &Fake::new()).expect("/26 with 63");
}

#[test]
fn subnet6_rules() {
    assert_one_error(
        |s| s.host.subnet6 = Some("fd42::".into()),
        &["host.subnet6:", "not an IPv6 network", "fd42:b:e:1::/64"],
    );
    assert_one_error(
        |s| s.host.subnet6 = Some("fd42::1/64".into()),
        &["host.subnet6: fd42::1/64 has host bits set; use fd42::/64"],
    );
    assert_one_error(
        |s| s.host.subnet6 = Some("fd42::/127".into()),
        &["host.subnet6:", "/126 or shorter"],
    );
    assert_one_error(
        |s| s.host.subnet6 = Some("fd42::/124".into()),
        &[
            "host.subnet6: fd42::/124 holds 15 guest addresses but max_guests is 64; use a /121 or larger",
        ],
    );
}

#[test]
fn max_guests_range() {
    assert_one_error(|s| s.host.max_guests = 0, &["host.max_guests:", "1..=4096"]);
    assert_one_error(
        |s| s.host.max_guests = 5000,
        &["host.max_guests: 5000", "1..=4096"],
    );
}

#[test]
fn index_rules() {
    assert_one_error(
        |s| db1(s).index = Some(0),
        &[
            "guest `db1`: field `index`: index 0 is the host's address on every guest link; use 1..63",
        ],
    );
    assert_one_error(
        |s| db1(s).index = Some(64),
        &["guest `db1`: field `index`: index 64 is out of range; use 1..63"],
    );
    assert_one_error(
        |s| {
            s.host.max_guests = 10;
            db1(s).index = Some(12);
        },
        &["index 12 is out of range; use 1..9", "max_guests is 10"],
    );
}

#[test]
fn index_clash_is_one_error_naming_both() {
    let mut s = spec(BASE);
    // Both read-only, so sharing the rootfs is fine and only the index clashes.
    db1(&mut s).read_only = Some(true);
    let g = s.guest["db1"].clone();
    s.guest.insert("app".into(), g);
    let errs = validate(&s, Path::new(FILE), &Fake::new()).expect_err("clash");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    match &errs[0] {
        SpecError::IndexClash { a, b, index, .. } => {
            assert_eq!((a.as_str(), b.as_str(), *index), ("app", "db1", 2));
        }
        e => panic!("expected clash, got {e}"),
    }
    assert!(
        errs[0]
            .to_string()
            .contains("guests `app` and `db1` both use index 2"),
        "{}",
        errs[0]
    );
}

/// db1 turned into a valid microvm (Fake knows /file as an existing file).
fn make_vm(s: &mut Spec) {
    let g = db1(s);
    g.kind = GuestKind::Vm;
    g.rootfs = None;
    g.kernel = Some("/file".into());
}

#[test]
fn vm_guest_validates_with_defaults() {
    let mut s = spec(BASE);
    make_vm(&mut s);
    let d = validate(&s, Path::new(FILE), &Fake::new()).expect("valid vm");
    let g = &d.guests["db1"];
    let vm = g.vm.as_ref().expect("vm part");
    assert_eq!((vm.vcpus, vm.memory_mib), (1, 256));
    assert_eq!(g.memory, Some(256 << 20));
    assert!(vm.ip_cmdline);
    assert_eq!(vm.machine, berth_spec::vm::Machine::Microvm);
}

#[test]
fn vm_rules() {
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).kernel = None;
        },
        &["field `kernel`: a microvm boots a kernel directly"],
    );
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).kernel = Some("/nope/vmlinuz".into());
        },
        &["kernel /nope/vmlinuz does not exist"],
    );
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).disks = vec![berth_spec::vm::DiskSpec {
                path: Some("/nope.img".into()),
                image: None,
                size: None,
                format: None,
                readonly: None,
            }];
        },
        &["disk /nope.img does not exist; give it a `size`"],
    );
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).cpus = Some(1.5);
        },
        &["whole number of vCPUs"],
    );
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).command = Some(vec!["/bin/sh".into()]);
        },
        &["`command` applies to containers"],
    );
    assert_one_error(
        |s| db1(s).kernel = Some("/file".into()),
        &["`kernel` applies to VMs"],
    );
}

#[test]
fn vm_exclusive_pinning_clash_names_both() {
    let mut s = spec(BASE);
    make_vm(&mut s);
    db1(&mut s).cpu_pinning = Some(vec![0, 1]);
    db1(&mut s).exclusive = Some(true);
    let mut other = s.guest["db1"].clone();
    other.index = Some(3);
    other.exclusive = None;
    other.cpu_pinning = Some(vec![1]);
    s.guest.insert("r2".into(), other);
    let errs = errors_of(&s);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("CPU 1 is pinned by both `db1` and `r2`"),
        "{errs:?}"
    );
}

#[test]
fn rootfs_rules() {
    assert_one_error(
        |s| db1(s).rootfs = None,
        &["field `rootfs`: a container needs a rootfs"],
    );
    assert_one_error(
        |s| db1(s).rootfs = Some("r".into()),
        &["field `rootfs`: rootfs r must be an absolute path"],
    );
    assert_one_error(
        |s| db1(s).rootfs = Some("/nope".into()),
        &["field `rootfs`: rootfs /nope does not exist or is not a directory"],
    );
    assert_one_error(
        |s| db1(s).rootfs = Some("/file".into()),
        &["rootfs /file does not exist or is not a directory"],
    );
    assert_one_error(
        |s| db1(s).rootfs = Some("/bare".into()),
        &["rootfs /bare has no /usr and /etc/os-release; systemd-nspawn needs"],
    );
    assert_one_error(
        |s| db1(s).rootfs = Some("/half".into()),
        &["rootfs /half has no /etc/os-release;"],
    );
}

#[test]
fn command_rules() {
    assert_one_error(
        |s| db1(s).command = Some(vec![]),
        &["field `command`: command is empty", "/sbin/init"],
    );
    assert_one_error(
        |s| db1(s).command = Some(vec![String::new(), "x".into()]),
        &["field `command`: the first element (the program to run) is empty"],
    );
}

#[test]
fn memory_minimum() {
    assert_one_error(
        |s| db1(s).memory = Some(ByteSize(1 << 20)),
        &["field `memory`: memory 1M is too small; use at least 4M"],
    );
    let mut s = spec(BASE);
    db1(&mut s).memory = Some(ByteSize(4 << 20));
    validate(&s, Path::new(FILE), &Fake::new()).expect("4M is enough");
}

#[test]
fn cpus_rules() {
    for bad in [0.0, -1.0, 1024.5, f64::NAN, f64::INFINITY] {
        assert_one_error(
            |s| db1(s).cpus = Some(bad),
            &["field `cpus`:", "out of range"],
        );
    }
    for good in [0.01, 1.5, 1024.0] {
        let mut s = spec(BASE);
        db1(&mut s).cpus = Some(good);
        validate(&s, Path::new(FILE), &Fake::new()).expect("cpus ok");
    }
}

#[test]
fn stop_timeout_rules() {
    assert_one_error(
        |s| db1(s).stop_timeout = Some("10".into()),
        &[
            "field `stop_timeout`: invalid duration \"10\"",
            "\"500ms\", \"10s\", \"2m\"",
        ],
    );
    assert_one_error(
        |s| db1(s).stop_timeout = Some("soon".into()),
        &["invalid duration \"soon\""],
    );
    assert_one_error(
        |s| db1(s).stop_timeout = Some("0s".into()),
        &["stop_timeout \"0s\" is out of range; use 1ms..1h"],
    );
    assert_one_error(
        |s| db1(s).stop_timeout = Some("2h".into()),
        &["out of range; use 1ms..1h"],
    );
    for (t, ms) in [
        ("500ms", 500),
        ("10s", 10_000),
        ("2m", 120_000),
        ("1h", 3_600_000),
    ] {
        let mut s = spec(BASE);
        db1(&mut s).stop_timeout = Some(t.into());
        let d = validate(&s, Path::new(FILE), &Fake::new()).expect(t);
        assert_eq!(d.guests["db1"].stop_timeout_ms, ms);
    }
}

#[test]
fn env_rules() {
    assert_one_error(
        |s| {
            db1(s).env.insert(String::new(), "x".into());
        },
        &["field `env`: environment variable names must not be empty"],
    );
    assert_one_error(
        |s| {
            db1(s).env.insert("A=B".into(), "x".into());
        },
        &["field `env`:", "\"A=B\" must not contain '=' or NUL"],
    );
    assert_one_error(
        |s| {
            db1(s).env.insert("A\0".into(), "x".into());
        },
        &["must not contain '=' or NUL"],
    );
}

#[test]
fn all_errors_reported_at_once() {
    let mut s = spec(BASE);
    s.host.uplink = "eth9".into();
    s.host.subnet4 = "10.0.0.5/24".into();
    {
        let g = db1(&mut s);
        g.memory = Some(ByteSize(1024));
        g.cpus = Some(0.0);
        g.stop_timeout = Some("x".into());
        g.rootfs = Some("/nope".into());
    }
    let mut other = s.guest["db1"].clone();
    other.index = Some(0);
    s.guest.insert("Bad".into(), other);
    let errs = validate(&s, Path::new(FILE), &Fake::new()).expect_err("many");
    let text = format_errors(&errs);
    eprintln!("{text}");
    for needle in [
        "host.uplink:",
        "host.subnet4:",
        "guest `db1`: field `memory`",
        "guest `db1`: field `cpus`",
        "guest `db1`: field `stop_timeout`",
        "guest `db1`: field `rootfs`",
        "guest `Bad`: field `name`",
        "guest `Bad`: field `index`",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert_eq!(text.lines().count(), errs.len());
    assert!(text.lines().all(|l| l.starts_with(FILE)), "{text}");
    assert!(errs.iter().any(|e| e.guest() == Some("db1")));
}

#[test]
fn shared_rootfs_needs_ephemeral_or_read_only() {
    let mut s = spec(BASE);
    let mut other = s.guest["db1"].clone();
    other.index = Some(3);
    s.guest.insert("db2".into(), other);
    let errs = errors_of(&s);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("also used by guest") && errs[0].contains("ephemeral = true"),
        "{errs:?}"
    );

    for g in s.guest.values_mut() {
        g.ephemeral = Some(true);
    }
    let ok = |s: &Spec| validate(s, Path::new(FILE), &Fake::new()).is_ok();
    assert!(ok(&s));
    s.guest.get_mut("db2").expect("db2").ephemeral = None;
    s.guest.get_mut("db2").expect("db2").read_only = Some(true);
    assert!(ok(&s), "ephemeral + read-only guests may share a rootfs");
}

#[test]
fn vm_host_checks_pinning_and_kvm() {
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).cpu_pinning = Some(vec![2, 9]);
        },
        &["CPU 9 does not exist on this host (online CPUs: 0, 1, 2, 3)"],
    );
    assert_one_error(
        |s| {
            make_vm(s);
            db1(s).accel = Some(berth_spec::vm::AccelChoice::Kvm);
        },
        &["accel = \"kvm\" but KVM is not usable here: /dev/kvm: no such file"],
    );
}

/// Whether `nix-instantiate` is here; without it the Nix tests skip out loud
/// (or fail when BERTH_E2E_REQUIRED=1, as in CI).
fn have_nix(test: &str) -> bool {
    let ok = std::process::Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("BERTH_E2E_REQUIRED").as_deref() != Ok("1"),
            "{test}: nix-instantiate not installed"
        );
        eprintln!("skip {test}: nix-instantiate not installed (apt-get install nix-bin)");
    }
    ok
}

#[test]
fn nix_toml_and_json_are_the_same_spec() {
    if !have_nix("nix_toml_and_json_are_the_same_spec") {
        return;
    }
    let toml = load(&data("example.toml")).expect("toml");
    let nix = load(&data("example.nix")).expect("nix");
    assert_eq!(toml, nix);
}

#[test]
fn nix_errors_name_file_and_line() {
    if !have_nix("nix_errors_name_file_and_line") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let syntax = dir.path().join("syntax.nix");
    std::fs::write(&syntax, "{ host = { uplink = \"eth0\"\n").expect("write");
    let e = load(&syntax).expect_err("syntax").to_string();
    assert!(
        e.contains("Nix evaluation failed") && e.contains("syntax.nix:1:"),
        "{e}"
    );
    let eval = dir.path().join("eval.nix");
    std::fs::write(&eval, "{ host.uplink = 1 + \"a\"; }\n").expect("write");
    let e = load(&eval).expect_err("eval").to_string();
    assert!(e.contains("eval.nix:1") && e.contains("cannot add"), "{e}");
    // Evaluates fine but is not a spec.
    let e = load(&data("spec.nix")).expect_err("not a spec").to_string();
    assert!(e.contains("spec.nix") && e.contains("missing field"), "{e}");
}

#[test]
fn backup_needs_a_command_and_age_recipients() {
    assert_one_error(
        |s| {
            db1(s).backup = Some(berth_spec::Backup {
                command: vec!["cat".into(), "/c".into()],
                restore_command: None,
                recipients: vec![],
            });
        },
        &["backup needs at least one age recipient"],
    );
    assert_one_error(
        |s| {
            db1(s).backup = Some(berth_spec::Backup {
                command: vec![],
                restore_command: None,
                recipients: vec!["age1".to_string() + &"q".repeat(58)],
            });
        },
        &["backup.command is empty"],
    );
    assert_one_error(
        |s| {
            db1(s).backup = Some(berth_spec::Backup {
                command: vec!["cat".into()],
                restore_command: None,
                recipients: vec!["ssh-rsa AAAA".into()],
            });
        },
        &["is not an age X25519 recipient"],
    );
}
