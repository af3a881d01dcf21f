//! The NixOS module's pure translation (`nix/spec.nix`), evaluated with
//! `nix-instantiate` (Debian's `nix-bin` is enough: no nixpkgs needed).
//!
//! - every `nix/tests/<case>.nix` with a `nix/tests/expected/<case>.json`
//!   evaluates to that JSON (`@root@` in it stands for the fixture directory),
//!   and `berth validate` accepts the result;
//! - every `nix/tests/bad-*.nix` fails to evaluate with the message its first
//!   line names (`# expect-error: ...`);
//! - every `.nix` file in the repository parses (`nix-instantiate --parse`).
//!
//! The module itself (`nix/module.nix`) needs nixpkgs. With one
//! (`BERTH_NIXPKGS=/path/to/nixpkgs`, else `<nixpkgs>` from NIX_PATH; only
//! its `lib/` is needed) `nix/tests/module/eval.nix` evaluates it with
//! nixpkgs' module system (`lib.evalModules`):
//!
//! - each case above, given as `services.berth` options, makes the module
//!   write the case's expected JSON; a host with every kind of guest gets the
//!   units this module promises (`Type=notify`, `KillMode=process`,
//!   no `Delegate=` (guests live in scopes of their own), the apply unit on the spec file) and a spec that
//!   `berth validate` accepts; guests from `config` resolve to the paths of
//!   their (stand-in) builds; the flake's `nixosModules.default` sets the
//!   package; the option docs render;
//! - wrong types and unknown options fail naming the option, and failed
//!   assertions read as NixOS reports them;
//! - with a full nixpkgs (`nixos/lib/eval-config.nix`), a NixOS system with
//!   guests from `config` evaluates (nothing is built).
//!
//! Without nixpkgs (CI) those tests print `skip <test>: no nixpkgs: ...` and
//! pass, even under BERTH_E2E_REQUIRED=1. The flake's VM test needs a NixOS
//! machine with KVM. Without nix-instantiate the tests print
//! `skip <test>: ...` (and fail with BERTH_E2E_REQUIRED=1).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn nix_instantiate() -> Command {
    let mut c = Command::new("nix-instantiate");
    // Without a nixbld group Nix warns on every call; nothing is built here.
    c.env("NIX_CONFIG", "build-users-group =");
    c
}

/// False (after printing why) when nix-instantiate is missing; panics instead
/// under BERTH_E2E_REQUIRED=1.
fn have_nix(test: &str) -> bool {
    let found = nix_instantiate()
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let reason = "nix-instantiate not installed (apt-get install nix-bin)";
        if std::env::var("BERTH_E2E_REQUIRED").as_deref() == Ok("1") {
            panic!("{test}: {reason} (BERTH_E2E_REQUIRED=1)");
        }
        eprintln!("skip {test}: {reason}");
    }
    found
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn eval(case: &Path, root: &Path) -> Output {
    nix_instantiate()
        .args(["--eval", "--strict", "--json", "--argstr", "root"])
        .arg(root)
        .arg(case)
        .output()
        .expect("run nix-instantiate")
}

/// `nix/tests/*.nix`, sorted.
fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("nix/tests"))
        .expect("read nix/tests")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no cases in nix/tests");
    v
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// What the cases point at, so `berth validate` finds it: a rootfs with /usr
/// and /etc/os-release, kernel, initrd, an existing disk image and an ISO.
fn fixture() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path();
    std::fs::create_dir_all(p.join("rootfs/usr")).expect("mkdir usr");
    std::fs::create_dir_all(p.join("rootfs/etc")).expect("mkdir etc");
    std::fs::write(p.join("rootfs/etc/os-release"), "ID=test\n").expect("os-release");
    std::fs::create_dir_all(p.join("disks")).expect("mkdir disks");
    for f in ["vmlinuz", "initrd.img", "seed.img", "installer.iso"] {
        std::fs::write(p.join(f), b"").expect("write fixture file");
    }
    d
}

