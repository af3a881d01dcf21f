//! The host's Nix store as a binary cache for guests with `nix_cache = true`.
//!
//! A minimal server of the nix-serve protocol, on the host's address on the
//! guest links (`host.subnet4`'s network address; the same on every link)
//! and [`berth_spec::NIX_CACHE_PORT`]:
//!
//! ```text
//! GET /nix-cache-info        StoreDir: /nix/store, WantMassQuery: 1, Priority: 30
//! GET /<hash>.narinfo        from `nix path-info --json /nix/store/<hash>-*`
//!                            (NarHash, NarSize, References, Deriver, Sig, CA)
//! GET /nar/<hash>.nar        `nix-store --dump /nix/store/<hash>-*`, streamed
//! ```
//!
//! Only guests that declare `nix_cache = true` get answers (by their source
//! address; others get 403). NARs are served uncompressed: the link is
//! local. Signatures are those the host's store already holds (paths
//! substituted from cache.nixos.org carry its signature, so a guest that
//! trusts that key accepts them); paths built on the host have none unless
//! the host signs them (`nix store sign`), and content-addressed paths
//! (`CA:`) need none. The listener binds with IP_FREEBIND, so it can exist
//! before the first guest link carries the address; it is opened while at
//! least one applied guest wants the cache and closed when none does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use berth_spec::NIX_CACHE_PORT;

use crate::engine::Engine;

const STORE_DIR: &str = "/nix/store";

/// Keeps one listener per host address some applied guest wants the cache
/// on (normally one: every guest link has the same host address).
pub async fn run(engine: Arc<Engine>) {
    let mut servers: BTreeMap<Ipv4Addr, tokio::task::JoinHandle<()>> = BTreeMap::new();
    let mut failed: BTreeSet<Ipv4Addr> = BTreeSet::new();
    loop {
        let e = Arc::clone(&engine);
        let wanted = tokio::task::spawn_blocking(move || wanted_hosts(&e))
            .await
            .unwrap_or_default();
        servers.retain(|host, task| {
            let keep = wanted.contains(host) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::info!(%host, "nix cache closed");
            }
            keep
        });
        failed.retain(|h| wanted.contains(h));
        for host in wanted {
            if servers.contains_key(&host) {
                continue;
            }
            match listen(host) {
                Ok(l) => {
                    tracing::info!(%host, port = NIX_CACHE_PORT, "serving the host's Nix store to guests with nix_cache = true");
                    failed.remove(&host);
                    let app = router(Arc::clone(&engine));
                    servers.insert(
                        host,
                        tokio::spawn(async move {
                            let svc = app.into_make_service_with_connect_info::<SocketAddr>();
                            if let Err(e) = axum::serve(l, svc).await {
                                tracing::warn!(%host, "nix cache stopped: {e}");
                            }
                        }),
                    );
                }
                Err(e) => {
                    if failed.insert(host) {
                        tracing::warn!(%host, port = NIX_CACHE_PORT, "cannot serve the nix cache: {e}");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Host addresses of the applied guests that want the cache.
fn wanted_hosts(engine: &Engine) -> BTreeSet<Ipv4Addr> {
    engine
        .applied_guests()
        .unwrap_or_default()
        .iter()
        .filter(|g| g.nix_cache)
        .map(|g| g.host4)
        .collect()
}

/// Guest addresses allowed to use the cache.
fn allowed_peers(engine: &Engine) -> BTreeSet<Ipv4Addr> {
    engine
        .applied_guests()
        .unwrap_or_default()
        .iter()
        .filter(|g| g.nix_cache)
        .map(|g| g.addr4)
        .collect()
}

fn listen(host: Ipv4Addr) -> std::io::Result<tokio::net::TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    // The address may not be on any link yet (no guest started).
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(host, NIX_CACHE_PORT)),
    )?;
    listen(&fd, Backlog::new(128)?)?;
    tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
}

fn router(engine: Arc<Engine>) -> axum::Router {
    axum::Router::new()
        .route("/nix-cache-info", get(cache_info))
        .route("/{file}", get(narinfo))
        .route("/nar/{file}", get(nar))
        .with_state(engine)
}

fn text(status: StatusCode, s: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain")], s.into()).into_response()
}

/// 403 unless `peer` is a guest with `nix_cache = true`.
async fn check_peer(engine: &Arc<Engine>, peer: SocketAddr) -> Result<(), Response> {
    let std::net::IpAddr::V4(ip) = peer.ip() else {
        return Err(text(StatusCode::FORBIDDEN, "IPv4 guests only\n"));
    };
    let e = Arc::clone(engine);
    let allowed = tokio::task::spawn_blocking(move || allowed_peers(&e))
        .await
        .unwrap_or_default();
    if allowed.contains(&ip) {
        Ok(())
    } else {
        Err(text(
            StatusCode::FORBIDDEN,
            format!("{ip} is no guest with nix_cache = true\n"),
        ))
    }
}

async fn cache_info(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if let Err(r) = check_peer(&engine, peer).await {
        return r;
    }
    (
        [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
        format!("StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: 30\n"),
    )
        .into_response()
}

/// A store path's hash part: 32 characters of Nix's base32 alphabet.
fn is_hash_part(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| NIX_BASE32.contains(&b))
}

/// The valid store path whose hash part is `hash`, if the store has one.
fn find_path(hash: &str) -> Option<String> {
    let prefix = format!("{hash}-");
    std::fs::read_dir(STORE_DIR)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&prefix) && !n.ends_with(".lock"))
        .map(|n| format!("{STORE_DIR}/{n}"))
}

