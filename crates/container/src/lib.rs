//! The container driver: how berth runs a guest of `kind = "container"` under
//! systemd-nspawn.
//!
//! ```text
//!   shim ──spawn──▶ systemd-nspawn ──▶ /.berth/init (PID 1, static) ──exec──▶ command
//!     │                                    waits for /.berth/ready
//!     └─ finds the leader PID, configures its netns from the host, touches ready
//! ```
//!
//! Everything that decides (argv, cgroup paths) is pure and unit-tested; the
//! functions that touch the system are small and named for what they do.

pub mod cgroup;
pub mod init;
pub mod nspawn;
pub mod process;

pub use cgroup::{Cgroup, CgroupError};
pub use nspawn::{BindMount, NspawnConfig, nspawn_argv, nspawn_env, systemd_available};
