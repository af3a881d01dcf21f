//! The one typed control plane: what the daemon serves on its unix socket and
//! the CLI sends. The OpenAPI document (`openapi/berth.json`) is generated
//! from these types by [`openapi()`]; a test keeps the committed copy equal to
//! it and checks the running server's answers against it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use berth_plan::Plan;
pub use berth_spec::Spec;

/// Default socket path (override with `--socket` / `BERTH_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/berth/berth.sock";
/// Default state dir (override with `--state-dir` / `BERTH_STATE_DIR`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/berth";

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VersionInfo {
    /// berth's version.
    pub version: String,
    /// API version, the path prefix (`v1`).
    pub api: String,
    /// PID of the daemon.
    pub pid: u32,
}

/// One guest as `berth ps` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct GuestInfo {
    pub name: String,
    /// `container` or `vm`.
    pub kind: String,
    pub index: u32,
    /// `running`, `starting`, `booting` (a VM whose guest has not yet sent a
    /// packet), `restarting`, `stopping`, `stopped`, `failed` (`crashed` for a VM),
    /// `missing` (should run but no supervisor found), `creating`/`removing`
    /// (an apply is in progress or died half-way).
    pub state: String,
    /// The guest's leader process (its PID 1) as seen from the host.
    pub pid: Option<i32>,
    /// The guest's supervisor (`berth shim`).
    pub shim_pid: Option<i32>,
    /// Guest addresses (IPv4, then IPv6).
    pub addresses: Vec<String>,
    /// Host-side link name (`vb<index>`).
    pub link: String,
    /// Restarts by policy since the supervisor started.
    pub restarts: u32,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// `always`, `on-failure` or `never`.
    pub restart: String,
    pub autostart: bool,
    /// Unix time the guest last became running.
    pub started_at: Option<u64>,
    /// How the guest last ended, e.g. "exited with status 1".
    pub last_exit: Option<String>,
    /// Last error or warnings from the supervisor.
    pub message: Option<String>,
    /// VMs: the accelerator QEMU got, `kvm` or `tcg`.
    #[serde(default)]
    pub accel: Option<String>,
    /// What the health probes say: `healthy`, `unhealthy`, `unknown`
    /// (not probed enough yet), `down` (not running); none without a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// The last failed probe, while not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_error: Option<String>,
    /// The group this guest is a member of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Service addresses routed to this guest right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub serving: Vec<String>,
    /// Why the guest is out of its service address (`rollout`, `scale`,
    /// or the host is drained: `host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drained: Option<String>,
}

/// Body of `POST /v1/drain`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// true: withdraw every service address from this host's members;
    /// false: route them again.
    pub drain: bool,
}

/// Answer of `POST /v1/drain`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DrainResponse {
    pub drained: bool,
    /// Service addresses and where they are routed now.
    pub routes: Vec<String>,
}

/// Body of `POST /v1/plan` and `POST /v1/apply`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SpecRequest {
    /// The spec, as parsed from the file.
    pub spec: Spec,
    /// Where it came from, for messages (`examples/demo.toml`).
    #[serde(default)]
    pub file: String,
    /// Apply even if that deletes disks berth made from images (a guest
    /// removed from the spec, or a disk whose image changed). Default false:
    /// such an apply is refused before anything is touched.
    #[serde(default)]
    pub allow_disruption: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PlanResponse {
    pub plan: Plan,
    /// The plan as `berth plan` prints it.
    pub text: String,
    /// Things worth knowing that do not stop the plan.
    pub warnings: Vec<String>,
}

/// One line of the `POST /v1/apply` stream (`application/x-ndjson`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ApplyEvent {
    /// The plan about to be applied (first line).
    Plan { text: String, actions: usize },
    /// A step of one guest (or the host when `guest` is null) began, ended or failed.
    Step {
        guest: Option<String>,
        step: String,
        status: StepStatus,
        message: String,
        elapsed_ms: u64,
    },
    /// Last line.
    Done {
        ok: bool,
        summary: String,
        errors: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Started,
    Done,
    Failed,
    RolledBack,
}

