//! berth's QEMU driver: everything needed to run one VM under a `berth shim`.
//!
//! - [`qemu_argv`] turns a typed [`VmConfig`] into QEMU's argv. Pure: no IO,
//!   so the planner and tests can look at exactly what will run.
//! - [`Qmp`] is a small synchronous QMP client for berth's own (and only)
//!   monitor socket: status, vCPU threads, power-down, quit, events.
//! - [`open_tap`] creates the guest's tap in the caller's network namespace
//!   and returns its fd, which QEMU inherits (`-netdev tap,fd=N`): QEMU then
//!   never needs `/dev/net/tun` itself, so it can run as an unprivileged user
//!   (`-runas`) under `-sandbox on`.
//! - [`pin`] pins vCPU threads and the remaining emulator threads.
//! - Probes and host facts: [`kvm_usable`], [`resolve_accel`],
//!   [`host_tsc_khz`], [`check_hugepages`], [`host_cpus`].
//! - Host preparation: [`ensure_disk`], [`ensure_qemu_user`].
//!
//! Lifecycle of the QEMU process as the supervisor sees it:
//!
//! ```text
//!   spawn(qemu_argv) --> Qmp::connect --> running
//!                                           |  guest powers off   -> SHUTDOWN{guest:true,  reason:"guest-shutdown"} -> exit
//!                                           |  guest reboots      -> RESET, the VM restarts inside the same QEMU
//!                                           |  system_powerdown   -> POWERDOWN, guest shuts down                   -> exit
//!                                           |  quit               -> SHUTDOWN{guest:false, reason:"host-qmp-quit"}  -> exit
//! ```
//!
//! A guest reboot happens inside QEMU (no `-no-reboot`): the process, its
//! tap, its QMP connection and its pinned threads survive it, and a guest
//! that panics with `panic=-1` comes back by itself. QEMU exiting is a
//! power-off, a quit or a crash; the supervisor's restart policy decides.

mod accel;
mod argv;
mod disk;
mod error;
mod hugepages;
mod pin;
mod qmp;
mod tap;
mod user;
pub mod vfio;

pub use accel::{host_tsc_khz, kvm_usable, resolve_accel};
pub use argv::{
    Accel, Disk, DiskFormat, Firmware, Machine, NicArg, VmConfig, inherit_fd, mac_for_index,
    qemu_argv,
};
pub use disk::ensure_disk;
pub use error::{Result, VmError};
pub use hugepages::{HUGEPAGE_MIB, check_hugepages, hugepages_needed};
pub use pin::{
    PinRole, Pinned, format_cpu_list, host_cpus, parse_cpu_list, pin, pin_threads, thread_affinity,
};
pub use qmp::Qmp;
pub use tap::open_tap;
pub use user::{QEMU_USER, ensure_qemu_user};
