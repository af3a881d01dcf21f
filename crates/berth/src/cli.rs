use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use berth_api::{ApplyEvent, DestroyResponse, GuestInfo, PlanResponse, StepStatus, VersionInfo};
use clap::{Parser, Subcommand};

use crate::client::Client;

/// Declarative virtual machines and containers for Linux hosts.
///
/// Write a spec (TOML or JSON), check it with `berth validate`, see what would
/// change with `berth plan`, and make it so with `berth apply`. Guests run
/// under their own supervisors and keep running while the daemon restarts.
///
/// Typical session:
///   sudo berth daemon &                 # once; or the systemd unit
///   berth validate examples/demo.toml
///   berth plan examples/demo.toml       # which guest will be interrupted, and why
///   berth apply examples/demo.toml
///   berth ps
///   berth destroy --all
#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    verbatim_doc_comment,
    propagate_version = true
)]
struct Cli {
    /// Daemon socket.
    #[arg(long, global = true, env = "BERTH_SOCKET", default_value = berth_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// State directory (store, guest files, image cache). Used by `daemon`,
    /// `shim` and `image`.
    #[arg(long, global = true, env = "BERTH_STATE_DIR", default_value = berth_api::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check a spec file and report every error at once (no daemon needed).
    Validate {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what `apply` would change and which guests it would interrupt.
    Plan {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Make the host match the spec; shows progress per guest.
    ///
    /// Asks for confirmation on a terminal; pass --yes to skip it (required
    /// when stdin is not a terminal).
    Apply {
        file: PathBuf,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Print progress events as JSON lines.
        #[arg(long)]
        json: bool,
        /// Go on even if that deletes disks berth made from images (a VM
        /// removed from the spec, or a disk whose image changed). Without
        /// it such an apply is refused before anything is touched.
        #[arg(long)]
        allow_disruption: bool,
    },
    /// Images: the verified, content-addressed cache under the state dir
    /// (`[image.NAME]` in a spec; no daemon needed).
    #[command(subcommand)]
    Image(crate::image_cmd::ImageCmd),
    /// List guests with their state, leader PID, health and addresses.
    ///
    /// HEALTH is what the spec's `health` probe says (healthy, unhealthy,
    /// unknown = not probed enough yet, down = not running); a `*` marks the
    /// group members a service address is routed to right now.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Withdraw every group's service address from this host before host
    /// maintenance (`--undo` routes them again). Guests keep running.
    ///
    ///   berth drain          stop routing VIPs to this host's members
    ///   berth drain --undo   route them again (to healthy members)
    #[command(verbatim_doc_comment)]
    Drain {
        #[arg(long)]
        undo: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show a guest's console output (stdout/stderr of a container, serial
    /// console of a VM), or with --supervisor its supervisor's events.
    Logs {
        name: String,
        /// Keep printing what the guest writes (Ctrl-C to stop).
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines of what is there now.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// The supervisor's lifecycle events (start, exit, restart, stop)
        /// instead of the console.
        #[arg(long)]
        supervisor: bool,
        /// Only what was written in the last DURATION (e.g. 30s, 10m, 2h).
        #[arg(long)]
        since: Option<String>,
    },
    /// Run a command in a running guest and pass on its stdout, stderr
    /// and exit code exactly (stdin is forwarded when it is not a terminal).
    ///
    ///   berth exec db1 -- cat /etc/os-release
    Exec {
        name: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Run as this user (containers): a name from the guest's
        /// /etc/passwd, or uid[:gid]. Default root.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Print the API's answer instead (exit_code, base64 stdout and
        /// stderr, and the channel used: nsenter, agent, exec-port or
        /// console); the exit status is still the command's.
        #[arg(long)]
        json: bool,
    },
    CopyClosure(crate::copy_closure::CopyClosure),
    /// Attach the terminal to a guest's console (container: its command's
    /// terminal; VM: its serial port). Detach with Ctrl-] (as in telnet and
    /// virsh). Several clients may watch; one at a time may type.
    Console {
        name: String,
        /// Only watch; do not type.
        #[arg(long)]
        read_only: bool,
    },
    /// Back up a guest's configuration: runs its `backup.command` in the
    /// guest and stores the output encrypted (age) to `backup.recipients`.
    ///
    ///   berth backup router1          take a backup now
    ///   berth backup list router1     list stored backups
    #[command(verbatim_doc_comment)]
    Backup {
        /// `list NAME`, or `NAME`.
        #[arg(num_args = 1..=2, value_names = ["list|NAME", "NAME"])]
        args: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Decrypt a backup with your age identity and feed it to the guest's
    /// `backup.restore_command` (the plain text stays in memory).
    Restore {
        name: String,
        /// A file from `berth backup list`.
        file: PathBuf,
        /// age identity file (`AGE-SECRET-KEY-1...` lines, as made by age-keygen).
        #[arg(long, short = 'i', env = "BERTH_AGE_IDENTITY")]
        identity: PathBuf,
    },
    /// Start a stopped guest.
    Start {
        name: String,
    },
    /// Stop a guest (it stays stopped until `start` or the next `apply`).
    Stop {
        name: String,
    },
    /// Stop and start a guest.
    Restart {
        name: String,
    },
    /// Remove a guest, or with --all every guest and every host resource berth
    /// made (links, routes, nft table, cgroups, processes).
    Destroy {
        /// Guest to destroy.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
    /// Run the daemon in the foreground (API on --socket, state in --state-dir).
    Daemon,
    /// Print the JSON Schema of the spec file.
    Schema,
    /// Print the OpenAPI document of the daemon's API.
    Openapi,
    /// Print versions of this binary and of the running daemon.
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Per-guest supervisor; started by the daemon, not by hand.
    #[command(hide = true)]
    Shim {
        #[arg(long)]
        guest: String,
    },
}

pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    let client = Client::new(&cli.socket);
    match cli.cmd {
        Cmd::Validate { file, json } => validate(&file, json),
        Cmd::Plan { file, json } => plan(&client, &file, json),
        Cmd::Apply {
            file,
            yes,
            json,
            allow_disruption,
        } => apply(&client, &file, yes, json, allow_disruption),
        Cmd::Image(cmd) => crate::image_cmd::run(&cli.state_dir, cmd),
        Cmd::Ps { json } => ps(&client, json),
        Cmd::Drain { undo, json } => {
            let body = serde_json::json!({ "drain": !undo });
            let r: berth_api::DrainResponse = client.call("POST", "/v1/drain", Some(&body))?;
            if json {
                return print_json(&r);
            }
            println!(
                "{}",
                if r.drained {
                    "host drained: no service address is routed to its guests (undo with `berth drain --undo`)"
                } else {
                    "host not drained: service addresses go to healthy members"
                }
            );
            for line in &r.routes {
                println!("  {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs {
            name,
            follow,
            tail,
            supervisor,
            since,
        } => logs(&client, &name, follow, tail, supervisor, since.as_deref()),
        Cmd::Exec {
            name,
            argv,
            timeout,
            user,
            json,
        } => exec(&client, &name, argv, timeout, user, json),
        Cmd::CopyClosure(args) => crate::copy_closure::run(&client, args),
        Cmd::Console { name, read_only } => console(&cli.socket, &name, read_only),
        Cmd::Backup { args, json } => backup(&client, &args, json),
        Cmd::Restore {
            name,
            file,
            identity,
        } => restore(&client, &name, &file, &identity),
        Cmd::Start { name } => guest_action(&client, &name, "start"),
        Cmd::Stop { name } => guest_action(&client, &name, "stop"),
        Cmd::Restart { name } => guest_action(&client, &name, "restart"),
        Cmd::Destroy {
            name,
            all,
            yes,
            json,
        } => destroy(&client, name.as_deref(), all, yes, json),
        Cmd::Daemon => daemon(&cli.state_dir, &cli.socket),
        Cmd::Schema => print_json(&berth_spec::json_schema()),
        Cmd::Openapi => print_json(&berth_api::openapi()),
        Cmd::Version { json } => version(&client, json),
        Cmd::Shim { guest } => {
            berth_shim::run(&cli.state_dir, &guest)
                .with_context(|| format!("supervising guest `{guest}`"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(ExitCode::SUCCESS)
}

/// Why a spec file cannot be used: the file could not be read or
/// evaluated at all (one error), or its content has these errors.
enum Rejected {
    Unreadable(String),
    Invalid(Vec<String>),
}

impl Rejected {
    fn errors(&self) -> Vec<String> {
        match self {
            Rejected::Unreadable(e) => vec![e.clone()],
            Rejected::Invalid(errs) => errs.clone(),
        }
    }
}

/// Loads and validates.
fn load(
    file: &Path,
) -> Result<std::result::Result<(berth_spec::Spec, berth_spec::Desired), Rejected>> {
    let spec = match berth_spec::load(file) {
        Ok(s) => s,
        Err(e) => return Ok(Err(Rejected::Unreadable(e.to_string()))),
    };
    match berth_spec::validate(&spec, file, &berth_daemon::LocalProbe) {
        Ok(d) => Ok(Ok((spec, d))),
        Err(errs) => Ok(Err(Rejected::Invalid(
            errs.iter().map(|e| e.to_string()).collect(),
        ))),
    }
}

/// Prints why `file` was rejected: every error, under one heading.
fn report_invalid(file: &Path, rejected: &Rejected) -> Result<ExitCode> {
    let errors = rejected.errors();
    match rejected {
        // Missing Nix, a syntax error, an unreadable file: the spec's
        // content was never looked at, so do not call it invalid.
        Rejected::Unreadable(_) => eprintln!("error: cannot load {}:", file.display()),
        Rejected::Invalid(_) => eprintln!(
            "error: {} is not a valid spec ({} error{}):",
            file.display(),
            errors.len(),
            if errors.len() == 1 { "" } else { "s" }
        ),
    }
    for e in &errors {
        eprintln!("  {e}");
    }
    Ok(ExitCode::FAILURE)
}

fn validate(file: &Path, json: bool) -> Result<ExitCode> {
    let res = load(file)?;
    if json {
        let (ok, errors, guests) = match &res {
            Ok((_, d)) => (true, vec![], d.guests.len()),
            Err(e) => (false, e.errors(), 0),
        };
        println!(
            "{}",
            serde_json::json!({ "file": file, "ok": ok, "guests": guests, "errors": errors })
        );
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    match res {
        Ok((_, d)) => {
            for w in berth_spec::nic::warnings(&d) {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} guest{})",
                file.display(),
                d.guests.len(),
                if d.guests.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => report_invalid(file, &errors),
    }
}

fn request_body(file: &Path, spec: &berth_spec::Spec) -> serde_json::Value {
    serde_json::json!({ "spec": spec, "file": file.display().to_string() })
}

fn fetch_plan(
    client: &Client,
    file: &Path,
) -> Result<std::result::Result<(serde_json::Value, PlanResponse), ExitCode>> {
    let (spec, _) = match load(file)? {
        Ok(x) => x,
        Err(errors) => return report_invalid(file, &errors).map(Err),
    };
    let body = request_body(file, &spec);
    let plan: PlanResponse = client
        .call("POST", "/v1/plan", Some(&body))
        .context("planning")?;
    Ok(Ok((body, plan)))
}

fn plan(client: &Client, file: &Path, json: bool) -> Result<ExitCode> {
    let (_, p) = match fetch_plan(client, file)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    if json {
        return print_json(&p);
    }
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    print!("{}", p.text);
    if !p.text.ends_with('\n') {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

fn confirm(question: &str, yes: bool) -> Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("refusing to go on without confirmation: stdin is not a terminal; pass --yes");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn apply(
    client: &Client,
    file: &Path,
    yes: bool,
    json: bool,
    allow_disruption: bool,
) -> Result<ExitCode> {
    if yes {
        // Nothing to confirm: one request, which streams the plan first.
        let (spec, desired) = match load(file)? {
            Ok(x) => x,
            Err(errors) => return report_invalid(file, &errors),
        };
        if !json {
            for w in berth_spec::nic::warnings(&desired) {
                eprintln!("warning: {w}");
            }
        }
        let mut body = request_body(file, &spec);
        body["allow_disruption"] = allow_disruption.into();
        return run_apply(client, &body, json, true);
    }
    let (mut body, p) = match fetch_plan(client, file)? {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    if !json {
        for w in &p.warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", p.text);
        if !p.text.ends_with('\n') {
            println!();
        }
    }
    if p.plan.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    let interrupted: Vec<String> = p
        .plan
        .interrupted()
        .iter()
        .filter_map(|a| a.guest.clone())
        .collect();
    let q = if interrupted.is_empty() {
        "Apply these changes?".to_string()
    } else {
        format!(
            "Apply these changes? This interrupts: {}.",
            interrupted.join(", ")
        )
    };
    if !confirm(&q, yes)? {
        eprintln!("nothing applied");
        return Ok(ExitCode::FAILURE);
    }
    body["allow_disruption"] = allow_disruption.into();
    run_apply(client, &body, json, false)
}

/// Streams `POST /v1/apply`, printing progress; `print_plan` prints the plan
/// the daemon sends first (when it was not shown already).
fn run_apply(
    client: &Client,
    body: &serde_json::Value,
    json: bool,
    print_plan: bool,
) -> Result<ExitCode> {
    let mut ok = false;
    let mut done_seen = false;
    client
        .stream_lines("/v1/apply", body, &mut |line| {
            if json {
                println!("{line}");
            }
            let Ok(ev) = serde_json::from_str::<ApplyEvent>(line) else {
                return;
            };
            match ev {
                ApplyEvent::Plan { text, .. } => {
                    if print_plan && !json {
                        println!("{}", text.trim_end());
                    }
                }
                ApplyEvent::Step {
                    guest,
                    step,
                    status,
                    message,
                    elapsed_ms,
                } if !json => {
                    let who = guest.unwrap_or_else(|| "host".into());
                    let secs = elapsed_ms as f64 / 1000.0;
                    match status {
                        // Image pulls say what they fetch and how far they are.
                        StepStatus::Started
                            if step.starts_with("image ") && !message.is_empty() =>
                        {
                            println!("{who:>12}: {step}: {message}")
                        }
                        StepStatus::Started => println!("{who:>12}: {step}…"),
                        StepStatus::Done if step.starts_with("image ") && !message.is_empty() => {
                            println!("{who:>12}: {step} done ({secs:.2}s): {message}")
                        }
                        StepStatus::Done => println!("{who:>12}: {step} done ({secs:.2}s)"),
                        StepStatus::Failed => {
                            println!("{who:>12}: {step} FAILED ({secs:.2}s): {message}")
                        }
                        StepStatus::RolledBack => {
                            println!("{who:>12}: {step} rolled back: {message}")
                        }
                    }
                }
                ApplyEvent::Step { .. } => {}
                ApplyEvent::Done {
                    ok: o,
                    summary,
                    errors,
                } => {
                    ok = o;
                    done_seen = true;
                    if !json {
                        if o {
                            println!("{summary}");
                        } else {
                            eprintln!("error: {summary}");
                            for e in errors {
                                eprintln!("  {e}");
                            }
                        }
                    }
                }
            }
        })
        .context("applying")?;
    if !done_seen {
        bail!(
            "the daemon ended the apply stream early (did it die?); run `berth apply` again to converge"
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn ps(client: &Client, json: bool) -> Result<ExitCode> {
    let guests: Vec<GuestInfo> = client.call("GET", "/v1/guests", None)?;
    if json {
        return print_json(&guests);
    }
    if guests.is_empty() {
        println!("no guests (write a spec and run `berth apply FILE`)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<10} {:>5} {:<11} {:>8} {:>8} {:<10}  ADDRESSES",
        "NAME", "KIND", "INDEX", "STATE", "PID", "RESTARTS", "HEALTH"
    );
    for g in guests {
        let mut health = g.health.clone().unwrap_or_else(|| "-".into());
        if !g.serving.is_empty() {
            health.push('*');
        } else if g.drained.is_some() {
            health.push_str("(d)");
        }
        let mut addrs = g.addresses.join(" ");
        if !g.serving.is_empty() {
            addrs.push_str(&format!("  vip {}", g.serving.join(" ")));
        }
        println!(
            "{:<16} {:<10} {:>5} {:<11} {:>8} {:>8} {:<10}  {}",
            g.name,
            match &g.accel {
                Some(a) => format!("{}/{a}", g.kind),
                None => g.kind.clone(),
            },
            g.index,
            g.state,
            g.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            g.restarts,
            health,
            addrs
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(
    client: &Client,
    name: &str,
    follow: bool,
    tail: Option<usize>,
    supervisor: bool,
    since: Option<&str>,
) -> Result<ExitCode> {
    let mut path = format!(
        "/v1/guests/{name}/logs?follow={follow}&source={}",
        if supervisor { "supervisor" } else { "console" }
    );
    if let Some(n) = tail {
        path.push_str(&format!("&tail={n}"));
    }
    if let Some(d) = since {
        let ms =
            berth_spec::parse_duration_ms(d).map_err(|e| anyhow::anyhow!("--since {d}: {e}"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        path.push_str(&format!("&since={}", now.saturating_sub(ms / 1000)));
    }
    let mut out = std::io::stdout().lock();
    client
        .get_stream(&path, &mut |d| {
            if let Err(e) = out.write_all(d).and_then(|()| out.flush()) {
                // The reader went away (`berth logs -f x | head`): done.
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprintln!("error: writing logs: {e}");
                }
                std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe {
                    0
                } else {
                    1
                });
            }
        })
        .with_context(|| format!("logs of guest `{name}`"))?;
    Ok(ExitCode::SUCCESS)
}

fn exec(
    client: &Client,
    name: &str,
    argv: Vec<String>,
    timeout: u64,
    user: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    use base64::Engine as _;
    use std::io::Read;
    let b64 = base64::engine::general_purpose::STANDARD;
    if !json && std::io::stdin().is_terminal() && std::io::stdout().is_terminal() {
        return exec_interactive(client, name, &argv, user.as_deref());
    }
    let mut stdin = Vec::new();
    if !std::io::stdin().is_terminal() {
        std::io::stdin()
            .read_to_end(&mut stdin)
            .context("reading stdin")?;
    }
    let body = serde_json::json!({ "argv": argv, "stdin": b64.encode(&stdin), "timeout_secs": timeout, "user": user });
    let r: berth_api::ExecResponse = client
        .call("POST", &format!("/v1/guests/{name}/exec"), Some(&body))
        .with_context(|| format!("exec in guest `{name}`"))?;
    let code = ExitCode::from(u8::try_from(r.exit_code).unwrap_or(255));
    if json {
        print_json(&r)?;
        return Ok(code);
    }
    let out = b64.decode(&r.stdout).context("decoding stdout")?;
    let err = b64.decode(&r.stderr).context("decoding stderr")?;
    std::io::stdout().write_all(&out)?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(&err)?;
    Ok(code)
}

fn backup(client: &Client, args: &[String], json: bool) -> Result<ExitCode> {
    match args {
        [list, name] if list == "list" => {
            let list: Vec<berth_api::BackupInfo> =
                client.call("GET", &format!("/v1/guests/{name}/backups"), None)?;
            if json {
                return print_json(&list);
            }
            if list.is_empty() {
                println!("no backups of {name} (take one with `berth backup {name}`)");
            }
            for b in list {
                println!(
                    "{}  {:>8} bytes  {}",
                    berth_daemon::engine::utc_stamp(b.created),
                    b.bytes,
                    b.file
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        [name] => {
            let b: berth_api::BackupInfo = client
                .call("POST", &format!("/v1/guests/{name}/backup"), None)
                .with_context(|| format!("backing up guest `{name}`"))?;
            if json {
                return print_json(&b);
            }
            println!("{} ({} bytes, encrypted)", b.file, b.bytes);
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("usage: berth backup NAME | berth backup list NAME"),
    }
}

fn restore(client: &Client, name: &str, file: &Path, identity: &Path) -> Result<ExitCode> {
    use base64::Engine as _;
    let ids = age::IdentityFile::from_file(identity.display().to_string())
        .with_context(|| format!("reading age identity {}", identity.display()))?
        .into_identities()
        .with_context(|| format!("parsing age identity {}", identity.display()))?;
    let sealed = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut plain = Vec::new();
    {
        use std::io::Read;
        let what = || format!("decrypting {} (is it for this identity?)", file.display());
        let decryptor = age::Decryptor::new(&sealed[..]).with_context(what)?;
        let mut reader = decryptor
            .decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .with_context(what)?;
        reader.read_to_end(&mut plain).with_context(what)?;
    }
    let body =
        serde_json::json!({ "data": base64::engine::general_purpose::STANDARD.encode(&plain) });
    let r: berth_api::ExecResponse = client
        .call("POST", &format!("/v1/guests/{name}/restore"), Some(&body))
        .with_context(|| format!("restoring guest `{name}`"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    std::io::stdout().write_all(&b64.decode(&r.stdout).unwrap_or_default())?;
    std::io::stderr().write_all(&b64.decode(&r.stderr).unwrap_or_default())?;
    if r.exit_code != 0 {
        bail!(
            "the restore command of `{name}` exited with {}",
            r.exit_code
        );
    }
    eprintln!("restored {} into {name}", file.display());
    Ok(ExitCode::SUCCESS)
}

/// `%XX` for everything but unreserved characters (RFC 3986).
pub(crate) fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `berth exec` on a terminal: the command runs on a pty in the guest, the
/// local terminal is raw, and the exit code comes at the end of the stream.
fn exec_interactive(
    client: &Client,
    name: &str,
    argv: &[String],
    user: Option<&str>,
) -> Result<ExitCode> {
    use std::io::Read;
    let (rows, cols) = terminal_size();
    let mut path = format!(
        "/v1/guests/{name}/exec-tty?argv={}&rows={rows}&cols={cols}",
        percent_encode(&serde_json::to_string(argv)?)
    );
    if let Some(u) = user {
        path.push_str(&format!("&user={}", percent_encode(u)));
    }
    let mut conn = client
        .upgrade(&path, "berth-exec")
        .with_context(|| format!("exec in guest `{name}`"))?;
    if let Ok(t) = raw_mode()
        && let Ok(mut saved) = SAVED_TERMINAL.lock()
    {
        *saved = Some(t);
    }
    let mut to_guest = conn.try_clone().context("exec connection")?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || to_guest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let trailer = berth_daemon::EXIT_TRAILER.as_bytes();
    let mut out = std::io::stdout();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let mut code = 255;
    loop {
        let n = conn.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        if let Some(i) = pending.windows(trailer.len()).position(|w| w == trailer) {
            let _ = out.write_all(&pending[..i]);
            let rest = String::from_utf8_lossy(&pending[i + trailer.len()..]).into_owned();
            code = rest.trim().parse().unwrap_or(255);
            break;
        }
        // Keep a possible partial trailer back, print the rest.
        let keep = pending.len().saturating_sub(trailer.len());
        let _ = out.write_all(&pending[..keep]);
        let _ = out.flush();
        pending.drain(..keep);
    }
    let _ = out.flush();
    restore_terminal();
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

/// Rows and columns of the terminal on stdout (24x80 if unknown).
fn terminal_size() -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the valid, owned `ws`.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

/// The byte that detaches from a console: Ctrl-].
const DETACH: u8 = 0x1d;

/// The terminal settings to restore when a console session ends, however it ends.
static SAVED_TERMINAL: std::sync::Mutex<Option<nix::sys::termios::Termios>> =
    std::sync::Mutex::new(None);

fn restore_terminal() {
    if let Ok(saved) = SAVED_TERMINAL.lock()
        && let Some(t) = saved.as_ref()
    {
        restore_mode(t);
    }
}

fn console(socket: &Path, name: &str, read_only: bool) -> Result<ExitCode> {
    use std::io::Read;
    let mut conn = crate::client::Client::new(socket)
        .upgrade(
            &format!(
                "/v1/guests/{name}/console?mode={}",
                if read_only { "read" } else { "write" }
            ),
            "berth-console",
        )
        .with_context(|| format!("console of guest `{name}`"))?;
    let tty = std::io::stdin().is_terminal();
    if tty
        && let Ok(t) = raw_mode()
        && let Ok(mut saved) = SAVED_TERMINAL.lock()
    {
        *saved = Some(t);
    }
    if tty {
        eprint!(
            "attached to {name}{}; detach with Ctrl-]\r\n",
            if read_only { " (read-only)" } else { "" }
        );
    }
    let mut from_guest = conn.try_clone().context("console connection")?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        // The guest side went away (guest stopped, daemon gone).
        restore_terminal();
        std::process::exit(0);
    });
    let mut buf = [0u8; 1024];
    let mut stdin = std::io::stdin();
    loop {
        let n = stdin.read(&mut buf).unwrap_or(0);
        if n == 0 {
            // Not a terminal and no more input: keep watching until the
            // guest side closes (or Ctrl-C).
            if !tty {
                loop {
                    std::thread::park();
                }
            }
            break;
        }
        let data = &buf[..n];
        let (send, detach) = match data.iter().position(|&b| b == DETACH) {
            Some(i) => (&data[..i], true),
            None => (data, false),
        };
        if !read_only && !send.is_empty() && conn.write_all(send).is_err() {
            break;
        }
        if detach {
            break;
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Both);
    if tty {
        restore_terminal();
        eprintln!("\r\ndetached from {name}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Puts the terminal on stdin in raw mode; returns what to restore.
fn raw_mode() -> nix::Result<nix::sys::termios::Termios> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin)?;
    let mut raw = saved.clone();
    cfmakeraw(&mut raw);
    tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
    Ok(saved)
}

fn restore_mode(t: &nix::sys::termios::Termios) {
    let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, t);
}

fn guest_action(client: &Client, name: &str, verb: &str) -> Result<ExitCode> {
    let g: GuestInfo = client
        .call(
            "POST",
            &format!("/v1/guests/{name}/{verb}"),
            // No body: the server would not read one, and closing a socket
            // with unread data can reset the connection before we read.
            None,
        )
        .with_context(|| format!("{verb} guest `{name}`"))?;
    println!("{}: {}", g.name, g.state);
    Ok(ExitCode::SUCCESS)
}

fn destroy(
    client: &Client,
    name: Option<&str>,
    all: bool,
    yes: bool,
    json: bool,
) -> Result<ExitCode> {
    let (q, path) = match (name, all) {
        (_, true) => (
            "Destroy every guest and every host resource berth made?".to_string(),
            "/v1/guests".to_string(),
        ),
        (Some(n), false) => (
            format!("Destroy guest `{n}` and its state?"),
            format!("/v1/guests/{n}"),
        ),
        (None, false) => bail!("name a guest or pass --all"),
    };
    if !confirm(&q, yes)? {
        eprintln!("nothing destroyed");
        return Ok(ExitCode::FAILURE);
    }
    let r: DestroyResponse = client.call("DELETE", &path, None).context("destroying")?;
    if json {
        return print_json(&r);
    }
    if r.destroyed.is_empty() && r.removed.is_empty() {
        println!("nothing to destroy");
    }
    for g in &r.destroyed {
        println!("destroyed {g}");
    }
    for x in &r.removed {
        println!("  removed {x}");
    }
    Ok(ExitCode::SUCCESS)
}

fn version(client: &Client, json: bool) -> Result<ExitCode> {
    let daemon: Option<VersionInfo> = client.call("GET", "/v1/version", None).ok();
    if json {
        return print_json(
            &serde_json::json!({ "client": env!("CARGO_PKG_VERSION"), "daemon": daemon }),
        );
    }
    println!("berth {}", env!("CARGO_PKG_VERSION"));
    match daemon {
        Some(d) => println!("daemon {} (api {}, pid {})", d.version, d.api, d.pid),
        None => println!("daemon: not reachable"),
    }
    Ok(ExitCode::SUCCESS)
}

fn daemon(state_dir: &Path, socket: &Path) -> Result<ExitCode> {
    use tracing_subscriber::EnvFilter;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(berth_daemon::serve(berth_daemon::Options {
        state_dir: state_dir.to_path_buf(),
        socket: socket.to_path_buf(),
    }))
    .context("berth daemon")?;
    Ok(ExitCode::SUCCESS)
}