#[test]
fn translation_matches_expected_json_and_berth_accepts_it() {
    let test = "translation_matches_expected_json_and_berth_accepts_it";
    if !have_nix(test) {
        return;
    }
    let fx = fixture();
    let root = fx.path().to_str().expect("utf-8 temp path");
    let mut checked = 0;
    for case in cases() {
        let name = stem(&case);
        let expected = case.with_file_name(format!("expected/{name}.json"));
        if !expected.exists() {
            assert!(
                name.starts_with("bad-"),
                "{}: a case needs expected/{name}.json (or a bad- name)",
                case.display()
            );
            continue;
        }
        let out = eval(&case, fx.path());
        assert!(out.status.success(), "{name}: {}", text(&out));
        let got: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_text = std::fs::read_to_string(&expected)
            .expect("read expected")
            .replace("@root@", root);
        let want: serde_json::Value =
            serde_json::from_str(&want_text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            got,
            want,
            "{name}: nix/spec.nix gave\n{}",
            serde_json::to_string_pretty(&got).unwrap_or_default()
        );

        // berth takes it as it is (unknown fields would be rejected).
        let spec = fx.path().join(format!("{name}.json"));
        std::fs::write(&spec, &out.stdout).expect("write spec");
        let v = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("validate")
            .arg(&spec)
            .env_remove("BERTH_ACCEL")
            .output()
            .expect("run berth validate");
        assert!(v.status.success(), "{name}: berth validate: {}", text(&v));
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} cases with expected JSON");
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let test = "bad_input_fails_with_a_clear_message";
    if !have_nix(test) {
        return;
    }
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| stem(c).starts_with("bad-")) {
        let name = stem(&case);
        let src = std::fs::read_to_string(&case).expect("read case");
        let want = src
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect-error: "))
            .unwrap_or_else(|| panic!("{name}: first line must be `# expect-error: ...`"));
        let out = eval(&case, Path::new("/nonexistent"));
        assert!(!out.status.success(), "{name} evaluated: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(want),
            "{name}: expected {want:?} in the error: {}",
            text(&out)
        );
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} bad- cases");
}

