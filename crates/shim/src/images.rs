//! What a VM's `image:NAME` references, image disks and seed become at
//! start: files in the image cache (pulled by the daemon before the guest
//! was created; nothing is downloaded here), disks made from them once, and
//! the seed volume, rebuilt from the spec at every start.

use std::path::{Path, PathBuf};

use berth_image::Cache;
use berth_image::disk::DiskOutcome;
use berth_spec::Guest;
use berth_spec::image::image_ref;
use berth_spec::vm::{DiskFormat, Vm, managed_disk_dir};

/// Paths QEMU gets, every `image:NAME` resolved.
pub struct Resolved {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cdrom: Option<PathBuf>,
    /// One per `vm.disks`, absolute.
    pub disks: Vec<PathBuf>,
    /// The seed volume and whether it goes on USB.
    pub seed: Option<(PathBuf, bool)>,
    pub warnings: Vec<String>,
}

fn resolve(cache: &Cache, vm: &Vm, p: &Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    let Some(p) = p else { return Ok(None) };
    let Some(name) = image_ref(p) else {
        return Ok(Some(p.clone()));
    };
    let img = vm.images.get(name).ok_or_else(|| {
        format!("image `{name}` is not in the guest's config (re-apply the spec)")
    })?;
    cache.resolve(img).map(Some).map_err(|e| e.to_string())
}

/// Resolves references, makes missing image disks (owned by `runas`) and
/// builds the seed volume.
pub fn prepare(
    cfg: &Guest,
    vm: &Vm,
    state_dir: &Path,
    guest_dir: &Path,
    runas: Option<(u32, u32)>,
) -> Result<Resolved, String> {
    let cache = Cache::new(state_dir);
    let mut warnings = Vec::new();
    let kernel = resolve(&cache, vm, &vm.kernel)?;
    let initrd = resolve(&cache, vm, &vm.initrd)?;
    let cdrom = resolve(&cache, vm, &vm.cdrom)?;
    let disk_dir = managed_disk_dir(state_dir, &cfg.name);
    let mut disks = Vec::new();
    for d in &vm.disks {
        let path = if d.managed() {
            disk_dir.join(&d.path)
        } else {
            d.path.clone()
        };
        if let Some(name) = &d.image {
            let img = vm
                .images
                .get(name)
                .ok_or_else(|| format!("image `{name}` is not in the guest's config"))?;
            let artifact = cache.resolve(img).map_err(|e| e.to_string())?;
            let size = d.size.unwrap_or(0);
            let outcome = berth_image::disk::ensure_disk_from_image(
                name,
                &artifact,
                &path,
                d.format == DiskFormat::Qcow2,
                size,
            )
            .map_err(|e| e.to_string())?;
            match outcome {
                DiskOutcome::Created => {
                    if let Some((uid, gid)) = runas {
                        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                            .map_err(|e| format!("chown {}: {e}", path.display()))?;
                    }
                }
                DiskOutcome::Existed(Some(w)) => warnings.push(w),
                DiskOutcome::Existed(None) => {}
            }
        }
        disks.push(path);
    }
    let seed = match &vm.seed {
        None => None,
        Some(s) => {
            let p = guest_dir.join("seed.img");
            berth_image::seed::build(s, &p).map_err(|e| e.to_string())?;
            Some((p, s.usb))
        }
    };
    Ok(Resolved {
        kernel,
        initrd,
        cdrom,
        disks,
        seed,
        warnings,
    })
}
