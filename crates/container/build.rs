//! Compiles `init/berth-init.rs` into a static executable that the container
//! driver embeds (see `src/init.rs`). A static binary runs inside any rootfs,
//! whatever libc it has (or none, like a busybox-static rootfs).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=init/berth-init.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("berth-init");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition=2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
            "init/berth-init.rs",
            "-o",
        ])
        .arg(&dest)
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            // Keep the build going: the driver reports a clear error at run time.
            println!(
                "cargo:warning=could not build the static berth-init helper ({other:?}); \
                 containers will fail to start. Install the static C library (libc6-dev / glibc.static)."
            );
            std::fs::write(&dest, b"").expect("write placeholder");
        }
    }
}
