//! `berth image ls|pull|gc`: the image cache under the state dir, used
//! directly (no daemon needed; a flock per image keeps a pull here and one
//! in the daemon from downloading twice).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use berth_image::Cache;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List cached images: hash, size, the names and URLs they were pulled
    /// as, and what was decompressed or extracted from them.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Download and verify the images a spec declares (all, or the NAMEs
    /// given), then decompress/extract them. Cached images make no request;
    /// an interrupted download resumes. A `sha256_url` checksum file is
    /// always fetched again here (`apply` reuses the hash found last time).
    ///
    ///   berth image pull examples/demo.toml
    ///   berth image pull router.toml pfsense-iso
    Pull { file: PathBuf, names: Vec<String> },
    /// Remove cached images that no guest uses: kept are the images of every
    /// applied guest, the backing files of disks made from images, and the
    /// images of the spec FILEs given (e.g. one you pulled but have not
    /// applied yet). Waits for pulls and applies in progress.
    Gc {
        /// Spec files whose images are kept too.
        files: Vec<PathBuf>,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn run(state_dir: &Path, cmd: ImageCmd) -> Result<ExitCode> {
    let cache = Cache::new(state_dir);
    match cmd {
        ImageCmd::Ls { json } => ls(&cache, json),
        ImageCmd::Pull { file, names } => pull(&cache, &file, &names),
        ImageCmd::Gc { files, dry_run } => gc(state_dir, &cache, &files, dry_run),
    }
}

fn images_of(file: &Path) -> Result<std::collections::BTreeMap<String, berth_spec::image::Image>> {
    let spec = berth_spec::load(file)?;
    // Only the images need to be valid here (a pull may come before the
    // guests are finished), so validate them alone.
    let (images, errors) = berth_spec::image::validate_images(&spec.image);
    if !errors.is_empty() {
        let lines: Vec<String> = errors
            .iter()
            .map(|(n, r)| format!("{}: image.{n}: {r}", file.display()))
            .collect();
        bail!("{}", lines.join("\n"));
    }
    Ok(images)
}

fn pull(cache: &Cache, file: &Path, names: &[String]) -> Result<ExitCode> {
    let images = images_of(file)?;
    if images.is_empty() {
        bail!(
            "{} declares no images ([image.NAME] with url and sha256)",
            file.display()
        );
    }
    for n in names {
        if !images.contains_key(n) {
            bail!(
                "{} declares no image `{n}` (it declares: {})",
                file.display(),
                images.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut failed = 0;
    for (name, img) in &images {
        if !names.is_empty() && !names.contains(name) {
            continue;
        }
        let mut r = berth_image::progress::Reporter::new();
        match cache.pull(img, true, &mut |e| r.event(e)) {
            Ok(p) => println!("{name}\t{}", p.display()),
            Err(e) => {
                eprintln!("error: image {name}: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn mib(n: u64) -> String {
    format!("{:.1}M", n as f64 / (1024.0 * 1024.0))
}

fn ls(cache: &Cache, json: bool) -> Result<ExitCode> {
    let entries = cache.list().context("reading the image cache")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if entries.is_empty() {
        println!("no cached images (in {})", cache.root().display());
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<14} {:>9}  {:<16} URL", "SHA256", "SIZE", "NAMES");
    for e in entries {
        let names = if e.partial {
            "(partial)".to_string()
        } else {
            e.names.join(",")
        };
        println!(
            "{:<14} {:>9}  {:<16} {}",
            &e.sha256[..12.min(e.sha256.len())],
            mib(e.size),
            names,
            e.urls.join(" ")
        );
        for d in e.derived {
            println!("{:<14} {:>9}  └ {}", "", mib(d.size), d.transform);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn gc(state_dir: &Path, cache: &Cache, files: &[PathBuf], dry_run: bool) -> Result<ExitCode> {
    let mut extra = Vec::new();
    for f in files {
        extra.extend(images_of(f)?.into_values());
    }
    let keep = berth_image::inuse::in_use(state_dir, &extra);
    if dry_run {
        for e in cache.list()? {
            if !keep.contains(&e.sha256) {
                println!(
                    "would remove {} ({}, {})",
                    e.sha256,
                    mib(e.size),
                    e.urls.join(" ")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let removed = cache
        .gc(&keep)
        .context("collecting garbage in the image cache")?;
    for p in &removed {
        println!("removed {}", p.display());
    }
    if removed.is_empty() {
        println!("nothing to remove ({} image(s) in use)", keep.len());
    }
    Ok(ExitCode::SUCCESS)
}