async fn narinfo(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(file): Path<String>,
) -> Response {
    match requested(&engine, peer, &file, ".narinfo").await {
        Ok((hash, _, info)) => (
            [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
            render_narinfo(&info, &hash),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// What a request for `<hash><suffix>` from `peer` names: the hash, the
/// valid store path and its info; or the answer that refuses it (peer not
/// allowed, malformed name, no such valid path).
async fn requested(
    engine: &Arc<Engine>,
    peer: SocketAddr,
    file: &str,
    suffix: &str,
) -> Result<(String, String, PathInfo), Response> {
    check_peer(engine, peer).await?;
    let Some(hash) = file.strip_suffix(suffix).filter(|h| is_hash_part(h)) else {
        return Err(text(StatusCode::NOT_FOUND, "not found\n"));
    };
    let Some(path) = find_path(hash) else {
        return Err(text(StatusCode::NOT_FOUND, "no such path\n"));
    };
    // Only valid (registered) paths: not one being built or half deleted.
    match path_info(&path).await {
        Ok(Some(info)) => Ok((hash.to_owned(), path, info)),
        Ok(None) => Err(text(StatusCode::NOT_FOUND, "no such valid path\n")),
        Err(e) => {
            tracing::warn!(path, "nix cache: {e}");
            Err(text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
        }
    }
}

async fn nar(
    State(engine): State<Arc<Engine>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(file): Path<String>,
) -> Response {
    use tokio::io::AsyncReadExt;
    let path = match requested(&engine, peer, &file, ".nar").await {
        Ok((_, path, _)) => path,
        Err(r) => return r,
    };
    let child = tokio::process::Command::new("nix-store")
        .args(["--dump", &path])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("running nix-store --dump: {e}\n"),
            );
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "nix-store has no stdout\n",
        );
    };
    // The child lives in the stream's state: it is killed if the guest
    // hangs up.
    let stream = futures::stream::unfold(
        (child, stdout, false),
        |(child, mut out, done)| async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; 64 << 10];
            match out.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), (child, out, false)))
                }
                Err(e) => Some((Err(e), (child, out, true))),
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "application/x-nix-nar")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// What a narinfo needs to know about a valid store path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    /// `sha256:<nix base32>`
    pub nar_hash: String,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub signatures: Vec<String>,
    pub ca: Option<String>,
}

/// `nix path-info --json PATH`; `None` when the path is not valid.
async fn path_info(path: &str) -> Result<Option<PathInfo>, String> {
    let out = tokio::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            path,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running nix path-info: {e}"))?;
    if !out.status.success() {
        return Ok(None);
    }
    parse_path_info(&String::from_utf8_lossy(&out.stdout), path).map(Some)
}

/// Parses `nix path-info --json` output: an array of objects with `path`
/// (Nix up to 2.18) or an object keyed by path (later versions).
pub fn parse_path_info(json: &str, path: &str) -> Result<PathInfo, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("nix path-info printed no JSON: {e}"))?;
    let obj = match &v {
        serde_json::Value::Array(a) => a.first(),
        serde_json::Value::Object(m) => m.get(path),
        _ => None,
    }
    .and_then(|o| o.as_object())
    .ok_or_else(|| format!("nix path-info has nothing on {path}"))?;
    let strs = |k: &str| -> Vec<String> {
        obj.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let raw_hash = obj
        .get("narHash")
        .and_then(|h| h.as_str())
        .ok_or("nix path-info gives no narHash")?;
    Ok(PathInfo {
        path: path.to_string(),
        nar_hash: sha256_nix32(raw_hash)?,
        nar_size: obj
            .get("narSize")
            .and_then(|n| n.as_u64())
            .ok_or("nix path-info gives no narSize")?,
        references: strs("references"),
        deriver: obj
            .get("deriver")
            .and_then(|d| d.as_str())
            .map(str::to_owned),
        signatures: strs("signatures"),
        ca: obj.get("ca").and_then(|c| c.as_str()).map(str::to_owned),
    })
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// The narinfo text for `info`; its NAR is at `nar/<hash>.nar`.
pub fn render_narinfo(info: &PathInfo, hash: &str) -> String {
    let mut s = format!(
        "StorePath: {}\nURL: nar/{hash}.nar\nCompression: none\nNarHash: {}\nNarSize: {}\n",
        info.path, info.nar_hash, info.nar_size
    );
    let refs: Vec<&str> = info.references.iter().map(|r| base(r)).collect();
    s.push_str(&format!("References: {}\n", refs.join(" ")));
    if let Some(d) = &info.deriver {
        s.push_str(&format!("Deriver: {}\n", base(d)));
    }
    for sig in &info.signatures {
        s.push_str(&format!("Sig: {sig}\n"));
    }
    if let Some(ca) = &info.ca {
        s.push_str(&format!("CA: {ca}\n"));
    }
    s
}

const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Nix's base32 (its own alphabet, least significant bits first).
pub fn nix_base32(hash: &[u8]) -> String {
    let len = (hash.len() * 8 - 1) / 5 + 1;
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = hash[i] >> j;
        let hi = if i + 1 < hash.len() {
            hash[i + 1].checked_shl(8 - j as u32).unwrap_or(0)
        } else {
            0
        };
        s.push(NIX_BASE32[((lo | hi) & 0x1f) as usize] as char);
    }
    s
}

