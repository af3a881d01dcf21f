//! `berth copy-closure NAME PATH`: a Nix store path and everything it
//! references, into a running guest, without the guest's network.
//!
//! ```text
//! host: nix-store --query --requisites PATH        the closure, dependencies first
//! guest: nix-store --check-validity --print-invalid   which of them it lacks
//! host: nix-store --export MISSING... ──▶ POST /v1/guests/NAME/exec-stream ──▶
//! guest: nix-store --import                         registers them valid
//! guest: nix-store --check-validity --print-invalid   nothing may be missing now
//! ```
//!
//! The export stream goes through berth's exec (containers: nsenter; VMs:
//! guest agent, exec port or serial console), so it needs no network in the
//! guest; paths the guest already has are not sent again. With `--ssh
//! USER@HOST` (the guest has network and sshd) it is `nix copy --to
//! ssh://USER@HOST PATH` instead.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::client::Client;

/// Where a guest's Nix may live beyond its PATH (NixOS, a Nix profile).
const GUEST_PATH: &str =
    "PATH=$PATH:/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/bin:/bin";

/// Exit code the guest scripts use when the guest has no `nix-store`.
const NO_NIX: i32 = 127;

const HOST_NIX_HINT: &str = "copy-closure needs Nix on this host (NixOS has it; Debian/Ubuntu: apt-get install nix-bin; elsewhere see https://nixos.org/download)";

#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
/// Copy a Nix store path and its closure into a running guest.
///
/// No guest network needed: `nix-store --export` on the host is streamed through
/// berth's exec into `nix-store --import` in the guest. Paths the guest
/// already has are skipped, so copying again is cheap. The guest needs Nix
/// (`nix-store`); a NixOS guest has it.
///
///   berth copy-closure web1 /nix/store/...-hello-2.12
///   berth copy-closure web1 ./result                  # a symlink to the store
///   berth copy-closure web1 ./result --ssh root@10.0.0.2   # over the guest's network
pub struct CopyClosure {
    /// The guest to copy into (running).
    name: String,
    /// A Nix store path, or a symlink to one (like ./result of nix-build).
    path: PathBuf,
    /// Copy with `nix copy --to ssh://USER@HOST` over the guest's network
    /// instead (needs sshd and Nix in the guest, and SSH access).
    #[arg(long, value_name = "USER@HOST")]
    ssh: Option<String>,
    /// Give up (and kill the import) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize, Debug)]
struct Outcome {
    guest: String,
    path: String,
    /// Paths in the closure.
    closure: usize,
    /// Paths sent (the guest lacked them).
    copied: Vec<String>,
    /// Paths the guest already had.
    already_valid: usize,
    /// Bytes of the export stream sent.
    bytes: u64,
    /// How the stream reached the guest (nsenter, agent, exec-port, console).
    channel: Option<String>,
}

pub fn run(client: &Client, args: CopyClosure) -> Result<ExitCode> {
    let ctx = || format!("copying {} into guest `{}`", args.path.display(), args.name);
    if let Some(dest) = &args.ssh {
        return copy_over_ssh(dest, &args.path).with_context(ctx);
    }
    let outcome = copy_via_exec(client, &args).with_context(ctx)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else if outcome.copied.is_empty() {
        println!(
            "nothing to copy: all {} path(s) of {} are already valid in guest `{}`",
            outcome.closure, outcome.path, outcome.guest
        );
    } else {
        println!(
            "copied {} path(s) ({}) of {} into guest `{}` via {}; {} already there",
            outcome.copied.len(),
            human(outcome.bytes),
            outcome.path,
            outcome.guest,
            outcome.channel.as_deref().unwrap_or("exec"),
            outcome.already_valid
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `nix copy --to ssh://DEST PATH`, output passed through.
fn copy_over_ssh(dest: &str, path: &Path) -> Result<ExitCode> {
    let argv = ssh_argv(dest, path)?;
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|e| host_nix_error("nix", e))?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); see Nix's message above",
            argv.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The `nix copy` command line for `--ssh DEST`.
fn ssh_argv(dest: &str, path: &Path) -> Result<Vec<String>> {
    if dest.is_empty() || dest.contains(char::is_whitespace) || dest.starts_with('-') {
        bail!("--ssh wants USER@HOST (or HOST), got {dest:?}");
    }
    Ok(vec![
        "nix".into(),
        "--extra-experimental-features".into(),
        "nix-command".into(),
        "copy".into(),
        "--to".into(),
        format!("ssh://{dest}"),
        path.display().to_string(),
    ])
}

fn host_nix_error(program: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("{program} not found: {HOST_NIX_HINT}")
    } else {
        anyhow::anyhow!("running {program}: {e}")
    }
}

/// Runs `nix-store ARGS` on the host and returns its stdout lines.
fn host_query(args: &[&str], paths: &[String]) -> Result<Vec<String>> {
    let out = Command::new("nix-store")
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| host_nix_error("nix-store", e))?;
    if !out.status.success() {
        bail!(
            "nix-store {} failed: {}",
            args.join(" "),
            nix_message(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect())
}

/// Nix's stderr without its warnings (e.g. about the build group).
fn nix_message(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| !l.starts_with("warning:"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

/// The guest script that prints which of the store paths on its stdin it
/// lacks (exit [`NO_NIX`] when it has no nix-store).
fn guest_missing_argv() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "{GUEST_PATH}; command -v nix-store >/dev/null 2>&1 || exit {NO_NIX}; exec nix-store --check-validity --print-invalid $(cat)"
        ),
    ]
}

fn guest_import_argv() -> Vec<String> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "{GUEST_PATH}; command -v nix-store >/dev/null 2>&1 || exit {NO_NIX}; exec nix-store --import"
        ),
    ]
}

