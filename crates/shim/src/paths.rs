//! Where a guest's files live under the state dir. One place, used by the
//! shim and the daemon alike.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct GuestPaths {
    pub dir: PathBuf,
}

impl GuestPaths {
    pub fn new(state_dir: &Path, guest: &str) -> GuestPaths {
        GuestPaths {
            dir: state_dir.join("guests").join(guest),
        }
    }
    /// The applied guest config (`berth_spec::Guest` as JSON), written by the daemon.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// The shim's control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("shim.sock")
    }
    /// Last status the shim wrote (survives the shim).
    pub fn status(&self) -> PathBuf {
        self.dir.join("status.json")
    }
    /// The guest's console / stdout and stderr.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Console clients attach here (see `console.rs`).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// The shim's own lifecycle log.
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    /// Bind-mounted read-only at `/.berth` inside the container.
    pub fn sync_dir(&self) -> PathBuf {
        self.dir.join("sync")
    }
}

/// Directory holding the static init helper, shared by all guests.
pub fn lib_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("lib")
}
