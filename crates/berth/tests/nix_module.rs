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
//! The module itself (`nix/module.nix`) and the flake need nixpkgs and a
//! NixOS machine; here they are only parse-checked. Without nix-instantiate
//! the tests print `skip <test>: ...` (and fail with BERTH_E2E_REQUIRED=1).

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
