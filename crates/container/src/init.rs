//! The static `berth-init` helper embedded in this crate (built by `build.rs`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The helper's bytes; empty when the build could not link it statically.
pub static INIT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/berth-init"));

/// Path inside the container where the helper is bind-mounted.
pub const INIT_IN_GUEST: &str = "/.berth-init";
/// Directory inside the container holding the `ready` flag.
pub const SYNC_IN_GUEST: &str = "/.berth";

/// Writes the helper to `dir/berth-init` (0755) unless an identical copy is
/// already there, and returns its path. Written to a temp name and renamed so a
/// running container never sees a half-written file.
pub fn install(dir: &Path) -> std::io::Result<PathBuf> {
    if INIT_BINARY.is_empty() {
        return Err(std::io::Error::other(
            "this berth was built without its static init helper (the build could not link \
             statically: install libc6-dev / glibc.static and rebuild)",
        ));
    }
    std::fs::create_dir_all(dir)?;
    let dest = dir.join("berth-init");
    if std::fs::read(&dest).is_ok_and(|existing| existing == INIT_BINARY) {
        return Ok(dest);
    }
    let tmp = dir.join(format!(".berth-init.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(INIT_BINARY)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    #[test]
    fn helper_is_embedded_and_static() {
        let bin = super::INIT_BINARY;
        assert!(bin.len() > 1000, "berth-init was not built");
        assert_eq!(&bin[..4], b"\x7fELF");
        // A static executable has no PT_INTERP program header.
        assert!(
            !bin.windows(b"/lib64/ld-linux".len())
                .any(|w| w == b"/lib64/ld-linux")
        );
    }
}
