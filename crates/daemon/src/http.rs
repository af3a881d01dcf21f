//! HTTP/JSON handlers. Each turns a request into one engine call; blocking
//! work runs on the blocking pool.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State, rejection::JsonRejection};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use berth_api::{
    ApplyEvent, DestroyResponse, ErrorBody, GuestInfo, PlanResponse, SpecRequest, StepStatus,
    VersionInfo,
};
use berth_plan::{Action, ActionKind, Plan};
use berth_spec::Desired;
use tokio::sync::{Mutex, mpsc};

use crate::engine::{Engine, EngineError, LocalProbe};

#[derive(Clone)]
pub(crate) struct App {
    pub(crate) engine: Arc<Engine>,
    /// One apply (or destroy) at a time.
    apply_lock: Arc<Mutex<()>>,
}

pub fn router(engine: Arc<Engine>, apply_lock: Arc<Mutex<()>>) -> axum::Router {
    let app = App { engine, apply_lock };
    axum::Router::new()
        .route("/v1/version", get(version))
        .route("/v1/guests", get(list).delete(destroy_all))
        .route("/v1/guests/{name}", get(one).delete(destroy_one))
        .route("/v1/guests/{name}/start", post(start))
        .route("/v1/guests/{name}/stop", post(stop))
        .route("/v1/guests/{name}/restart", post(restart))
        .route("/v1/guests/{name}/logs", get(logs))
        .route("/v1/guests/{name}/exec", post(exec))
        .route(
            "/v1/guests/{name}/exec-stream",
            post(crate::stream_exec::handler),
        )
        .route("/v1/guests/{name}/console", get(console))
        .route("/v1/guests/{name}/exec-tty", get(exec_tty))
        .route("/v1/guests/{name}/backup", post(backup))
        .route("/v1/guests/{name}/backups", get(backups))
        .route("/v1/guests/{name}/restore", post(restore))
        .route("/v1/plan", post(plan))
        .route("/v1/apply", post(apply))
        .route("/v1/drain", post(drain))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see openapi/berth.json",
            )
        })
        .with_state(app)
}

pub(crate) struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: msg.into(),
                details: vec![],
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let status = match e {
            EngineError::NoSuchGuest(_) => StatusCode::NOT_FOUND,
            EngineError::Conflict(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "request body is not a valid spec request: {}",
                e.body_text()
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal task failed: {e}"),
        )),
    }
}

async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        api: "v1".into(),
        pid: std::process::id(),
    })
}

async fn list(State(app): State<App>) -> Result<Json<Vec<GuestInfo>>, ApiError> {
    let e = app.engine.clone();
    Ok(Json(blocking(move || e.list()).await?))
}

async fn one(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    let e = app.engine.clone();
    Ok(Json(blocking(move || e.info(&name)).await?))
}

/// A lifecycle action on one guest, under the apply lock; answers the guest.
async fn guest_action(
    app: App,
    name: String,
    act: impl FnOnce(&Engine, &str) -> Result<(), EngineError> + Send + 'static,
) -> Result<Json<GuestInfo>, ApiError> {
    let _g = app.apply_lock.lock().await;
    let e = app.engine.clone();
    Ok(Json(
        blocking(move || act(&e, &name).and_then(|()| e.info(&name))).await?,
    ))
}

async fn start(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    guest_action(app, name, |e, n| e.start(n)).await
}

async fn stop(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    guest_action(app, name, |e, n| e.stop(n)).await
}

async fn restart(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<GuestInfo>, ApiError> {
    guest_action(app, name, |e, n| e.restart(n)).await
}

async fn exec(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Result<Json<berth_api::ExecRequest>, JsonRejection>,
) -> Result<Json<berth_api::ExecResponse>, ApiError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Json(req) = body?;
    if req.argv.first().is_none_or(|p| p.is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "argv is empty: give the program and its arguments",
        ));
    }
    let stdin = b64
        .decode(&req.stdin)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("stdin is not base64: {e}")))?;
    let timeout = std::time::Duration::from_secs(req.timeout_secs.unwrap_or(300));
    let e = app.engine.clone();
    let ((code, out, err), channel) =
        blocking(move || e.exec_via(&name, &req.argv, stdin, timeout, req.user.as_deref())).await?;
    Ok(Json(berth_api::ExecResponse {
        exit_code: code,
        stdout: b64.encode(out),
        stderr: b64.encode(err),
        channel: Some(channel.to_string()),
    }))
}

