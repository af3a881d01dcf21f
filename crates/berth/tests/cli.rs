//! CLI and API behaviour that needs no root: bad input, errors, schema,
//! OpenAPI conformance of a real (guest-less) daemon.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn berth(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("BERTH_STATE_DIR", dir.join("state"))
        .env("BERTH_SOCKET", dir.join("berth.sock"))
        .stdin(Stdio::null())
        .output()
        .expect("run berth")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    std::fs::create_dir_all(r.join("usr")).expect("mkdir");
    std::fs::create_dir_all(r.join("etc")).expect("mkdir");
    std::fs::write(r.join("etc/os-release"), "ID=test\n").expect("write");
    r
}

fn good_spec(dir: &Path) -> String {
    format!(
        "[host]\nuplink = \"lo\"\nsubnet4 = \"10.0.0.0/24\"\nsubnet6 = \"fd42:b:e:1::/64\"\nmax_guests = 64\n\n[guest.db1]\nkind = \"container\"\nindex = 2\nrootfs = \"{}\"\ncommand = [\"/bin/sh\", \"-c\", \"httpd -f -p 80 -h /www\"]\nmemory = \"128M\"\nautostart = true\n",
        rootfs(dir).display()
    )
}

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let child = Command::new(BIN)
            .arg("daemon")
            .env("BERTH_STATE_DIR", dir.join("state"))
            .env("BERTH_SOCKET", dir.join("berth.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        // Dropping `d` kills and reaps the daemon, also if it never came up.
        let d = Daemon {
            child,
            dir: dir.to_path_buf(),
        };
        for _ in 0..500 {
            if UnixStream::connect(dir.join("berth.sock")).is_ok() {
                return d;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("daemon did not start");
    }

    fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
        let mut s = UnixStream::connect(self.dir.join("berth.sock")).expect("connect");
        let body = body.unwrap_or("");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: berth\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let ctype = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, body.to_string(), ctype)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn validate_accepts_the_issue_example_in_toml_and_json() {
    let d = tempfile::tempdir().expect("tempdir");
    let toml = d.path().join("spec.toml");
    std::fs::write(&toml, good_spec(d.path())).expect("write");
    let o = berth(d.path(), &["validate", toml.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Same spec as JSON.
    let spec: toml::Value = toml::from_str(&good_spec(d.path())).expect("toml");
    let json = d.path().join("spec.json");
    std::fs::write(&json, serde_json::to_string(&spec).expect("json")).expect("write");
    let o = berth(
        d.path(),
        &["validate", "--json", json.to_str().expect("utf8")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json out");
    assert_eq!(v["ok"], true);
}

#[test]
fn validate_reports_every_error_at_once() {
    let d = tempfile::tempdir().expect("tempdir");
    let r = rootfs(d.path());
    let spec = format!(
        "[host]\nuplink = \"nosuchif0\"\nsubnet4 = \"10.0.0.0/28\"\nmax_guests = 64\n\n\
         [guest.a]\nkind = \"container\"\nindex = 2\nrootfs = \"{r}\"\nmemory = \"12Q\"\n",
        r = r.display()
    );
    let f = d.path().join("bad.toml");
    std::fs::write(&f, spec).expect("write");
    let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
    assert!(!o.status.success());
    // A bad size is a parse error: it is reported alone, with its line.
    assert!(stderr(&o).contains("12Q"), "{}", stderr(&o));

    let spec = format!(
        "[host]\nuplink = \"nosuchif0\"\nsubnet4 = \"10.0.0.0/28\"\nmax_guests = 64\n\n\
         [guest.a]\nkind = \"container\"\nindex = 2\nrootfs = \"{r}\"\n\n\
         [guest.b]\nkind = \"container\"\nindex = 2\nrootfs = \"/does/not/exist\"\n\n\
         [guest.c]\nkind = \"container\"\nindex = 0\nrootfs = \"{r}\"\nread_only = true\n",
        r = r.display()
    );
    std::fs::write(&f, spec).expect("write");
    let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
    assert!(!o.status.success());
    let e = stderr(&o);
    for want in [
        "nosuchif0",
        "10.0.0.0/28",
        "`a` and `b`",
        "index 0",
        "/does/not/exist",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert!(e.contains("bad.toml"), "errors name the file: {e}");
}

#[test]
fn unknown_field_names_the_line() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("u.toml");
    std::fs::write(
        &f,
        good_spec(d.path()).replace("autostart = true", "autostart = true\nmemroy = \"1G\""),
    )
    .expect("write");
    let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("memroy") && e.contains("u.toml:"), "{e}");
}

#[test]
fn commands_without_a_daemon_say_how_to_start_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let f = d.path().join("s.toml");
    std::fs::write(&f, good_spec(d.path())).expect("write");
    for args in [vec!["plan", f.to_str().expect("utf8")], vec!["ps"]] {
        let o = berth(d.path(), &args);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(
            e.contains("cannot reach the berth daemon") && e.contains("berth daemon"),
            "{e}"
        );
    }
}

#[test]
fn schema_is_json_schema_of_the_spec() {
    let d = tempfile::tempdir().expect("tempdir");
    let o = berth(d.path(), &["schema"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let text = v.to_string();
    assert!(text.contains("\"guest\"") && text.contains("\"host\""));
}

#[test]
fn daemon_refuses_a_socket_in_use_and_an_unwritable_state_dir() {
    let d = tempfile::tempdir().expect("tempdir");
    let _first = Daemon::start(d.path());
    let o = Command::new(BIN)
        .arg("daemon")
        .env("BERTH_STATE_DIR", d.path().join("state2"))
        .env("BERTH_SOCKET", d.path().join("berth.sock"))
        .output()
        .expect("second daemon");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("in use"), "{}", stderr(&o));
    assert!(
        !d.path().join("state2/berth.db").exists(),
        "a refused daemon must not create a store"
    );

    let file = d.path().join("plainfile");
    std::fs::write(&file, "").expect("write");
    let o = Command::new(BIN)
        .arg("daemon")
        .env("BERTH_STATE_DIR", file.join("state"))
        .env("BERTH_SOCKET", d.path().join("other.sock"))
        .output()
        .expect("daemon");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("state dir"), "{}", stderr(&o));
}

#[test]
fn apply_without_a_terminal_needs_yes_and_changes_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    let _daemon = Daemon::start(d.path());
    let f = d.path().join("s.toml");
    std::fs::write(&f, good_spec(d.path())).expect("write");
    let o = berth(d.path(), &["apply", f.to_str().expect("utf8")]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    let o = berth(d.path(), &["ps", "--json"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

#[test]
fn committed_openapi_matches_the_generated_one() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../openapi/berth.json"
    ))
    .expect("openapi/berth.json is committed (regenerate: berth openapi > openapi/berth.json)");
    let committed: serde_json::Value = serde_json::from_str(&committed).expect("json");
    assert_eq!(
        committed,
        berth_api::openapi(),
        "openapi/berth.json is stale: run `cargo run -p berth -- openapi > openapi/berth.json`"
    );
}

/// Checks `body` against the response schema the OpenAPI document gives for
/// `path`/`method`/`status`.
fn check(doc: &serde_json::Value, path: &str, method: &str, status: u16, ctype: &str, body: &str) {
    let resp = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(
        !resp.is_null(),
        "{method} {path} answered {status}, which the OpenAPI document does not list"
    );
    let media = if ctype.starts_with("application/x-ndjson") {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    let schema = &resp["content"][media]["schema"];
    assert!(
        !schema.is_null(),
        "{method} {path} {status}: no schema for {media} (got {ctype})"
    );
    let mut root = schema.clone();
    root["components"] = doc["components"].clone();
    let validator = jsonschema::validator_for(&root).expect("schema compiles");
    let values: Vec<serde_json::Value> = if media == "application/x-ndjson" {
        body.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("ndjson line"))
            .collect()
    } else {
        vec![
            serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {body}")),
        ]
    };
    for v in values {
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: {errors:?}\n{v}"
        );
    }
}

#[test]
fn running_server_conforms_to_openapi() {
    let d = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(d.path());
    let doc = berth_api::openapi();
    let spec: toml::Value = toml::from_str(&good_spec(d.path())).expect("toml");
    let req = serde_json::json!({ "spec": spec, "file": "spec.toml" }).to_string();
    let bad = serde_json::json!({ "spec": { "host": { "uplink": "lo", "subnet4": "10.0.0.0/24" }, "guest": { "x": { "kind": "container", "index": 0 } } } }).to_string();

    for (method, path, body, template) in [
        ("GET", "/v1/version", None, "/v1/version"),
        ("GET", "/v1/guests", None, "/v1/guests"),
        ("GET", "/v1/guests/nope", None, "/v1/guests/{name}"),
        (
            "POST",
            "/v1/guests/nope/start",
            None,
            "/v1/guests/{name}/start",
        ),
        ("DELETE", "/v1/guests/nope", None, "/v1/guests/{name}"),
        (
            "GET",
            "/v1/guests/nope/logs",
            None,
            "/v1/guests/{name}/logs",
        ),
        (
            "GET",
            "/v1/guests/nope/exec-tty?argv=%5B%22sh%22%5D",
            None,
            "/v1/guests/{name}/exec-tty",
        ),
        (
            "GET",
            "/v1/guests/nope/exec-tty?argv=nope",
            None,
            "/v1/guests/{name}/exec-tty",
        ),
        (
            "POST",
            "/v1/guests/nope/exec",
            Some("{\"argv\": [\"/bin/true\"]}"),
            "/v1/guests/{name}/exec",
        ),
        (
            "POST",
            "/v1/guests/nope/exec",
            Some("{\"argv\": []}"),
            "/v1/guests/{name}/exec",
        ),
        ("POST", "/v1/plan", Some(req.as_str()), "/v1/plan"),
        ("POST", "/v1/plan", Some("{\"spec\": 1}"), "/v1/plan"),
        ("POST", "/v1/plan", Some(bad.as_str()), "/v1/plan"),
        ("POST", "/v1/apply", Some(bad.as_str()), "/v1/apply"),
    ] {
        let (status, body, ctype) = daemon.http(method, path, body);
        check(
            &doc,
            template,
            &method.to_lowercase(),
            status,
            &ctype,
            &body,
        );
    }
    // The plan of a fresh host creates the guest.
    let (status, body, _) = daemon.http("POST", "/v1/plan", Some(&req));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"create\""), "{body}");
    let (status, body, _) = daemon.http("POST", "/v1/plan", Some(&bad));
    assert_eq!(status, 422, "{body}");
}

#[test]
fn daemon_tells_systemd_it_is_ready() {
    let d = tempfile::tempdir().expect("tempdir");
    let notify = d.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut child = Command::new(BIN)
        .arg("daemon")
        .env("BERTH_STATE_DIR", d.path().join("state"))
        .env("BERTH_SOCKET", d.path().join("berth.sock"))
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let mut buf = [0u8; 512];
    let got = sock.recv(&mut buf);
    // Ready means the API answers.
    let serving = UnixStream::connect(d.path().join("berth.sock")).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let msg = String::from_utf8_lossy(&buf[..got.expect("READY from the daemon")]).into_owned();
    assert!(
        msg.contains("READY=1") && msg.contains(&format!("MAINPID={}", child.id())),
        "{msg}"
    );
    assert!(serving, "READY=1 before the socket accepts connections");
}

/// VFIO against this host's real sysfs: a missing PCI address, and (where
/// the machine has PCI devices but no IOMMU, like CI) a device without an
/// IOMMU group, are clear errors from `berth validate`; a single-member
/// segment is a warning.
#[test]
fn vfio_and_segment_checks_against_the_real_host() {
    let d = tempfile::tempdir().expect("tempdir");
    let kernel = d.path().join("vmlinuz");
    std::fs::write(&kernel, b"").expect("write");
    let vm = |pci: &str| {
        format!(
            "[host]\nuplink = \"lo\"\nsubnet4 = \"10.0.0.0/24\"\n\n[guest.r1]\nkind = \"vm\"\nindex = 2\nmachine = \"q35\"\nkernel = \"{}\"\n[[guest.r1.nic]]\nmode = \"vfio\"\npci = \"{pci}\"\n",
            kernel.display()
        )
    };
    let f = d.path().join("vfio.toml");
    std::fs::write(&f, vm("0000:7f:1f.7")).expect("write");
    let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("field `nic[1].pci`: PCI device 0000:7f:1f.7 does not exist"),
        "{}",
        stderr(&o)
    );
    // A device of this machine with no IOMMU group (no IOMMU here).
    let no_group = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| !e.path().join("iommu_group").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned());
    if let Some(pci) = no_group {
        std::fs::write(&f, vm(&pci)).expect("write");
        let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains("has no IOMMU group") && stderr(&o).contains("intel_iommu=on"),
            "{}",
            stderr(&o)
        );
    }
    let seg = format!(
        "[host]\nuplink = \"lo\"\nsubnet4 = \"10.0.0.0/24\"\n\n[guest.db1]\nkind = \"container\"\nindex = 2\nrootfs = \"{}\"\n[[guest.db1.nic]]\nmode = \"segment\"\nsegment = \"sync\"\n",
        rootfs(d.path()).display()
    );
    std::fs::write(&f, seg).expect("write");
    let o = berth(d.path(), &["validate", f.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: segment `sync` has a single member (`db1`)"),
        "{}",
        stderr(&o)
    );
}

