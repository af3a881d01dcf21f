//! What the shim reports and how the daemon asks: one JSON object per line
//! over the shim's unix socket.
//!
//! ```text
//!            start ok                 guest exits, policy says restart
//! Starting ─────────▶ Running ───────────────────────▶ Restarting ──▶ Starting
//!     │                  │ stop / SIGTERM                    │
//!     │ error            ▼                                   │ stop
//!     └──────▶ Failed   Stopping ──▶ Stopped ◀───────────────┘
//!   (policy never / exhausted)       (shim exits)
//! ```

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShimState {
    Starting,
    /// A VM whose QEMU runs but whose guest has not yet sent a packet on its
    /// link (still booting, or a guest without network).
    Booting,
    Running,
    Restarting,
    Stopping,
    Stopped,
    Failed,
}

impl ShimState {
    /// The shim has ended (or is about to) and the guest is not running.
    pub fn is_final(self) -> bool {
        matches!(self, ShimState::Stopped | ShimState::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ShimState::Starting => "starting",
            ShimState::Booting => "booting",
            ShimState::Running => "running",
            ShimState::Restarting => "restarting",
            ShimState::Stopping => "stopping",
            ShimState::Stopped => "stopped",
            ShimState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code, when the guest exited normally.
    pub code: Option<i32>,
    /// Signal number, when it was killed.
    pub signal: Option<i32>,
    /// Unix time in seconds.
    pub at: u64,
}

impl ExitInfo {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with status {c}"),
            (_, Some(s)) => format!("killed by signal {s}"),
            _ => "ended".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShimStatus {
    pub guest: String,
    pub shim_pid: i32,
    pub state: ShimState,
    /// systemd-nspawn's PID.
    pub runner_pid: Option<i32>,
    /// The guest's leader (its PID 1) as seen from the host.
    pub leader_pid: Option<i32>,
    /// Times the guest was restarted by policy since the shim started.
    pub restarts: u32,
    pub last_exit: Option<ExitInfo>,
    /// Unix time the guest last became running.
    pub started_at: Option<u64>,
    /// Human-readable detail: last error, warnings.
    pub message: Option<String>,
    /// VMs: the accelerator QEMU got ("kvm" or "tcg").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Reply once the guest has left `starting` (running, or failed to
    /// start): lets the daemon wait for a start without polling.
    WaitStarted,
    /// Stop the guest; the reply comes once it has stopped and the shim is exiting.
    Stop,
    /// Reread config.json and apply what can change live.
    Reload,
    /// Type `script` into the guest's console and answer with what it printed
    /// until `end` ([`ConsoleOutput`]).
    ConsoleScript {
        script: String,
        end: String,
        timeout_ms: u64,
    },
    /// Run `argv` in a VM through the QEMU guest agent (`guest-exec`), if
    /// one answers; see [`AgentExecReply`].
    AgentExec {
        argv: Vec<String>,
        /// stdin, base64 (standard alphabet).
        #[serde(default)]
        stdin: String,
        timeout_ms: u64,
    },
}

/// The answer to [`Request::AgentExec`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AgentExecReply {
    /// No agent answered (no port, not open in the guest, or silent): the
    /// command did not run; try the next channel.
    NoAgent { reason: String },
    /// The command ran. stdout and stderr are base64.
    Done {
        exit_code: i32,
        stdout: String,
        stderr: String,
    },
    /// The agent took the request but it failed (missing program, timeout,
    /// output cut at the agent's cap): final, do not run it elsewhere.
    Failed { error: String },
}

/// The answer to [`Request::ConsoleScript`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleOutput {
    /// What the guest printed (lossy UTF-8: scripts print text, e.g. base64).
    pub output: Option<String>,
    pub error: Option<String>,
    /// Where the script ran: `exec-port` (virtio-serial `berth.exec`) or
    /// `console` (serial console). Absent from shims older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}