async fn backup(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<berth_api::BackupInfo>, ApiError> {
    let e = app.engine.clone();
    Ok(Json(blocking(move || e.backup(&name)).await?))
}

async fn backups(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<Vec<berth_api::BackupInfo>>, ApiError> {
    let e = app.engine.clone();
    Ok(Json(blocking(move || e.backups(&name)).await?))
}

async fn restore(
    State(app): State<App>,
    Path(name): Path<String>,
    body: Result<Json<berth_api::RestoreRequest>, JsonRejection>,
) -> Result<Json<berth_api::ExecResponse>, ApiError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let Json(req) = body?;
    let data = b64
        .decode(&req.data)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("data is not base64: {e}")))?;
    let e = app.engine.clone();
    let (code, out, err) = blocking(move || e.restore(&name, data)).await?;
    Ok(Json(berth_api::ExecResponse {
        exit_code: code,
        stdout: b64.encode(out),
        stderr: b64.encode(err),
        channel: None,
    }))
}

#[derive(serde::Deserialize)]
struct ExecTtyQuery {
    /// The command, a JSON array of strings.
    argv: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    rows: Option<u16>,
    #[serde(default)]
    cols: Option<u16>,
}

/// The last bytes of an interactive exec stream: `\0BERTH-EXIT <code>\n`.
pub const EXIT_TRAILER: &str = "\0BERTH-EXIT ";

/// Interactive exec (containers): upgrades the connection and relays it to
/// a command running on a pty; when the command ends, the stream ends with
/// [`EXIT_TRAILER`] and its exit code.
async fn exec_tty(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<ExecTtyQuery>,
    mut req: axum::extract::Request,
) -> Result<Response, ApiError> {
    use tokio::io::AsyncWriteExt;
    let argv: Vec<String> = serde_json::from_str(&q.argv).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("argv must be a JSON array of strings: {e}"),
        )
    })?;
    if argv.first().is_none_or(|p| p.is_empty()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "argv is empty: give the program and its arguments",
        ));
    }
    let e = app.engine.clone();
    let (mut child, master) = blocking(move || {
        e.exec_tty(
            &name,
            &argv,
            q.user.as_deref(),
            q.rows.unwrap_or(24),
            q.cols.unwrap_or(80),
        )
    })
    .await?;
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            let _ = child.kill();
            let _ = child.wait();
            return;
        };
        let (mut client_rd, mut client_wr) =
            tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        let writer = master.try_clone().map(tokio::fs::File::from_std);
        let mut from_guest = tokio::fs::File::from_std(master);
        let input = tokio::spawn(async move {
            if let Ok(mut w) = writer {
                let _ = tokio::io::copy(&mut client_rd, &mut w).await;
            }
        });
        // Output until the pty reports the command's side closed (EIO).
        let _ = tokio::io::copy(&mut from_guest, &mut client_wr).await;
        input.abort();
        let code = tokio::task::spawn_blocking(move || {
            use std::os::unix::process::ExitStatusExt;
            child
                .wait()
                .map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
                .unwrap_or(255)
        })
        .await
        .unwrap_or(255);
        let _ = client_wr
            .write_all(format!("{EXIT_TRAILER}{code}\n").as_bytes())
            .await;
        let _ = client_wr.shutdown().await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "berth-exec")
        .body(Body::empty())
        .unwrap_or_default())
}

#[derive(serde::Deserialize)]
struct ConsoleQuery {
    /// `write` (default: type into the guest; one writer at a time) or `read`.
    #[serde(default)]
    mode: Option<String>,
}