fn exec_stream_path(name: &str, argv: &[String], timeout: u64) -> String {
    let argv = serde_json::to_string(argv).unwrap_or_default();
    format!(
        "/v1/guests/{name}/exec-stream?argv={}&timeout_secs={timeout}",
        crate::cli::percent_encode(&argv)
    )
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
    channel: Option<String>,
}

fn guest_run(
    client: &Client,
    name: &str,
    argv: &[String],
    stdin: &mut dyn Read,
    timeout: u64,
    on_sent: &mut dyn FnMut(u64),
) -> Result<Ran> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let r: berth_api::ExecResponse =
        client.post_stream(&exec_stream_path(name, argv, timeout), stdin, on_sent)?;
    let text = |s: &str| -> Result<String> {
        Ok(
            String::from_utf8_lossy(&b64.decode(s).context("the daemon's answer is not base64")?)
                .into_owned(),
        )
    };
    Ok(Ran {
        code: r.exit_code,
        stdout: text(&r.stdout)?,
        stderr: text(&r.stderr)?,
        channel: r.channel,
    })
}

/// The paths of `closure` the guest does not have, in closure order.
fn guest_missing(
    client: &Client,
    name: &str,
    closure: &[String],
    timeout: u64,
) -> Result<Vec<String>> {
    let list = closure.join("\n");
    let r = guest_run(
        client,
        name,
        &guest_missing_argv(),
        &mut list.as_bytes(),
        timeout,
        &mut |_| {},
    )?;
    if r.code == NO_NIX {
        bail!(
            "guest `{name}` has no nix-store (looked in its PATH, /run/current-system/sw/bin and /nix/var/nix/profiles/default/bin): copy-closure needs Nix in the guest; a NixOS guest has it"
        );
    }
    if r.code != 0 {
        bail!(
            "checking which paths guest `{name}` has failed (nix-store exited with {}): {}",
            r.code,
            nix_message(r.stderr.as_bytes())
        );
    }
    Ok(missing_in_order(closure, &r.stdout))
}

/// `closure` filtered to the paths listed in `invalid` (one per line),
/// keeping the closure's order (dependencies before what uses them, as
/// `nix-store --import` needs).
fn missing_in_order(closure: &[String], invalid: &str) -> Vec<String> {
    let set: std::collections::HashSet<&str> = invalid.lines().map(str::trim).collect();
    closure
        .iter()
        .filter(|p| set.contains(p.as_str()))
        .cloned()
        .collect()
}