/// Body of `POST /v1/guests/{name}/exec`: run a command in the guest.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments, e.g. ["/bin/sh", "-c", "echo hi"].
    pub argv: Vec<String>,
    /// Bytes fed to the command's stdin, base64 (standard alphabet).
    #[serde(default)]
    pub stdin: String,
    /// Kill the command after this many seconds (default 300).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Run as this user (containers): a name from the guest's /etc/passwd,
    /// or `uid[:gid]`. Default root.
    #[serde(default)]
    pub user: Option<String>,
}

/// The outcome of an exec: exact bytes, base64, and the exit status.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ExecResponse {
    /// Exit code, or 128 + signal number when the command was killed.
    pub exit_code: i32,
    /// stdout, base64 (standard alphabet).
    pub stdout: String,
    /// stderr, base64 (standard alphabet).
    pub stderr: String,
    /// Which channel carried the command: `nsenter` (containers); for VMs
    /// `agent` (QEMU guest agent), `exec-port` (berth's virtio-serial
    /// shell) or `console` (serial console). Absent where not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

/// One stored, encrypted backup of a guest's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct BackupInfo {
    /// Absolute path of the age-encrypted file (0600).
    pub file: String,
    /// Unix time it was taken.
    pub created: u64,
    /// Size of the encrypted file in bytes.
    pub bytes: u64,
}

/// Body of `POST /v1/guests/{name}/restore`: the decrypted configuration
/// (the client decrypts with its age identity; the daemon holds no keys).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// base64 (standard alphabet).
    pub data: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DestroyResponse {
    /// Guests removed.
    pub destroyed: Vec<String>,
    /// Host resources removed (links, nft table, cgroups).
    pub removed: Vec<String>,
}

/// Every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// One line: what went wrong and what to do.
    pub error: String,
    /// Further causes or every validation error, one per entry.
    #[serde(default)]
    pub details: Vec<String>,
}