/// A `.nix` spec on a host without Nix: one clear error saying how to get
/// it, exit status 1, nothing applied (no daemon is even asked).
#[test]
fn nix_spec_without_nix_says_how_to_get_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = dir.path().join("spec.nix");
    std::fs::write(
        &spec,
        "{ host = { uplink = \"lo\"; subnet4 = \"10.0.0.0/24\"; }; }\n",
    )
    .expect("write");
    let spec = spec.to_str().expect("utf8");
    for cmd in [
        vec!["validate", spec],
        vec!["plan", spec],
        vec!["apply", "--yes", spec],
    ] {
        let o = Command::new(BIN)
            .args(&cmd)
            .env("PATH", dir.path())
            .env("BERTH_STATE_DIR", dir.path().join("state"))
            .env("BERTH_SOCKET", dir.path().join("berth.sock"))
            .stdin(Stdio::null())
            .output()
            .expect("run berth");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd:?}: {err}");
        assert!(
            err.contains("nix-instantiate not found") && err.contains("apt-get install nix-bin"),
            "{cmd:?}: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error")).count(),
            1,
            "one error: {err}"
        );
        assert_eq!(err.matches("nix-instantiate not found").count(), 1, "{err}");
        assert!(
            err.starts_with("error: cannot load") && !err.contains("not a valid spec"),
            "the spec was never looked at: {err}"
        );
    }
    assert!(!dir.path().join("state").exists(), "state was written");
}
