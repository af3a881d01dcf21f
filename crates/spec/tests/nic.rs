//! Extra NICs: validation of `[[guest.NAME.nic]]`, one clear error per
//! mistake, and what a valid spec turns into.

use std::path::Path;

use berth_spec::nic::{NicKind, derived_mac, warnings};
use berth_spec::{Format, HostProbe, SpecError, parse, validate};

/// Interfaces eth0, lan0 and wan0; PCI devices: 0000:03:00.0 ready for
/// passthrough, 0000:04:00.0 bound to igb, 0000:05:00.0 in an incomplete
/// IOMMU group; no other.
struct Fake;

impl HostProbe for Fake {
    fn is_dir(&self, _: &Path) -> bool {
        true
    }
    fn exists(&self, _: &Path) -> bool {
        true
    }
    fn interface_exists(&self, name: &str) -> Option<bool> {
        Some(["eth0", "lan0", "wan0", "lo"].contains(&name))
    }
    fn vfio_problem(&self, pci: &str, bind: bool) -> Option<String> {
        match pci {
            "0000:03:00.0" => None,
            "0000:04:00.0" if bind => None,
            "0000:04:00.0" => {
                Some("PCI device 0000:04:00.0 is bound to `igb`, not vfio-pci".into())
            }
            "0000:05:00.0" => Some("IOMMU group 9 of 0000:05:00.0 is not complete".into()),
            _ => Some(format!("PCI device {pci} does not exist on this host")),
        }
    }
}

const HEAD: &str = r#"
[host]
uplink = "eth0"
subnet4 = "10.0.0.0/24"
"#;

fn vm(name: &str, index: u32, machine: &str, nics: &str) -> String {
    format!(
        "[guest.{name}]\nkind = \"vm\"\nindex = {index}\nmachine = \"{machine}\"\nkernel = \"/k\"\n{}\n",
        nics.replace("NAME", name)
    )
}

fn check(text: &str) -> Result<berth_spec::Desired, Vec<String>> {
    let file = Path::new("/etc/berth/spec.toml");
    let spec = parse(text, Format::Toml, file).unwrap_or_else(|e| panic!("parse: {e}\n{text}"));
    validate(&spec, file, &Fake).map_err(|errs| errs.iter().map(SpecError::to_string).collect())
}

/// Exactly one error, containing every `needle`.
fn one_error(text: &str, needles: &[&str]) {
    let errs = check(&format!("{HEAD}{text}")).expect_err("should be invalid");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    for n in needles {
        assert!(errs[0].contains(n), "missing {n:?} in {}", errs[0]);
    }
}

const MACVTAP: &str = "[[guest.NAME.nic]]\nmode = \"macvtap\"\nparent = \"lan0\"\n";
const SYNC: &str = "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"sync\"\n";

#[test]
fn a_router_spec_validates_with_names_and_stable_macs() {
    let text = format!(
        "{HEAD}{}{}[guest.db1]\nkind = \"container\"\nindex = 4\nrootfs = \"/r\"\n[[guest.db1.nic]]\nmode = \"segment\"\nsegment = \"sync\"\naddr = \"10.9.0.5/24\"\n",
        vm(
            "r1",
            2,
            "q35",
            &format!(
                "{MACVTAP}mac = \"52:54:00:12:34:01\"\naddr = \"192.168.1.2/24\"\n{SYNC}[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"03:00.0\"\n"
            )
        ),
        vm("r2", 3, "microvm", &format!("{MACVTAP}{SYNC}")),
    );
    let d = check(&text).expect("valid");
    let r1 = &d.guests["r1"];
    assert_eq!(r1.nics.len(), 3);
    assert_eq!(
        r1.nics[0].kind,
        NicKind::Macvtap {
            parent: "lan0".into(),
            link: "bm2n1".into()
        }
    );
    assert_eq!(r1.nics[0].mac.as_deref(), Some("52:54:00:12:34:01"));
    assert_eq!(
        r1.nics[0].addr.map(|a| a.to_string()).as_deref(),
        Some("192.168.1.2/24")
    );
    assert_eq!(
        r1.nics[1].kind,
        NicKind::Segment {
            segment: "sync".into(),
            bridge: "bs-sync".into(),
            link: "bp2n2".into()
        }
    );
    assert_eq!(r1.nics[1].mac, Some(derived_mac("r1", 2)));
    assert_eq!(
        r1.nics[2].kind,
        NicKind::Vfio {
            pci: "0000:03:00.0".into(),
            bind: false
        }
    );
    assert_eq!(r1.nics[2].mac, None);
    assert_eq!(r1.nics[2].guest_ifname(), "eth3");
    assert_eq!(d.guests["db1"].nics[0].guest_ifname(), "eth1");
    // Three guests on the segment: no warning. Validation is deterministic.
    assert!(warnings(&d).is_empty());
    assert_eq!(check(&text).expect("valid"), d);
    // The validated guest survives a round trip through JSON (the store).
    let json = serde_json::to_string(r1).expect("json");
    let back: berth_spec::Guest = serde_json::from_str(&json).expect("back");
    assert_eq!(&back, r1);
}

#[test]
fn missing_parent_interface() {
    one_error(
        &vm(
            "r1",
            2,
            "microvm",
            "[[guest.NAME.nic]]\nmode = \"macvtap\"\nparent = \"lan7\"\n",
        ),
        &[
            "guest `r1`",
            "nic[1].parent",
            "interface `lan7` does not exist",
        ],
    );
    one_error(
        &vm(
            "r1",
            2,
            "microvm",
            "[[guest.NAME.nic]]\nmode = \"macvtap\"\n",
        ),
        &["nic[1].parent", "needs `parent`"],
    );
}

