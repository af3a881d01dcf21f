//! Cached test fixtures, built once and shared by all tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{Result, TestkitError, run, workspace_root};

/// Where fixtures are cached: `$BERTH_FIXTURE_DIR`, else
/// `<workspace>/target/berth-fixtures`. Delete it to rebuild them.
pub fn fixture_dir() -> PathBuf {
    match std::env::var_os("BERTH_FIXTURE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target/berth-fixtures"),
    }
}

/// The busybox rootfs (`<fixture_dir>/rootfs-busybox`), built on first use by
/// `scripts/mk-busybox-rootfs.sh`. Shared: treat it as read-only, and give a
/// guest that writes to its root (or that nspawn would chown for
/// `--private-users`) its own [`copy_busybox_rootfs`].
///
/// Panics with the reason if it cannot be built (a test helper).
pub fn busybox_rootfs() -> PathBuf {
    match try_busybox_rootfs() {
        Ok(p) => p,
        Err(e) => panic!("busybox rootfs fixture: {e}"),
    }
}

/// [`busybox_rootfs`] without the panic.
pub fn try_busybox_rootfs() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_rootfs(&fixture_dir()).map_err(|e| e.to_string()))
        .clone()
        .map_err(TestkitError::Fixture)
}

/// Copies the busybox rootfs to `dest` (created; must not exist or be empty)
/// with `cp -a`, for a guest of its own.
pub fn copy_busybox_rootfs(dest: &Path) -> Result<()> {
    let src = try_busybox_rootfs()?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|source| TestkitError::Io {
            what: format!("creating {}", parent.display()),
            source,
        })?;
    }
    run(Command::new("cp").arg("-aT").arg(&src).arg(dest)).map(drop)
}

fn is_built(root: &Path) -> bool {
    root.join("usr/bin/busybox").is_file() && root.join("www/index.html").is_file()
}

/// Builds into a temp dir next to the target and renames it into place, so
/// the target either does not exist or is complete; a racing builder (another
/// test binary) that loses the rename throws its copy away.
fn build_rootfs(dir: &Path) -> Result<PathBuf> {
    let target = dir.join("rootfs-busybox");
    if is_built(&target) {
        return Ok(target);
    }
    let io = |what: String| move |source| TestkitError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".rootfs-busybox.")
        .tempdir_in(dir)
        .map_err(io(format!("creating a temp dir in {}", dir.display())))?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(io(format!("chmod {}", tmp.path().display())))?;
    let script = workspace_root().join("scripts/mk-busybox-rootfs.sh");
    run(Command::new("sh").arg(&script).arg(tmp.path()))?;
    let built = tmp.keep();
    match std::fs::rename(&built, &target) {
        Ok(()) => Ok(target),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&built);
            if is_built(&target) {
                Ok(target)
            } else {
                Err(TestkitError::Io {
                    what: format!("renaming {} to {}", built.display(), target.display()),
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn racing_builders_share_one_complete_tree() {
        if !crate::require(
            "racing_builders_share_one_complete_tree",
            &[crate::Cap::Busybox],
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|_| s.spawn(|| build_rootfs(dir.path())))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(
            paths
                .iter()
                .all(|p| *p == dir.path().join("rootfs-busybox"))
        );
        assert!(is_built(&paths[0]));
        // Only the target is left: losers removed their temp dirs.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["rootfs-busybox"]);
        let mode = std::fs::metadata(&paths[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
