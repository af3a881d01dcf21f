use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in the VM driver. Each message says what
/// failed and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("unknown accelerator `{value}` (from {origin}): use `auto`, `kvm` or `tcg`")]
    BadAccel { value: String, origin: &'static str },

    #[error(
        "accel = kvm was asked for (from {origin}) but KVM is not usable here: {reason}; \
         use accel = \"auto\" or \"tcg\" (or set BERTH_ACCEL=tcg)"
    )]
    KvmUnusable {
        origin: &'static str,
        reason: String,
    },

    #[error(
        "hugepages: {memory_mib} MiB of guest memory needs {needed} free 2 MiB hugepages, \
         host has {free} free of {total} (see {dir}; e.g. `sysctl vm.nr_hugepages={suggest}`, \
         or set hugepages = false)"
    )]
    NotEnoughHugepages {
        memory_mib: u64,
        needed: u64,
        free: u64,
        total: u64,
        dir: &'static str,
        suggest: u64,
    },

    #[error(
        "hugepages: no hugetlbfs mounted at {path} (mount one with \
         `mount -t hugetlbfs hugetlbfs {path}`, or set hugepages = false)"
    )]
    NoHugetlbfs { path: &'static str },

    #[error("invalid tap name `{name}`: {reason}")]
    BadTapName { name: String, reason: &'static str },

    #[error("creating tap `{name}`: {op} failed: {source}{hint}")]
    Tap {
        name: String,
        op: &'static str,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "QMP: could not connect to {path} within {timeout:?}: {source} \
         (did QEMU start? see its stderr)"
    )]
    QmpConnect {
        path: PathBuf,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },

    #[error("QMP {path}: I/O error while {what}: {source}")]
    QmpIo {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("QMP {path}: QEMU closed the monitor while {what} (QEMU has probably exited)")]
    QmpClosed { path: PathBuf, what: String },

    #[error("QMP {path}: no answer to `{cmd}` within {timeout:?} (QEMU is hung or very busy)")]
    QmpTimeout {
        path: PathBuf,
        cmd: String,
        timeout: Duration,
    },

    #[error("QMP {path}: unexpected message while {what}: {message}")]
    QmpProtocol {
        path: PathBuf,
        what: String,
        message: String,
    },

    #[error("QMP command `{cmd}` failed: {class}: {desc}")]
    QmpCommand {
        cmd: String,
        class: String,
        desc: String,
    },

    #[error("pinning: CPU {cpu} is not an online host CPU (online: {online}); fix the cpu list")]
    CpuNotOnline { cpu: usize, online: String },

    #[error("pinning: no CPUs given for {what}")]
    NoCpus { what: &'static str },

    #[error("pinning thread {tid} to CPUs {cpus:?}: {source} (has the thread exited?)")]
    Pin {
        tid: i32,
        cpus: Vec<usize>,
        #[source]
        source: nix::Error,
    },

    #[error("reading {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot parse {what}: `{text}`")]
    Parse { what: String, text: String },

    #[error(
        "disk {path} does not exist and no size was given to create it \
         (create it, or give the disk a size)"
    )]
    DiskMissing { path: PathBuf },

    #[error("disk {path}: {what}: {source}")]
    DiskIo {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "disk {path} is in format `{found}` but the spec says `{expected}`: \
         fix the disk's format in the spec (berth never converts a disk)"
    )]
    DiskFormatMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("cannot run `{program}`: {source}{hint}")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },

    #[error("invalid user name `{name}` for QEMU's -runas: {reason}")]
    BadUserName { name: String, reason: &'static str },

    #[error("looking up user `{name}`: {source}")]
    UserLookup {
        name: String,
        #[source]
        source: nix::Error,
    },

    #[error(
        "user `{name}` still does not exist after useradd; create it by hand \
         (on NixOS, enable the berth module, which declares it)"
    )]
    UserMissing { name: String },
}

pub type Result<T, E = VmError> = std::result::Result<T, E>;