#[test]
fn parent_is_one_of_berths_own_links() {
    for own in ["vb3", "bm2n1", "bp3n2", "bs-sync"] {
        one_error(
            &vm(
                "r1",
                2,
                "microvm",
                &format!("[[guest.NAME.nic]]\nmode = \"macvtap\"\nparent = \"{own}\"\n"),
            ),
            &[
                "nic[1].parent",
                &format!("`{own}` is one of berth's own links"),
            ],
        );
    }
}

#[test]
fn two_nics_with_one_mac() {
    let m = "mac = \"52:54:00:12:34:01\"\n";
    one_error(
        &format!(
            "{}{}",
            vm("r1", 2, "microvm", &format!("{MACVTAP}{m}")),
            vm("r2", 3, "microvm", &format!("{SYNC}{m}"))
        ),
        &[
            "guest `r2`",
            "nic[1].mac",
            "52:54:00:12:34:01",
            "guest `r1`",
            "its own MAC",
        ],
    );
    // Also within one guest, and against a management MAC.
    one_error(
        &vm("r1", 2, "microvm", &format!("{MACVTAP}{m}{SYNC}{m}")),
        &["nic[2].mac", "nic[1] of guest `r1`"],
    );
    one_error(
        &format!(
            "{}{}",
            vm("r1", 2, "microvm", ""),
            vm(
                "r2",
                3,
                "microvm",
                &format!("{SYNC}mac = \"52:54:00:be:00:02\"\n")
            )
        ),
        &["nic[1].mac", "management NIC (eth0) of guest `r1`"],
    );
}

#[test]
fn a_segment_with_a_single_member_is_a_warning() {
    let d = check(&format!("{HEAD}{}", vm("r1", 2, "microvm", SYNC))).expect("valid");
    let w = warnings(&d);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("segment `sync` has a single member (`r1`)"),
        "{w:?}"
    );
}

#[test]
fn vfio_device_used_by_two_guests() {
    let v = "[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"0000:03:00.0\"\n";
    one_error(
        &format!("{}{}", vm("r1", 2, "q35", v), vm("r2", 3, "q35", v)),
        &[
            "guest `r2`",
            "nic[1].pci",
            "also passed through to guest `r1`",
        ],
    );
}

#[test]
fn vfio_host_problems_are_one_error_each() {
    for (pci, needle) in [
        ("0000:09:00.0", "does not exist"),
        ("0000:04:00.0", "not vfio-pci"),
        ("0000:05:00.0", "IOMMU group 9"),
    ] {
        one_error(
            &vm(
                "r1",
                2,
                "q35",
                &format!("[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"{pci}\"\n"),
            ),
            &["nic[1].pci", needle],
        );
    }
    // bind = true takes a device from its host driver at start.
    check(&format!(
        "{HEAD}{}",
        vm(
            "r1",
            2,
            "q35",
            "[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"0000:04:00.0\"\nbind = true\n"
        )
    ))
    .expect("bind = true is fine");
    one_error(
        &vm(
            "r1",
            2,
            "microvm",
            "[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"0000:03:00.0\"\n",
        ),
        &["needs machine = \"q35\""],
    );
    one_error(
        &vm(
            "r1",
            2,
            "q35",
            "[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"3:0.0\"\n",
        ),
        &["is not a PCI address"],
    );
}

#[test]
fn other_mistakes_name_the_field() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"Sync!\"\n",
            &["nic[1].segment", "not valid"],
        ),
        (
            "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"much-too-long-name\"\n",
            &["nic[1].segment", "1-12 characters"],
        ),
        (
            "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"s\"\nparent = \"lan0\"\n",
            &["nic[1].parent", "does not apply to mode = \"segment\""],
        ),
        (
            "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"s\"\nmac = \"01:00:5e:00:00:01\"\n",
            &["nic[1].mac", "multicast"],
        ),
        (
            "[[guest.NAME.nic]]\nmode = \"segment\"\nsegment = \"s\"\naddr = \"10.9.0.2\"\n",
            &["nic[1].addr", "with prefix"],
        ),
        (
            "[[guest.NAME.nic]]\nmode = \"vfio\"\npci = \"0000:03:00.0\"\nmac = \"52:54:00:12:34:01\"\n",
            &["nic[1].mac", "hardware MAC"],
        ),
    ];
    for (nics, needles) in cases {
        let machine = if nics.contains("vfio") {
            "q35"
        } else {
            "microvm"
        };
        one_error(&vm("r1", 2, machine, nics), needles);
    }
    // A container joins segments only.
    one_error(
        "[guest.c1]\nkind = \"container\"\nindex = 5\nrootfs = \"/r\"\n[[guest.c1.nic]]\nmode = \"macvtap\"\nparent = \"lan0\"\n",
        &["guest `c1`", "nic[1]", "segment` only"],
    );
    // Unknown keys are parse errors with a position.
    let file = Path::new("/s.toml");
    let e = parse(
        &format!(
            "{HEAD}{}",
            vm(
                "r1",
                2,
                "microvm",
                "[[guest.NAME.nic]]\nmode = \"segment\"\nsegmnet = \"s\"\n"
            )
        ),
        Format::Toml,
        file,
    )
    .expect_err("unknown field");
    assert!(e.to_string().contains("segmnet"), "{e}");
}

/// The router examples in examples/ stay valid (host facts not checked).
#[test]
fn router_examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    for name in ["pfsense-routers.toml", "nixos-routers.toml"] {
        let path = root.join(name);
        let spec = berth_spec::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = validate(&spec, &path, &berth_spec::NoProbe)
            .unwrap_or_else(|e| panic!("{name}: {}", berth_spec::format_errors(&e)));
        assert_eq!(d.guests["r1"].nics.len(), 3, "{name}");
        assert!(warnings(&d).is_empty(), "{name}: {:?}", warnings(&d));
    }
}