fn copy_via_exec(client: &Client, args: &CopyClosure) -> Result<Outcome> {
    let name = &args.name;
    let path = args.path.display().to_string();
    let closure = host_query(&["--query", "--requisites"], std::slice::from_ref(&path))
        .with_context(|| format!("{path} must be a valid path in this host's Nix store"))?;
    let top = std::fs::canonicalize(&args.path)
        .map(|p| p.display().to_string())
        .unwrap_or(path.clone());
    let missing = guest_missing(client, name, &closure, args.timeout)?;
    let mut outcome = Outcome {
        guest: name.clone(),
        path: top,
        closure: closure.len(),
        already_valid: closure.len() - missing.len(),
        copied: Vec::new(),
        bytes: 0,
        channel: None,
    };
    if missing.is_empty() {
        return Ok(outcome);
    }
    let nar_total: u64 = host_query(&["--query", "--size"], &missing)?
        .iter()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum();
    let mut export = Command::new("nix-store")
        .arg("--export")
        .args(&missing)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| host_nix_error("nix-store", e))?;
    let mut stream = export
        .stdout
        .take()
        .context("nix-store --export has no stdout")?;
    let tty = std::io::stderr().is_terminal() && !args.json;
    let started = Instant::now();
    if !args.json {
        eprintln!(
            "copying {} path(s), about {} of NAR, into guest `{name}` ({} already there)",
            missing.len(),
            human(nar_total),
            outcome.already_valid
        );
    }
    let mut last = Instant::now();
    let mut progress = |sent: u64| {
        outcome.bytes = sent;
        if tty && last.elapsed().as_millis() >= 200 {
            last = Instant::now();
            let pct = (sent * 100).checked_div(nar_total).unwrap_or(0).min(100);
            eprint!(
                "\r  sent {} / {} ({pct}%)   ",
                human(sent),
                human(nar_total)
            );
            let _ = std::io::stderr().flush();
        }
    };
    let res = guest_run(
        client,
        name,
        &guest_import_argv(),
        &mut stream,
        args.timeout,
        &mut progress,
    );
    if tty {
        eprintln!();
    }
    drop(stream);
    let mut export_err = String::new();
    if let Some(mut e) = export.stderr.take() {
        let _ = e.read_to_string(&mut export_err);
    }
    let export_status = export.wait().context("waiting for nix-store --export")?;
    if !export_status.success() {
        bail!(
            "nix-store --export on the host failed ({export_status}): {}",
            nix_message(export_err.as_bytes())
        );
    }
    let r = res?;
    if r.code == NO_NIX {
        bail!("guest `{name}` has no nix-store: copy-closure needs Nix in the guest");
    }
    if r.code != 0 {
        bail!(
            "nix-store --import in guest `{name}` failed (exit {}): {}",
            r.code,
            nix_message(r.stderr.as_bytes())
        );
    }
    outcome.channel = r.channel;
    // The guest must now have every path of the closure, registered valid.
    let still = guest_missing(client, name, &closure, args.timeout)?;
    if !still.is_empty() {
        bail!(
            "after the import guest `{name}` still lacks {} path(s), e.g. {}",
            still.len(),
            still[0]
        );
    }
    if !args.json {
        eprintln!("  imported in {:.1}s", started.elapsed().as_secs_f64());
    }
    outcome.copied = missing;
    Ok(outcome)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn missing_paths_keep_the_closure_order() {
        let closure: Vec<String> = ["/nix/store/a-dep", "/nix/store/b-lib", "/nix/store/c-top"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            missing_in_order(&closure, "/nix/store/c-top\n/nix/store/a-dep\n"),
            ["/nix/store/a-dep", "/nix/store/c-top"]
        );
        assert!(missing_in_order(&closure, "").is_empty());
    }

    #[test]
    fn ssh_copy_uses_nix_copy_and_rejects_odd_destinations() {
        assert_eq!(
            ssh_argv("root@10.0.0.2", Path::new("/nix/store/x-hello")).unwrap(),
            [
                "nix",
                "--extra-experimental-features",
                "nix-command",
                "copy",
                "--to",
                "ssh://root@10.0.0.2",
                "/nix/store/x-hello"
            ]
        );
        assert!(ssh_argv("-oProxyCommand=x", Path::new("/nix/store/x")).is_err());
        assert!(ssh_argv("", Path::new("/nix/store/x")).is_err());
    }

    #[test]
    fn guest_scripts_find_nix_on_nixos_and_say_when_it_is_missing() {
        let a = guest_missing_argv();
        assert!(a[2].contains("/run/current-system/sw/bin"));
        assert!(a[2].contains("exit 127"));
        assert!(a[2].ends_with("--print-invalid $(cat)"));
        assert!(guest_import_argv()[2].ends_with("exec nix-store --import"));
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(640), "640 B");
        assert_eq!(human(3 << 20), "3.0 MiB");
    }
}
