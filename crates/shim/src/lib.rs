//! `berth shim`: the per-guest supervisor.
//!
//! Each guest runs under its own shim, started detached by the daemon (new
//! session, reparented to init), so `kill -9` of the daemon leaves every guest
//! running. The daemon finds the shim again through its socket and status
//! file under `<state>/guests/<name>/`.

pub mod client;
mod console;
mod images;
pub mod machined;
pub mod nics;
pub mod paths;
pub mod proto;
pub mod qga;
pub mod supervisor;
mod vmrun;

pub use paths::GuestPaths;
pub use proto::{ExitInfo, Request, ShimState, ShimStatus};
pub use supervisor::{ShimError, run, tail_lines};