/// Attaches to a guest's console: answers `101 Switching Protocols`
/// (`Upgrade: berth-console`) and then relays raw bytes both ways between
/// the client and the guest's supervisor, which owns the console. The
/// daemon holds no console state: after a daemon restart, attach again.
async fn console(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
    mut req: axum::extract::Request,
) -> Result<Response, ApiError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mode = match q.mode.as_deref() {
        None | Some("write") => "write",
        Some("read") => "read",
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown console mode `{other}`; use write or read"),
            ));
        }
    };
    let e = app.engine.clone();
    let n = name.clone();
    blocking(move || e.info(&n)).await?;
    let sock = app.engine.paths(&name).console_socket();
    let conflict = |m: String| ApiError::new(StatusCode::CONFLICT, m);
    let stream = tokio::net::UnixStream::connect(&sock).await.map_err(|_| {
        conflict(format!(
            "guest `{name}` has no console now (not running?); start it with `berth start {name}`"
        ))
    })?;
    let mut stream = tokio::io::BufReader::new(stream);
    stream
        .get_mut()
        .write_all(format!("{mode}\n").as_bytes())
        .await
        .map_err(|e| conflict(e.to_string()))?;
    let mut answer = String::new();
    stream
        .read_line(&mut answer)
        .await
        .map_err(|e| conflict(e.to_string()))?;
    match answer.trim() {
        "ok" => {}
        "busy" => {
            return Err(conflict(format!(
                "the console of `{name}` is taken for writing by another client; attach read-only with `berth console --read-only {name}`"
            )));
        }
        other => {
            return Err(conflict(format!(
                "the supervisor refused the console: {other}"
            )));
        }
    }
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let mut client = hyper_util::rt::TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut stream).await;
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "berth-console")
        .body(Body::empty())
        .unwrap_or_default())
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    /// Keep the answer open and send what is appended.
    #[serde(default)]
    follow: bool,
    /// `console` (default): the guest's console/stdout; `supervisor`: its
    /// shim's lifecycle events.
    #[serde(default)]
    source: Option<String>,
    /// Only the last N lines of what is there now.
    #[serde(default)]
    tail: Option<usize>,
    /// Only what was written at or after this Unix time.
    #[serde(default)]
    since: Option<u64>,
}

