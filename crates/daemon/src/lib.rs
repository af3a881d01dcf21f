//! `berth daemon`: serves the API on a unix socket and applies plans.
//!
//! Guests do not run under the daemon: each has its own `berth shim`, so the
//! daemon can be killed, restarted or upgraded while they keep running. At
//! start it re-adopts them by asking their shims (see [`engine::Engine::readopt`]).

pub mod engine;
mod health;
mod http;
mod images;
mod machines;
mod nix_cache;
mod rollout;
mod stream_exec;
mod vip;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use engine::{Engine, EngineError, LocalProbe};
pub use http::EXIT_TRAILER;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error(
        "socket {path} is in use: another berth daemon answers there (stop it, or pass --socket / BERTH_SOCKET)"
    )]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find the berth executable to start supervisors: {0}")]
    Exe(std::io::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub struct Options {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
}

/// Binds the socket (refusing one a live daemon holds), re-adopts guests and
/// serves until SIGINT/SIGTERM. Guests keep running after it returns.
pub async fn serve(opts: Options) -> Result<(), DaemonError> {
    // Refuse a socket a live daemon holds before touching any state.
    if std::os::unix::net::UnixStream::connect(&opts.socket).is_ok() {
        return Err(DaemonError::SocketInUse {
            path: opts.socket.clone(),
        });
    }
    let store = berth_store::Store::open(&opts.state_dir)?;
    let exe = std::env::current_exe().map_err(DaemonError::Exe)?;
    let listener = bind(&opts.socket)?;
    let engine = Arc::new(Engine::new(opts.state_dir.clone(), store, exe));
    tracing::info!(socket = %opts.socket.display(), state_dir = %opts.state_dir.display(), pid = std::process::id(), "berth daemon listening");

    // Re-adopt before serving: requests wait in the socket's backlog, so no
    // apply can race a supervisor being restarted here.
    {
        let engine = Arc::clone(&engine);
        let res = tokio::task::spawn_blocking(move || {
            match engine.readopt() {
                Ok(notes) => notes.iter().for_each(|n| tracing::info!("{n}")),
                Err(e) => tracing::error!("re-adopting guests: {e}"),
            }
            if let Err(e) = engine.refresh_firewall() {
                tracing::warn!("restoring the firewall table: {e}");
            }
        })
        .await;
        if let Err(e) = res {
            tracing::error!("re-adoption task failed: {e}");
        }
    }

    // Health probes and the service-address controller.
    tokio::spawn(health::monitor(Arc::clone(&engine)));
    // The host's Nix store for guests with `nix_cache = true`.
    tokio::spawn(nix_cache::run(Arc::clone(&engine)));
    {
        let engine = Arc::clone(&engine);
        if let Err(e) = std::thread::Builder::new()
            .name("berth-vip".into())
            .spawn(move || vip::controller(engine))
        {
            tracing::error!("cannot start the service-address controller: {e}");
        }
    }
    // On systemd hosts: `machinectl list` keeps showing the guests.
    {
        let engine = Arc::clone(&engine);
        if let Err(e) = std::thread::Builder::new()
            .name("berth-machined".into())
            .spawn(move || machines::keeper(engine))
        {
            tracing::warn!("cannot start the machined registration keeper: {e}");
        }
    }
    // An apply the last daemon did not finish (killed mid-rollout) goes on.
    let apply_lock = Arc::new(tokio::sync::Mutex::new(()));
    if let Ok(Some(generation)) = engine.store.kv(engine::APPLY_KEY) {
        let guard = Arc::clone(&apply_lock).lock_owned().await;
        let engine = Arc::clone(&engine);
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            http::resume(&engine, &generation);
        });
    }

    notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS=serving on {}",
        std::process::id(),
        opts.socket.display()
    ));
    let app = http::router(engine, apply_lock);
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutting down; guests keep running under their supervisors");
        notify("STOPPING=1");
    };
    let res = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&opts.socket);
    res.map_err(DaemonError::Io)
}

fn bind(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::Bind {
            path: path.into(),
            source,
        })?;
    }
    if path.exists() || path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse { path: path.into() });
        }
        // Left behind by a daemon that died: nobody answers, take it over.
        std::fs::remove_file(path).map_err(|source| DaemonError::Bind {
            path: path.into(),
            source,
        })?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Bind {
            path: path.into(),
            source,
        }
    })?;
    Ok(l)
}

/// sd_notify(3): tells systemd (a `Type=notify` unit) that the daemon is
/// ready or stopping. Does nothing without `NOTIFY_SOCKET` (no systemd).
fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let res = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = res {
        tracing::warn!("sd_notify to {}: {e}", path.to_string_lossy());
    }
}