/// `sha256:<nix base32>` from the hash forms Nix prints: SRI
/// (`sha256-<base64>`), `sha256:<base32>` or `sha256:<base16>`.
pub fn sha256_nix32(h: &str) -> Result<String, String> {
    use base64::Engine as _;
    let bad = || format!("unexpected NAR hash {h:?}");
    if let Some(b64) = h.strip_prefix("sha256-") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        if bytes.len() != 32 {
            return Err(bad());
        }
        return Ok(format!("sha256:{}", nix_base32(&bytes)));
    }
    let rest = h.strip_prefix("sha256:").ok_or_else(bad)?;
    match rest.len() {
        52 => Ok(h.to_string()),
        64 => {
            let bytes: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&rest[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()
                .map_err(|_| bad())?;
            Ok(format!("sha256:{}", nix_base32(&bytes)))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    // One path as Debian's Nix 2.8 printed it: `nix path-info --json` (SRI)
    // and `nix-store -q --hash` (base32) of the same NAR.
    const SRI: &str = "sha256-fIJQuxacheEXE+lF47XhfC9S0hPVXVRTPd8RvqHZFLk=";
    const B32: &str = "sha256:1f8lv6hvw4fz7m9m8pfm2g954bvww6sy6ig92cby31cw2sxm10kw";

    #[test]
    fn nar_hashes_come_out_in_nix_base32() {
        assert_eq!(sha256_nix32(SRI).unwrap(), B32);
        assert_eq!(sha256_nix32(B32).unwrap(), B32);
        let hex = "7c8250bb169c85e11713e945e3b5e17c2f52d213d55d54533ddf11bea1d914b9";
        assert_eq!(sha256_nix32(&format!("sha256:{hex}")).unwrap(), B32);
        assert!(sha256_nix32("md5:abc").is_err());
        assert!(sha256_nix32("sha256-AAAA").is_err());
    }

    #[test]
    fn path_info_of_old_and_new_nix_becomes_a_narinfo() {
        let p = "/nix/store/88pdzz50xsjkw6bdcxzwgzdgvfw89agb-berth-top";
        let old = format!(
            r#"[{{"path":"{p}","narHash":"{SRI}","narSize":168,"references":["/nix/store/j8yhkj31jxph4p5w8pp5r97qalw60csp-berth-dep"],"deriver":"/nix/store/q2pilklbqw1rwlqhwfbcspn2ba57n362-berth-top.drv","registrationTime":1,"ultimate":true}}]"#
        );
        let new = format!(
            r#"{{"{p}":{{"narHash":"{B32}","narSize":168,"references":["/nix/store/j8yhkj31jxph4p5w8pp5r97qalw60csp-berth-dep"],"deriver":"/nix/store/q2pilklbqw1rwlqhwfbcspn2ba57n362-berth-top.drv","signatures":["cache.nixos.org-1:abc="],"ca":null}}}}"#
        );
        let a = parse_path_info(&old, p).unwrap();
        let b = parse_path_info(&new, p).unwrap();
        assert_eq!(a.nar_hash, b.nar_hash);
        assert_eq!(b.signatures, ["cache.nixos.org-1:abc="]);
        assert_eq!(
            render_narinfo(&b, "88pdzz50xsjkw6bdcxzwgzdgvfw89agb"),
            format!(
                "StorePath: {p}\nURL: nar/88pdzz50xsjkw6bdcxzwgzdgvfw89agb.nar\nCompression: none\nNarHash: {B32}\nNarSize: 168\nReferences: j8yhkj31jxph4p5w8pp5r97qalw60csp-berth-dep\nDeriver: q2pilklbqw1rwlqhwfbcspn2ba57n362-berth-top.drv\nSig: cache.nixos.org-1:abc=\n"
            )
        );
        assert!(parse_path_info("[]", p).is_err());
    }

    #[test]
    fn only_hash_parts_name_paths() {
        assert!(is_hash_part("88pdzz50xsjkw6bdcxzwgzdgvfw89agb"));
        assert!(!is_hash_part("../../etc/passwd"));
        assert!(!is_hash_part("88pdzz50xsjkw6bdcxzwgzdgvfw89age")); // 'e' is not in the alphabet
    }
}