/// The OpenAPI 3.1 document of the API, generated from the types above.
pub fn openapi() -> serde_json::Value {
    use serde_json::json;
    // OpenAPI 3.1 schemas are JSON Schema 2020-12 (nullable is `type: [.., "null"]`).
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    let r = |s: schemars::Schema| serde_json::to_value(s).unwrap_or_default();
    let version = r(generator.subschema_for::<VersionInfo>());
    let guest = r(generator.subschema_for::<GuestInfo>());
    let guests = r(generator.subschema_for::<Vec<GuestInfo>>());
    let spec_req = r(generator.subschema_for::<SpecRequest>());
    let plan = r(generator.subschema_for::<PlanResponse>());
    let event = r(generator.subschema_for::<ApplyEvent>());
    let destroy = r(generator.subschema_for::<DestroyResponse>());
    let exec_req = r(generator.subschema_for::<ExecRequest>());
    let exec_resp = r(generator.subschema_for::<ExecResponse>());
    let backup = r(generator.subschema_for::<BackupInfo>());
    let backups = r(generator.subschema_for::<Vec<BackupInfo>>());
    let restore = r(generator.subschema_for::<RestoreRequest>());
    let error = r(generator.subschema_for::<ErrorBody>());
    let drain_req = r(generator.subschema_for::<DrainRequest>());
    let drain_resp = r(generator.subschema_for::<DrainResponse>());
    let defs = generator.take_definitions(true);

    let ok = |schema: &serde_json::Value, what: &str| json!({ "description": what, "content": { "application/json": { "schema": schema } } });
    let err = |what: &str| json!({ "description": what, "content": { "application/json": { "schema": error } } });
    let name_param =
        json!({ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } });
    let action = |verb: &str| {
        json!({ "post": {
            "summary": format!("{verb} one guest"),
            "operationId": format!("{}_guest", verb.to_lowercase()),
            "parameters": [name_param],
            "responses": { "200": ok(&guest, "the guest after the action"), "404": err("no such guest"), "409": err("the guest cannot do that in its state"), "500": err("the action failed") }
        }})
    };
    let body = |schema: &serde_json::Value| json!({ "required": true, "content": { "application/json": { "schema": schema } } });

    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "berth",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "berth daemon API, served as HTTP/1.1 on a unix socket (default /run/berth/berth.sock, mode 0600). Generated from crates/api; do not edit by hand (regenerate with `berth openapi > openapi/berth.json`)."
        },
        "paths": {
            "/v1/version": { "get": { "summary": "daemon version", "operationId": "version", "responses": { "200": ok(&version, "version") } } },
            "/v1/guests": {
                "get": { "summary": "list guests (berth ps)", "operationId": "list_guests", "responses": { "200": ok(&guests, "all guests, by name"), "500": err("store error") } },
                "delete": { "summary": "destroy every guest and every host resource berth made", "operationId": "destroy_all", "responses": { "200": ok(&destroy, "what was removed"), "500": err("some resource could not be removed") } }
            },
            "/v1/guests/{name}": {
                "get": { "summary": "one guest", "operationId": "get_guest", "parameters": [name_param], "responses": { "200": ok(&guest, "the guest"), "404": err("no such guest") } },
                "delete": { "summary": "destroy one guest", "operationId": "destroy_guest", "parameters": [name_param], "responses": { "200": ok(&destroy, "what was removed"), "404": err("no such guest"), "500": err("removal failed") } }
            },
            "/v1/guests/{name}/logs": { "get": {
                "summary": "the guest's console history (or its supervisor's events), optionally followed",
                "operationId": "guest_logs",
                "parameters": [
                    name_param,
                    { "name": "follow", "in": "query", "required": false, "schema": { "type": "boolean" }, "description": "keep the answer open and send what is appended" },
                    { "name": "source", "in": "query", "required": false, "schema": { "type": "string", "enum": ["console", "supervisor"] } },
                    { "name": "tail", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 }, "description": "only the last N lines" },
                    { "name": "since", "in": "query", "required": false, "schema": { "type": "integer", "minimum": 0 }, "description": "only what was written at or after this Unix time" }
                ],
                "responses": {
                    "200": { "description": "raw bytes as the guest wrote them", "content": { "text/plain": { "schema": { "type": "string" } } } },
                    "400": err("unknown source"),
                    "404": err("no such guest")
                }
            } },
            "/v1/guests/{name}/exec": { "post": {
                "summary": "run a command in a running guest and return its exact stdout, stderr and exit code",
                "operationId": "exec",
                "parameters": [name_param],
                "requestBody": body(&exec_req),
                "responses": {
                    "200": ok(&exec_resp, "the command ran (whatever its exit code)"),
                    "400": err("bad request (empty argv, stdin not base64)"),
                    "404": err("no such guest"),
                    "409": err("the guest is not running, or exec is not available for it"),
                    "500": err("the command could not be run")
                }
            } },
            "/v1/guests/{name}/exec-stream": { "post": {
                "summary": "run a command as root in a running guest with the request body (any length) as its stdin",
                "description": "The body (`application/octet-stream`, may be chunked) is streamed to the command as it arrives (containers) or spooled to a temp file in the guest through exec and then fed to it (VMs: 1 MiB per guest-agent call, 2 KiB per console line). Used by `berth copy-closure` for `nix-store --import`.",
                "operationId": "exec_stream",
                "parameters": [
                    name_param,
                    { "name": "argv", "in": "query", "required": true, "schema": { "type": "string" }, "description": "the command, a JSON array of strings" },
                    { "name": "timeout_secs", "in": "query", "required": false, "schema": { "type": "integer" }, "description": "kill the command after this many seconds (default 3600)" }
                ],
                "requestBody": { "required": false, "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } } },
                "responses": {
                    "200": ok(&exec_resp, "the command ran (whatever its exit code)"),
                    "400": err("argv is not a JSON array of strings, or empty"),
                    "404": err("no such guest"),
                    "409": err("the guest is not running"),
                    "500": err("the command could not be run")
                }
            } },
            "/v1/guests/{name}/exec-tty": { "get": {
                "summary": "interactive exec in a container: a command on a pty, over an upgraded connection",
                "description": "Send `Connection: Upgrade` and `Upgrade: berth-exec`. After `101 Switching Protocols` the client's bytes go to the command's terminal and its output comes back; the stream ends with `\\0BERTH-EXIT <code>\\n`. VMs: use the console.",
                "operationId": "exec_tty",
                "parameters": [
                    name_param,
                    { "name": "argv", "in": "query", "required": true, "schema": { "type": "string" }, "description": "the command, a JSON array of strings" },
                    { "name": "user", "in": "query", "required": false, "schema": { "type": "string" } },
                    { "name": "rows", "in": "query", "required": false, "schema": { "type": "integer" } },
                    { "name": "cols", "in": "query", "required": false, "schema": { "type": "integer" } }
                ],
                "responses": {
                    "101": { "description": "switched to the raw terminal stream" },
                    "400": err("argv is not a JSON array of strings, or empty"),
                    "404": err("no such guest"),
                    "409": err("the guest is not running, or is a VM")
                }
            } },
            "/v1/guests/{name}/console": { "get": {
                "summary": "attach to the guest's console (upgrades the connection to a raw byte stream)",
                "description": "Send `Connection: Upgrade` and `Upgrade: berth-console`. After `101 Switching Protocols` the connection carries the console's recent history, then live output; in `write` mode the client's bytes are typed into the guest. One writer at a time, any number of readers. Ctrl-] is the CLI's detach key, not part of the protocol.",
                "operationId": "console",
                "parameters": [
                    name_param,
                    { "name": "mode", "in": "query", "required": false, "schema": { "type": "string", "enum": ["write", "read"] } }
                ],
                "responses": {
                    "101": { "description": "switched to the raw console stream" },
                    "400": err("unknown mode"),
                    "404": err("no such guest"),
                    "409": err("the guest is not running, or another client is writing")
                }
            } },
            "/v1/guests/{name}/backup": { "post": {
                "summary": "run the guest's backup.command and store its output encrypted to backup.recipients",
                "operationId": "backup",
                "parameters": [name_param],
                "responses": { "200": ok(&backup, "the stored backup"), "404": err("no such guest"), "409": err("no backup declared, or the guest is not running"), "500": err("the backup command failed") }
            } },
            "/v1/guests/{name}/backups": { "get": {
                "summary": "stored backups, oldest first",
                "operationId": "list_backups",
                "parameters": [name_param],
                "responses": { "200": ok(&backups, "backups"), "404": err("no such guest") }
            } },
            "/v1/guests/{name}/restore": { "post": {
                "summary": "feed a decrypted configuration to the guest's backup.restore_command",
                "operationId": "restore",
                "parameters": [name_param],
                "requestBody": body(&restore),
                "responses": { "200": ok(&exec_resp, "what the restore command printed and its exit code"), "400": err("data is not base64"), "404": err("no such guest"), "409": err("no restore_command declared, or the guest is not running") }
            } },
            "/v1/guests/{name}/start": action("Start"),
            "/v1/guests/{name}/stop": action("Stop"),
            "/v1/guests/{name}/restart": action("Restart"),
            "/v1/drain": { "post": {
                "summary": "withdraw every group's service address from this host (before host maintenance), or route them again",
                "operationId": "drain",
                "requestBody": body(&drain_req),
                "responses": { "200": ok(&drain_resp, "the drain state and the routes now"), "500": err("a route could not be changed") }
            } },
            "/v1/plan": { "post": { "summary": "plan a spec against the current state", "operationId": "plan", "requestBody": body(&spec_req), "responses": { "200": ok(&plan, "the plan"), "400": err("the body is not a spec"), "422": err("the spec is invalid; details lists every error") } } },
            "/v1/apply": { "post": {
                "summary": "apply a spec; streams progress (an apply already running, or being resumed after a daemon restart, is waited for: a `wait` step says so)",
                "operationId": "apply",
                "requestBody": body(&spec_req),
                "responses": {
                    "200": { "description": "one ApplyEvent per line; the last is `done`", "content": { "application/x-ndjson": { "schema": event } } },
                    "400": err("the body is not a spec"),
                    "422": err("the spec is invalid; details lists every error")
                }
            } }
        },
        "components": { "schemas": defs }
    })
}
