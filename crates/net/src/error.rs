use std::io;
use std::path::PathBuf;

/// Errors of the networking driver. Each message names what failed and on
/// which interface, address, namespace or file.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A netlink request failed.
    #[error("netlink: failed to {op} on {target}: {source}")]
    Netlink {
        /// What was attempted, e.g. "add address 10.0.0.1/32".
        op: String,
        /// Interface (and namespace) it was attempted on.
        target: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// Opening or using a netlink socket failed.
    #[error("netlink: cannot open a route socket in {netns}: {source}")]
    Socket {
        netns: String,
        #[source]
        source: io::Error,
    },
    /// An interface that should exist was not found.
    #[error("interface {name} not found in {netns}")]
    LinkNotFound { name: String, netns: String },
    /// The interface name is not a valid Linux interface name.
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// Opening a process' network namespace failed.
    #[error("cannot open network namespace of pid {pid} ({path}): {source}")]
    NetnsOpen {
        pid: i32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Entering a network namespace failed.
    #[error("cannot enter network namespace of pid {pid}: {source}")]
    Setns {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    /// Creating the internal tokio runtime (or a helper thread) failed.
    #[error("cannot start the netlink runtime: {0}")]
    Runtime(#[source] io::Error),
    /// Reading or writing a sysctl failed.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    /// The `nft` binary is not installed.
    #[error("nft not found: install nftables")]
    NftMissing,
    /// Running `nft` failed to start or to talk to it.
    #[error("cannot run nft ({action}): {source}")]
    NftSpawn {
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// `nft` ran and reported an error.
    #[error("nft failed to {action} (table inet berth), {status}: {stderr}")]
    Nft {
        action: &'static str,
        status: String,
        stderr: String,
    },
    /// `nft -j` printed something that is not the expected JSON.
    #[error("nft -j {action}: unexpected output: {detail}")]
    NftOutput {
        action: &'static str,
        detail: String,
    },
    /// Writing an interface's sysctl failed.
    #[error("sysctl {path}: {source}")]
    IfSysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Opening a macvtap's tap device failed.
    #[error("macvtap: {what}: {source}")]
    Macvtap {
        what: String,
        #[source]
        source: io::Error,
    },
}