/// The guest's console history (or its supervisor's events), raw bytes,
/// optionally followed.
async fn logs(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let e = app.engine.clone();
    let n = name.clone();
    blocking(move || e.info(&n)).await?;
    let paths = app.engine.paths(&name);
    let file = match q.source.as_deref() {
        None | Some("console") => paths.console_log(),
        Some("supervisor") => paths.shim_log(),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown log source `{other}`; use console or supervisor"),
            ));
        }
    };
    let data = tokio::fs::read(&file).await.unwrap_or_default();
    let from_time = match q.since {
        None => 0,
        Some(t) if q.source.as_deref() == Some("supervisor") => since_offset_stamped(&data, t),
        Some(t) => since_offset_indexed(
            &tokio::fs::read_to_string(file.with_extension("idx"))
                .await
                .unwrap_or_default(),
            t,
        )
        .min(data.len()),
    };
    let start = match q.tail {
        Some(n) => tail_offset(&data, n).max(from_time),
        None => from_time,
    };
    let first = data[start..].to_vec();
    let offset = data.len() as u64;
    let follow = q.follow;
    let stream = futures::stream::unfold(
        (Some(first), offset, file),
        move |(first, mut offset, file)| async move {
            if let Some(chunk) = first {
                return Some((
                    Ok::<_, std::convert::Infallible>(chunk),
                    (None, offset, file),
                ));
            }
            if !follow {
                return None;
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let Ok(meta) = tokio::fs::metadata(&file).await else {
                    return None; // the guest was destroyed
                };
                if meta.len() < offset {
                    offset = 0; // rotated
                }
                if meta.len() > offset {
                    let chunk = read_from(&file, offset).await;
                    let end = offset + chunk.len() as u64;
                    return Some((Ok(chunk), (None, end, file)));
                }
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// What `file` holds from byte `offset` on (empty on any error).
async fn read_from(file: &std::path::Path, offset: u64) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut buf = Vec::new();
    if let Ok(mut f) = tokio::fs::File::open(file).await
        && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
    {
        let _ = f.read_to_end(&mut buf).await;
    }
    buf
}

/// Where lines stamped `<unix secs> ...` (the supervisor's log) reach `since`.
fn since_offset_stamped(data: &[u8], since: u64) -> usize {
    let mut pos = 0;
    for line in data.split_inclusive(|&b| b == b'\n') {
        let ts = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok());
        if ts.is_some_and(|t| t >= since) {
            return pos;
        }
        pos += line.len();
    }
    data.len()
}

/// From console.idx (`<unix secs> <offset>` per second with output): the
/// offset of the first output at or after `since`.
fn since_offset_indexed(idx: &str, since: u64) -> usize {
    idx.lines()
        .filter_map(|l| {
            let (t, o) = l.split_once(' ')?;
            Some((t.parse::<u64>().ok()?, o.parse::<usize>().ok()?))
        })
        .find(|(t, _)| *t >= since)
        .map_or(usize::MAX, |(_, o)| o)
}

/// Byte offset where the last `n` lines of `data` begin.
fn tail_offset(data: &[u8], n: usize) -> usize {
    if n == 0 {
        return data.len();
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    body.iter()
        .enumerate()
        .rev()
        .filter(|(_, b)| **b == b'\n')
        .nth(n - 1)
        .map_or(0, |(i, _)| i + 1)
}

async fn destroy_one(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<DestroyResponse>, ApiError> {
    let _g = app.apply_lock.lock().await;
    let e = app.engine.clone();
    let removed = blocking(move || {
        let removed = e.destroy(&name, 0)?;
        Ok((name, removed))
    })
    .await?;
    Ok(Json(DestroyResponse {
        destroyed: vec![removed.0],
        removed: removed.1,
    }))
}

async fn destroy_all(State(app): State<App>) -> Result<Json<DestroyResponse>, ApiError> {
    let _g = app.apply_lock.lock().await;
    let e = app.engine.clone();
    let (names, removed) = blocking(move || {
        let names: Vec<String> = e.store.guests()?.into_iter().map(|r| r.name).collect();
        Ok((names, e.destroy_all()?))
    })
    .await?;
    Ok(Json(DestroyResponse {
        destroyed: names,
        removed,
    }))
}

/// Validates a spec request in the daemon's view of the host.
async fn validated(req: SpecRequest) -> Result<Desired, ApiError> {
    let res = tokio::task::spawn_blocking(move || {
        let file = if req.file.is_empty() {
            "<request>".to_string()
        } else {
            req.file.clone()
        };
        berth_spec::validate(&req.spec, std::path::Path::new(&file), &LocalProbe)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    res.map_err(|errs| ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        body: ErrorBody {
            error: format!("the spec has {} error(s)", errs.len()),
            details: errs.iter().map(|e| e.to_string()).collect(),
        },
    })
}

fn warnings(desired: &Desired) -> Vec<String> {
    let mut w = Vec::new();
    if !berth_container::systemd_available()
        && desired
            .guests
            .values()
            .any(|g| g.kind == berth_spec::GuestKind::Container)
    {
        w.push("systemd/D-Bus not running: containers are not registered with machined (machinectl will not list them)".into());
    }
    w.extend(berth_spec::nic::warnings(desired));
    w
}

async fn drain(
    State(app): State<App>,
    body: Result<Json<berth_api::DrainRequest>, JsonRejection>,
) -> Result<Json<berth_api::DrainResponse>, ApiError> {
    let Json(req) = body?;
    let e = app.engine.clone();
    let resp = blocking(move || {
        e.set_host_drain(req.drain)?;
        let routes = e
            .vip_routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(vip, to)| {
                if to.is_empty() {
                    format!("{vip} withdrawn")
                } else {
                    format!("{vip} -> {}", to.join(" + "))
                }
            })
            .collect();
        Ok(berth_api::DrainResponse {
            drained: e.host_drained()?,
            routes,
        })
    })
    .await?;
    Ok(Json(resp))
}

async fn plan(
    State(app): State<App>,
    body: Result<Json<SpecRequest>, JsonRejection>,
) -> Result<Json<PlanResponse>, ApiError> {
    let Json(req) = body?;
    let desired = validated(req).await?;
    let e = app.engine.clone();
    let d = desired.clone();
    let plan = blocking(move || Ok(berth_plan::plan(&d, &e.observed()?))).await?;
    Ok(Json(PlanResponse {
        text: plan.to_string(),
        plan,
        warnings: warnings(&desired),
    }))
}

async fn apply(
    State(app): State<App>,
    body: Result<Json<SpecRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let source = if req.file.is_empty() {
        "<request>".to_string()
    } else {
        req.file.clone()
    };
    let spec_json = serde_json::to_string(&req.spec).unwrap_or_default();
    let allow_disruption = req.allow_disruption;
    let desired = validated(req).await?;
    let (tx, rx) = mpsc::channel::<ApplyEvent>(256);
    let engine = app.engine.clone();
    // Applies run one at a time: a second one waits for the first (or for
    // the resumption of one a killed daemon left unfinished), and says so.
    let lock = app.apply_lock.clone();
    tokio::task::spawn_blocking(move || {
        let guard = match lock.clone().try_lock_owned() {
            Ok(g) => g,
            Err(_) => {
                let t = Instant::now();
                let _ = tx.blocking_send(step(
                    None,
                    "wait",
                    StepStatus::Started,
                    "another apply is running (or being resumed after a daemon restart); waiting for it to end".into(),
                    t,
                ));
                let g = lock.blocking_lock_owned();
                let _ = tx.blocking_send(step(None, "wait", StepStatus::Done, String::new(), t));
                g
            }
        };
        let _guard = guard;
        run_apply(
            &engine,
            &desired,
            &source,
            &spec_json,
            allow_disruption,
            &tx,
        );
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Executes a plan: host first, destroys one by one, then every other guest
/// action in parallel. Emits one event per step; never panics on a guest
/// failure (it is reported and the rest carries on).
fn run_apply(
    engine: &Engine,
    desired: &Desired,
    source: &str,
    spec_json: &str,
    allow_disruption: bool,
    tx: &mpsc::Sender<ApplyEvent>,
) {
    let send = |ev: ApplyEvent| {
        let _ = tx.blocking_send(ev);
    };
    let fail = |msg: String| send(apply_failed(msg));
    let observed = match engine.observed() {
        Ok(o) => o,
        Err(e) => return fail(e.to_string()),
    };
    let plan: Plan = berth_plan::plan(desired, &observed);
    send(ApplyEvent::Plan {
        text: plan.to_string(),
        actions: plan.actions.len(),
    });
    // Pre-flight: VMs about to start on hugepages must all fit, or nothing
    // starts (the check in each supervisor would leave half an apply).
    let hugepage_mib: u64 = plan
        .actions
        .iter()
        .filter(|a| {
            matches!(
                a.kind,
                ActionKind::Create | ActionKind::Replace | ActionKind::Start
            ) && a.start
        })
        .filter_map(|a| desired.guests.get(a.guest.as_deref()?)?.vm.as_ref())
        .filter(|vm| vm.hugepages)
        .map(|vm| vm.memory_mib)
        .sum();
    if hugepage_mib > 0
        && let Err(e) = berth_vm::check_hugepages(hugepage_mib)
    {
        return fail(format!("not starting anything: {e}"));
    }
    // Disks made from images are never deleted without being asked to.
    if let Err(e) = crate::images::check_disruption(&plan, desired, &observed, allow_disruption) {
        return fail(e);
    }
    // Every image the plan needs is pulled and verified before any guest is
    // touched; the hold keeps `berth image gc` away until the apply ends.
    let _images_hold = match crate::images::pull_all(&engine.state_dir, &plan, desired, &send) {
        Ok(h) => h,
        Err(e) => return fail(e),
    };

    // A rolling update that cannot keep min_available is refused before
    // anything changes.
    let blocked: Vec<String> = plan
        .rollouts
        .iter()
        .filter_map(|r| r.blocked.clone())
        .collect();
    if !blocked.is_empty() {
        return fail(format!("not applying anything: {}", blocked.join("; ")));
    }

    let (generation, plan_id) = match (
        engine.store.save_spec(source, spec_json),
        engine.store.next_plan_id(),
    ) {
        (Ok(g), Ok(p)) => (g, p),
        (Err(e), _) | (_, Err(e)) => return fail(e.to_string()),
    };
    run_plan(engine, desired, &observed, &plan, generation, plan_id, tx);
}

/// Goes on with the apply of spec `generation` that a daemon killed
/// half-way left behind: plans that spec again against what is there now
/// (members already updated need nothing) and executes the rest.
pub(crate) fn resume(engine: &Engine, generation: &str) {
    let Some(rec) = generation
        .parse::<i64>()
        .ok()
        .and_then(|g| engine.store.spec(g).ok().flatten())
    else {
        let _ = engine.store.delete_kv(crate::engine::APPLY_KEY);
        return;
    };
    let desired = serde_json::from_str::<berth_spec::Spec>(&rec.spec_json)
        .map_err(|e| e.to_string())
        .and_then(|spec| {
            berth_spec::validate(&spec, std::path::Path::new(&rec.source), &LocalProbe)
                .map_err(|errs| berth_spec::format_errors(&errs))
        });
    let (desired, observed) = match desired.map(|d| (engine.observed(), d)) {
        Ok((Ok(o), d)) => (d, o),
        Ok((Err(e), _)) => {
            tracing::error!("resuming the interrupted apply: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("not resuming the interrupted apply of {}: {e}", rec.source);
            let _ = engine.store.delete_kv(crate::engine::APPLY_KEY);
            return;
        }
    };
    let plan = berth_plan::plan(&desired, &observed);
    tracing::info!(
        "resuming the interrupted apply of {} (generation {}): {}",
        rec.source,
        rec.generation,
        plan.summary()
    );
    let plan_id = match engine.store.next_plan_id() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("resuming the interrupted apply: {e}");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<ApplyEvent>(256);
    let logger = std::thread::spawn(move || {
        while let Some(ev) = rx.blocking_recv() {
            match ev {
                ApplyEvent::Step {
                    guest,
                    step,
                    status,
                    message,
                    ..
                } => tracing::info!(
                    "resume: {} {step} {status:?} {message}",
                    guest.as_deref().unwrap_or("host")
                ),
                ApplyEvent::Done {
                    ok,
                    summary,
                    errors,
                } => tracing::info!("resume done (ok: {ok}): {summary} {}", errors.join("; ")),
                _ => {}
            }
        }
    });
    run_plan(
        engine,
        &desired,
        &observed,
        &plan,
        rec.generation,
        plan_id,
        &tx,
    );
    drop(tx);
    let _ = logger.join();
}

/// Executes `plan` (saved as `generation`). Also the resume path after a
/// daemon restart in the middle of an apply.
pub(crate) fn run_plan(
    engine: &Engine,
    desired: &Desired,
    observed: &berth_plan::Observed,
    plan: &Plan,
    generation: i64,
    plan_id: i64,
    tx: &mpsc::Sender<ApplyEvent>,
) {
    let send = |ev: ApplyEvent| {
        let _ = tx.blocking_send(ev);
    };
    let fail = |msg: String| send(apply_failed(msg));
    // An apply in progress is resumed if the daemon dies before its end.
    let _ = engine
        .store
        .set_kv(crate::engine::APPLY_KEY, &generation.to_string());
    let mut errors = Vec::new();

    // Host: forwarding, NAT and source filters, before any guest starts.
    // The table depends on the host config only, so it is rewritten only
    // when that changed (or was never applied).
    // Members answer from their group's service address: the source
    // filters list it for every index a member (old or new) may have.
    let vip_pairs = crate::engine::vip_pairs(&[&desired.groups, &observed.groups]);
    let ecmp = desired
        .groups
        .values()
        .any(|g| g.mode == berth_spec::VipMode::Ecmp);
    let vip_key = serde_json::to_string(&(&vip_pairs, ecmp)).unwrap_or_default();
    let vips_changed = engine
        .store
        .kv("firewall/vips")
        .ok()
        .flatten()
        .unwrap_or_else(|| "[]".into())
        != vip_key;
    if observed.host.as_ref() != Some(&desired.host) || vips_changed {
        let t = Instant::now();
        send(step(
            None,
            "host",
            StepStatus::Started,
            "forwarding, NAT and source filters".into(),
            t,
        ));
        let res = engine
            .apply_host(&desired.host, &[&desired.groups, &observed.groups])
            .and_then(|()| Ok(engine.store.set_kv("firewall/vips", &vip_key)?))
            .and_then(|()| {
                let j = serde_json::to_string(&desired.host)
                    .map_err(|e| EngineError::Host(e.to_string()))?;
                Ok(engine.store.put_host(&j)?)
            });
        match res {
            Ok(()) => send(step(None, "host", StepStatus::Done, String::new(), t)),
            Err(e) => {
                send(step(None, "host", StepStatus::Failed, e.to_string(), t));
                return fail(format!("host network: {e}"));
            }
        }
    }

    // Groups: the controller routes service addresses by the applied groups.
    if let Err(e) = engine.set_groups(&desired.groups) {
        return fail(e.to_string());
    }
    let rolled = crate::rollout::touched(plan, desired);
    // Drains left by an earlier rollout or scale-down that this plan no
    // longer needs (a daemon restart in the middle of one).
    for d in engine.drained().unwrap_or_default() {
        let why = engine.drain_reason(&d).ok().flatten();
        let ours = matches!(why.as_deref(), Some("rollout" | "scale" | "stop"));
        let still = rolled.contains(&d)
            || plan
                .actions
                .iter()
                .any(|a| a.kind == ActionKind::Destroy && a.guest.as_deref() == Some(d.as_str()));
        if ours && !still {
            let _ = engine.clear_drain(&d);
        }
    }

    let (destroys, rest): (Vec<&Action>, Vec<&Action>) = plan
        .actions
        .iter()
        .filter(|a| {
            a.guest
                .as_deref()
                .is_some_and(|g| !rolled.iter().any(|r| r == g))
        })
        .partition(|a| a.kind == ActionKind::Destroy);
    for a in destroys {
        // A member leaving its group stops carrying the service address
        // before it stops (scale down: highest index first).
        if let Some(name) = a.guest.as_deref()
            && let Some(gname) = observed
                .guests
                .get(name)
                .and_then(|o| o.applied.group.clone())
        {
            let drain_ms = desired
                .groups
                .get(&gname)
                .or_else(|| observed.groups.get(&gname))
                .map_or(0, |g| g.drain_ms);
            let _ = engine.take_out(name, "scale", drain_ms);
        }
        let res = run_action(engine, desired, observed, a, generation, plan_id, &send);
        if let Some(name) = a.guest.as_deref() {
            let _ = engine.clear_drain(name);
        }
        if let Err(e) = res {
            errors.push(e);
        }
    }
    // The old half of every replace goes before any create: two guests that
    // swap indexes must both let go of their links first.
    for a in rest.iter().filter(|a| a.kind == ActionKind::Replace) {
        let Some(name) = a.guest.as_deref() else {
            continue;
        };
        let recreate = berth_plan::deleted_disks(a, desired, observed);
        match engine.destroy_keeping_disks(name, plan_id, &recreate) {
            Ok(_) | Err(EngineError::NoSuchGuest(_)) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = rest
            .iter()
            .map(|a| {
                s.spawn(|| run_action(engine, desired, observed, a, generation, plan_id, &send))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("internal error: a step panicked".into()),
            }
        }
    });
    // Rolling updates: groups side by side, members one batch at a time.
    std::thread::scope(|s| {
        let handles: Vec<_> = plan
            .rollouts
            .iter()
            .map(|r| {
                s.spawn(|| {
                    crate::rollout::run(
                        engine, desired, observed, plan, r, generation, plan_id, &send,
                    )
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push("internal error: a rollout panicked".into()),
            }
        }
    });
    let _ = engine.store.delete_kv(crate::engine::APPLY_KEY);

    let ok = errors.is_empty();
    if ok && let Err(e) = engine.store.mark_applied(generation) {
        errors.push(e.to_string());
    }
    let summary = if ok {
        format!("applied: {}", plan.summary())
    } else {
        format!("{} step(s) failed", errors.len())
    };
    send(ApplyEvent::Done {
        ok: errors.is_empty(),
        summary,
        errors,
    });
}

/// The last event of an apply that stopped before doing anything more.
fn apply_failed(msg: String) -> ApplyEvent {
    ApplyEvent::Done {
        ok: false,
        summary: "apply failed".into(),
        errors: vec![msg],
    }
}

fn step(
    guest: Option<&str>,
    step: &str,
    status: StepStatus,
    message: String,
    t: Instant,
) -> ApplyEvent {
    ApplyEvent::Step {
        guest: guest.map(str::to_owned),
        step: step.into(),
        status,
        message,
        elapsed_ms: t.elapsed().as_millis() as u64,
    }
}

fn run_action(
    engine: &Engine,
    desired: &Desired,
    observed: &berth_plan::Observed,
    a: &Action,
    generation: i64,
    plan_id: i64,
    send: &(dyn Fn(ApplyEvent) + Sync),
) -> Result<(), String> {
    let Some(name) = a.guest.as_deref() else {
        return Ok(());
    };
    let t = Instant::now();
    let kind = a.kind.to_string();
    send(step(
        Some(name),
        &kind,
        StepStatus::Started,
        a.reason.clone(),
        t,
    ));
    let new = desired.guests.get(name);
    let old = observed.guests.get(name).map(|o| &o.applied);
    let res: Result<(), EngineError> = match (a.kind, new, old) {
        (ActionKind::Create, Some(g), _) => engine.create(g, a.start, generation, plan_id),
        (ActionKind::Start, Some(g), _) => engine
            .update_live(g, generation, plan_id)
            .and_then(|()| if a.start { engine.start(name) } else { Ok(()) }),
        (ActionKind::Update, Some(g), _) => engine.update_live(g, generation, plan_id),
        (ActionKind::Restart, Some(g), Some(o)) => {
            engine.restart_with(o, g, a.start, generation, plan_id)
        }
        // The old guest is already gone (see run_apply).
        (ActionKind::Replace, Some(g), _) => engine.create(g, a.start, generation, plan_id),
        (ActionKind::Destroy, _, _) => engine.destroy(name, plan_id).map(|_| ()),
        _ => Ok(()),
    };
    match res {
        Ok(()) => {
            send(step(Some(name), &kind, StepStatus::Done, String::new(), t));
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            send(step(Some(name), &kind, StepStatus::Failed, msg.clone(), t));
            Err(msg)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tail_offset_counts_lines_from_the_end() {
        let d = b"a\nb\nc\n";
        assert_eq!(&d[super::tail_offset(d, 2)..], b"b\nc\n");
        assert_eq!(&d[super::tail_offset(d, 9)..], d);
        assert_eq!(&d[super::tail_offset(d, 1)..], b"c\n");
        assert_eq!(super::tail_offset(d, 0), d.len());
        assert_eq!(&b"x\ny"[super::tail_offset(b"x\ny", 1)..], b"y");
    }

    #[test]
    fn since_offsets() {
        let log = b"100 start\n200 running\n300 exited\n";
        assert_eq!(
            &log[super::since_offset_stamped(log, 150)..],
            b"200 running\n300 exited\n"
        );
        assert_eq!(super::since_offset_stamped(log, 999), log.len());
        assert_eq!(super::since_offset_indexed("100 0\n200 40\n", 150), 40);
        assert_eq!(super::since_offset_indexed("100 0\n", 150), usize::MAX);
    }
}