/// Every .nix file under `dir` (skipping build output and VCS metadata).
fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("target") || name.starts_with('.') {
            continue;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let test = "every_nix_file_parses";
    if !have_nix(test) {
        return;
    }
    let mut files = Vec::new();
    nix_files(&repo(), &mut files);
    files.sort();
    for must in ["flake.nix", "nix/module.nix", "nix/spec.nix"] {
        assert!(
            files.iter().any(|f| f.ends_with(must)),
            "{must} not found among {files:?}"
        );
    }
    let mut bad = Vec::new();
    for f in &files {
        let out = nix_instantiate()
            .arg("--parse")
            .arg(f)
            .output()
            .expect("run nix-instantiate --parse");
        if !out.status.success() {
            bad.push(format!(
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(bad.is_empty(), "syntax errors:\n{}", bad.join("\n"));
    eprintln!(
        "parsed {} .nix files; the NixOS VM test (flake checks.vm-test) is not run here: \
         it needs nixpkgs and a NixOS machine with KVM",
        files.len()
    );
}

// --- nix/module.nix itself, with nixpkgs' module system -------------------

const NO_NIXPKGS: &str = "no nixpkgs: set BERTH_NIXPKGS=/path/to/nixpkgs to evaluate nix/module.nix with the real module system";

/// The nixpkgs `nix/tests/module/eval.nix` takes its `lib` from:
/// `BERTH_NIXPKGS`, else `<nixpkgs>` (`nix-instantiate --find-file nixpkgs`,
/// i.e. NIX_PATH). None when neither is there: CI has no nixpkgs, so these
/// tests print why they skip, even with BERTH_E2E_REQUIRED=1. A
/// BERTH_NIXPKGS without `lib/default.nix` is a mistake and fails.
fn nixpkgs() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BERTH_NIXPKGS").filter(|d| !d.is_empty()) {
        let given = PathBuf::from(dir);
        // Nix imports absolute paths only.
        let dir = std::fs::canonicalize(&given)
            .unwrap_or_else(|e| panic!("BERTH_NIXPKGS={}: {e}", given.display()));
        assert!(
            dir.join("lib/default.nix").exists(),
            "BERTH_NIXPKGS={} has no lib/default.nix",
            given.display()
        );
        return Some(dir);
    }
    let out = nix_instantiate()
        .args(["--find-file", "nixpkgs"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    dir.join("lib/default.nix").exists().then_some(dir)
}

/// nix-instantiate and a nixpkgs, or None after printing why the test skips.
fn module_eval_setup(test: &str) -> Option<PathBuf> {
    if !have_nix(test) {
        return None;
    }
    let found = nixpkgs();
    if found.is_none() {
        eprintln!("skip {test}: {NO_NIXPKGS}");
    }
    found
}

/// `nix/tests/module/eval.nix`'s attribute `attr`, evaluated strictly.
fn module_eval(nixpkgs: &Path, root: &Path, attr: &str) -> Output {
    nix_instantiate()
        .args(["--eval", "--strict", "--json"])
        .arg(repo().join("nix/tests/module/eval.nix"))
        .args(["--argstr", "nixpkgs"])
        .arg(nixpkgs)
        .args(["--argstr", "root"])
        .arg(root)
        .args(["-A", attr])
        .output()
        .expect("run nix-instantiate")
}

fn module_json(nixpkgs: &Path, root: &Path, attr: &str) -> serde_json::Value {
    let out = module_eval(nixpkgs, root, attr);
    assert!(out.status.success(), "{attr}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{attr}: {e}"))
}

fn str_at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(|s| s.as_str())
        .unwrap_or_else(|| panic!("no string at {pointer} in {v:#}"))
}

#[test]
fn module_evaluates_with_the_module_system() {
    let test = "module_evaluates_with_the_module_system";
    let Some(np) = module_eval_setup(test) else {
        return;
    };
    let fx = fixture();
    let root = fx.path();
    let root_str = root.to_str().expect("utf-8 temp path");
    use serde_json::json;

    // Every pure case's options, set as services.berth options, make the
    // module write the same spec: nix/tests/expected/<case>.json.
    let cases = module_json(&np, root, "cases");
    let mut checked = 0;
    for case in cases_with_expected_json() {
        let name = stem(&case);
        let want_text =
            std::fs::read_to_string(case.with_file_name(format!("expected/{name}.json")))
                .expect("read expected")
                .replace("@root@", root_str);
        let want: serde_json::Value =
            serde_json::from_str(&want_text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            cases.get(&name),
            Some(&want),
            "{name}: the module's spec differs from expected/{name}.json"
        );
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} cases with expected JSON");

    // A host with a container, a VM, a group and an image.
    let host = module_json(&np, root, "host");
    assert_eq!(
        host["spec"], host["pure"],
        "module and nix/spec.nix disagree"
    );
    for guest in [
        "/spec/guest/web",
        "/spec/guest/router",
        "/spec/group/edge",
        "/spec/image/debian",
    ] {
        assert!(host.pointer(guest).is_some(), "{guest} missing: {host:#}");
    }
    let spec = fx.path().join("module-host.json");
    std::fs::write(&spec, host["spec"].to_string()).expect("write spec");
    let v = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("validate")
        .arg(&spec)
        .env_remove("BERTH_ACCEL")
        .output()
        .expect("run berth validate");
    assert!(v.status.success(), "berth validate: {}", text(&v));

    let spec_file = str_at(&host, "/specFile");
    assert!(
        spec_file.starts_with("/nix/store/") && spec_file.ends_with("-berth-spec.json"),
        "{spec_file}"
    );
    let daemon = &host["berth"];
    for (key, want) in [
        ("Type", json!("notify")),
        ("NotifyAccess", json!("main")),
        ("KillMode", json!("process")),
        ("Restart", json!("always")),
    ] {
        assert_eq!(daemon["serviceConfig"][key], want, "berth.service {key}");
    }
    assert!(
        daemon["serviceConfig"].get("Delegate").is_none(),
        "guests live in scopes of their own: berth.service must not delegate"
    );
    let exec = str_at(daemon, "/serviceConfig/ExecStart");
    assert!(
        exec.starts_with("/nix/store/") && exec.ends_with("-berth-stub/bin/berth daemon"),
        "{exec}"
    );
    assert_eq!(daemon["wantedBy"], json!(["multi-user.target"]));
    assert_eq!(daemon["wants"], json!(["network-online.target"]));
    assert_eq!(daemon["after"], json!(["network-online.target"]));
    let environment =
        json!({ "BERTH_STATE_DIR": "/var/lib/berth", "BERTH_SOCKET": "/run/berth/berth.sock" });
    assert_eq!(daemon["environment"], environment);
    let apply = &host["apply"];
    assert_eq!(apply["serviceConfig"]["Type"], json!("oneshot"));
    assert_eq!(apply["serviceConfig"]["RemainAfterExit"], json!(true));
    let exec = str_at(apply, "/serviceConfig/ExecStart");
    assert!(
        exec.ends_with(&format!("-berth-stub/bin/berth apply --yes {spec_file}")),
        "{exec}"
    );
    assert_eq!(apply["requires"], json!(["berth.service"]));
    assert_eq!(apply["after"], json!(["berth.service"]));
    assert_eq!(apply["wantedBy"], json!(["multi-user.target"]));
    assert_eq!(apply["restartTriggers"], json!([spec_file]));
    assert_eq!(apply["environment"], environment);
    assert_eq!(host["systemPackages"], json!(["berth-stub"]));
    assert_eq!(
        host["qemuUser"],
        json!({ "isSystemUser": true, "group": "berth-qemu", "extraGroups": ["kvm"], "description": "berth QEMU (unprivileged)" })
    );
    assert_eq!(host["groups"], json!(["berth-qemu"]));
    assert_eq!(host["failedAssertions"], json!([]));
    assert_eq!(host["warnings"], json!([]));

    // Guests from `config`, built with stand-ins for NixOS's eval-config
    // and builders: what module.nix puts in the spec for them.
    let built = module_json(&np, root, "configGuests");
    assert_eq!(built["failedAssertions"], json!([]));
    let web = &built["spec"]["guest"]["web"];
    assert!(web.get("config").is_none(), "{web:#}");
    let rootfs = str_at(web, "/rootfs");
    assert!(
        rootfs.starts_with("/nix/store/") && rootfs.ends_with("-berth-rootfs-web"),
        "{rootfs}"
    );
    let init = str_at(web, "/command/0");
    // networking.hostName defaults to the guest's name.
    assert!(init.ends_with("-nixos-system-web/init"), "{init}");
    assert_eq!(web["command"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        web["ephemeral"],
        json!(true),
        "a store rootfs is ephemeral by default"
    );
    assert_eq!(web["memory"], json!("512M"));
    // The host's store is bound in read-only, as nixos-containers do; the
    // rootfs is a tiny tree, not a copy of the closure.
    assert_eq!(
        web["binds"],
        json!([{ "source": "/nix/store", "target": "/nix/store", "read_only": true }]),
        "{web:#}"
    );
    let micro = &built["spec"]["guest"]["micro"];
    assert!(
        str_at(micro, "/kernel").ends_with("-linux/bzImage"),
        "{micro:#}"
    );
    assert!(str_at(micro, "/initrd").ends_with("/initrd"), "{micro:#}");
    let cmdline = str_at(micro, "/cmdline");
    // The guest's own hostName wins over the default; berth's profile adds
    // console=ttyS0; the guest's cmdline option comes last.
    assert!(
        cmdline.starts_with("init=/nix/store/")
            && cmdline.contains("-nixos-system-micro-vm/init console=ttyS0")
            && cmdline.ends_with(" quiet"),
        "{cmdline}"
    );
    let store_disk = &micro["disks"][0];
    assert!(
        str_at(store_disk, "/path").ends_with("-berth-store-micro.img"),
        "{micro:#}"
    );
    assert_eq!(store_disk["format"], json!("raw"));
    assert_eq!(store_disk["readonly"], json!(true));
    assert_eq!(
        micro["disks"][1],
        json!({ "path": "/var/lib/berth/disks/data.img", "size": "1G" })
    );

    // flake.nix's nixosModules.default sets the package to the flake's build.
    let flake = module_json(&np, root, "flake");
    assert_eq!(flake["package"], json!("berth-0.1.0"));
    assert!(
        str_at(&flake, "/execStart").ends_with("-berth-0.1.0/bin/berth daemon"),
        "{flake:#}"
    );

    // enable = false: guests declared, nothing defined.
    let disabled = module_json(&np, root, "disabled");
    assert_eq!(
        disabled,
        json!({ "units": [], "assertions": [], "systemPackages": [] })
    );

    // As NixOS reports config.assertions.
    let assertions = module_json(&np, root, "assertions");
    assert_eq!(
        assertions,
        json!([
            "services.berth.guests.rw: a container built from `config` has its rootfs in the read-only Nix store; it must be ephemeral or readOnly",
            "services.berth.guests.vm: `config` builds the guest; leave kernel and initrd unset",
            "services.berth.guests.web: `config` builds the guest; leave rootfs and command unset",
        ])
    );

    // The option documentation renders, every option described.
    let docs = module_json(&np, root, "docs");
    let docs = docs.as_array().expect("docs list");
    let names: Vec<&str> = docs.iter().map(|o| str_at(o, "/name")).collect();
    for o in docs {
        let described = o["description"]
            .as_str()
            .is_some_and(|d| !d.trim().is_empty());
        assert!(described, "option without a description: {o:#}");
    }
    for must in [
        "services.berth.enable",
        "services.berth.specFile",
        "services.berth.guests.<name>.index",
        "services.berth.guests.<name>.config",
        "services.berth.guests.<name>.disks.*.size",
        "services.berth.groups.<name>.template.companions.*.indexBase",
        "services.berth.images.<name>.url",
    ] {
        assert!(names.contains(&must), "{must} not documented: {names:?}");
    }
    assert!(
        !names.contains(&"services.berth.groups.<name>.template.config"),
        "templates are not built from `config`"
    );
    // Defaults and examples shown as Nix code must be Nix.
    let mut code: Vec<&str> = docs
        .iter()
        .flat_map(|o| [&o["default"], &o["example"]])
        .filter(|v| v["kind"] == json!("literalExpression"))
        .map(|v| str_at(v, "/text"))
        .collect();
    code.sort_unstable();
    code.dedup();
    assert!(code.len() >= 3, "{code:?}");
    for expr in code {
        let out = nix_instantiate()
            .args(["--parse", "-E", expr])
            .output()
            .expect("run nix-instantiate --parse");
        assert!(
            out.status.success(),
            "a default or example rendered as Nix code does not parse: {expr:?}: {}",
            text(&out)
        );
    }
}

/// `nix/tests/<case>.nix` files that have an `expected/<case>.json`.
fn cases_with_expected_json() -> Vec<PathBuf> {
    cases()
        .into_iter()
        .filter(|c| {
            c.with_file_name(format!("expected/{}.json", stem(c)))
                .exists()
        })
        .collect()
}

#[test]
fn module_rejects_bad_options_naming_the_option() {
    let test = "module_rejects_bad_options_naming_the_option";
    let Some(np) = module_eval_setup(test) else {
        return;
    };
    let none = Path::new("/nonexistent");
    let expect = module_json(&np, none, "badExpect");
    let expect = expect.as_object().expect("badExpect is an attribute set");
    assert!(expect.len() >= 15, "only {} bad cases", expect.len());
    for (name, want) in expect {
        let want = want.as_str().expect("expected text");
        let out = module_eval(&np, none, &format!("bad.{name}"));
        assert!(!out.status.success(), "{name} evaluated: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(want),
            "{name}: expected {want:?} in the error: {}",
            text(&out)
        );
    }
}

/// NEEDS A FULL NIXPKGS (`nixos/lib/eval-config.nix`), so it never runs in
/// berth's CI: a NixOS system importing the module, a container and a VM
/// declared with `config`; evaluation only (the spec file's .drv is
/// instantiated, nothing is built).
#[test]
fn nixos_system_with_config_guests_evaluates() {
    let test = "nixos_system_with_config_guests_evaluates";
    let Some(np) = module_eval_setup(test) else {
        return;
    };
    if !np.join("nixos/lib/eval-config.nix").exists() {
        eprintln!(
            "skip {test}: {} has lib/ but no nixos/lib/eval-config.nix (a full nixpkgs checkout is needed)",
            np.display()
        );
        return;
    }
    let nixos = module_json(&np, Path::new("/nonexistent"), "nixos");
    for drv in ["/specDrv", "/toplevelDrv"] {
        let d = str_at(&nixos, drv);
        assert!(
            d.starts_with("/nix/store/") && d.ends_with(".drv"),
            "{drv}: {d}"
        );
    }
    let spec = &nixos["spec"];
    assert!(
        str_at(spec, "/guest/web/rootfs").starts_with("/nix/store/"),
        "{spec:#}"
    );
    assert!(
        str_at(spec, "/guest/web/command/0").ends_with("/init"),
        "{spec:#}"
    );
    assert!(
        str_at(spec, "/guest/micro/kernel").starts_with("/nix/store/"),
        "{spec:#}"
    );
    assert!(
        str_at(spec, "/guest/micro/initrd").starts_with("/nix/store/"),
        "{spec:#}"
    );
    let cmdline = str_at(spec, "/guest/micro/cmdline");
    assert!(
        cmdline.starts_with("init=/nix/store/") && cmdline.ends_with(" quiet"),
        "{cmdline}"
    );
    assert!(
        str_at(spec, "/guest/micro/disks/0/path").starts_with("/nix/store/"),
        "{spec:#}"
    );
}
