//! Container bind mounts (`binds`): one clear error per mistake, defaults,
//! and what a valid spec turns into.

use std::path::{Path, PathBuf};

use berth_spec::{Format, HostProbe, SpecError, parse, validate};

/// Everything exists except paths under /missing.
struct Fake;

impl HostProbe for Fake {
    fn is_dir(&self, p: &Path) -> bool {
        !p.starts_with("/missing")
    }
    fn exists(&self, p: &Path) -> bool {
        !p.starts_with("/missing")
    }
    fn interface_exists(&self, _: &str) -> Option<bool> {
        Some(true)
    }
    fn vfio_problem(&self, _: &str, _: bool) -> Option<String> {
        None
    }
}

const HEAD: &str = "[host]\nuplink = \"eth0\"\nsubnet4 = \"10.0.0.0/24\"\n\n";

fn container(binds: &str) -> String {
    format!(
        "{HEAD}[guest.c]\nkind = \"container\"\nindex = 2\nrootfs = \"/srv/root\"\nephemeral = true\nbinds = {binds}\n"
    )
}

fn check(text: &str) -> Result<berth_spec::Desired, Vec<String>> {
    let file = Path::new("/etc/berth/spec.toml");
    let spec = parse(text, Format::Toml, file).unwrap_or_else(|e| panic!("parse: {e}\n{text}"));
    validate(&spec, file, &Fake).map_err(|errs| errs.iter().map(SpecError::to_string).collect())
}

fn one_error(binds: &str, needles: &[&str]) {
    let errs = check(&container(binds)).expect_err("should be invalid");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "`{n}` not in: {}", errs[0]);
    }
}

#[test]
fn defaults_target_is_source_and_read_only() {
    let d = check(&container(
        r#"[{ source = "/nix/store" }, { source = "/srv/data", target = "/data", read_only = false }]"#,
    ))
    .expect("valid");
    let g = &d.guests["c"];
    assert_eq!(g.binds.len(), 2);
    assert_eq!(g.binds[0].target, PathBuf::from("/nix/store"));
    assert!(g.binds[0].read_only, "read-only unless said otherwise");
    assert_eq!(g.binds[1].target, PathBuf::from("/data"));
    assert!(!g.binds[1].read_only);
}

#[test]
fn every_mistake_is_one_clear_error() {
    one_error(
        r#"[{ source = "nix/store" }]"#,
        &["binds[0]", "source nix/store must be an absolute path"],
    );
    one_error(
        r#"[{ source = "/srv", target = "data" }]"#,
        &["binds[0]", "target data must be an absolute path"],
    );
    one_error(
        r#"[{ source = "/srv/../etc" }]"#,
        &["must not contain `..`"],
    );
    one_error(r#"[{ source = "/srv/a:b" }]"#, &["must not contain `:`"]);
    one_error(
        r#"[{ source = "/srv", target = "/" }]"#,
        &["target / would hide the rootfs"],
    );
    one_error(
        r#"[{ source = "/missing/dir" }]"#,
        &["source /missing/dir does not exist on this host"],
    );
    one_error(
        r#"[{ source = "/a", target = "/x" }, { source = "/b", target = "/x" }]"#,
        &["binds[1]", "target /x is bound twice"],
    );
    // Unknown keys are caught by the parser with the field named.
    let text = container(r#"[{ source = "/a", readonly = true }]"#);
    let err = parse(&text, Format::Toml, Path::new("/s.toml")).expect_err("unknown field");
    assert!(err.to_string().contains("readonly"), "{err}");
}

#[test]
fn a_vm_has_no_binds() {
    let text = format!(
        "{HEAD}[guest.v]\nkind = \"vm\"\nindex = 3\nkernel = \"/k\"\nbinds = [{{ source = \"/srv\" }}]\n"
    );
    let errs = check(&text).expect_err("invalid");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("`binds` applies to containers"),
        "{errs:?}"
    );
}
