//! What `berth image gc` must keep: every image a recorded guest uses (its
//! `guests/NAME/config.json`), the backing file of every disk made from an
//! image, and the images of the spec files named on the command line.

use std::collections::BTreeSet;
use std::path::Path;

use berth_spec::image::Image;

use crate::Cache;

/// Download hashes in use under `state_dir`, plus those of `extra` images.
pub fn in_use(state_dir: &Path, extra: &[Image]) -> BTreeSet<String> {
    let cache = Cache::new(state_dir);
    let mut keep = BTreeSet::new();
    let add = |img: &Image, keep: &mut BTreeSet<String>| {
        if let Some(h) = cache.hash_of(img) {
            keep.insert(h);
        }
    };
    for img in extra {
        add(img, &mut keep);
    }
    let mut disks = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir.join("guests")) {
        for e in rd.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join("config.json")) else {
                continue;
            };
            let Ok(g) = serde_json::from_slice::<berth_spec::Guest>(&bytes) else {
                continue;
            };
            if let Some(vm) = &g.vm {
                for img in vm.images.values() {
                    add(img, &mut keep);
                }
                for d in vm.disks.iter().filter(|d| d.image.is_some()) {
                    disks.push(if d.managed() {
                        berth_spec::vm::managed_disk_dir(state_dir, &g.name).join(&d.path)
                    } else {
                        d.path.clone()
                    });
                }
            }
        }
    }
    // Managed disks of guests whose config is gone (a failed create) too:
    // an overlay must never lose its backing file.
    if let Ok(rd) = std::fs::read_dir(state_dir.join("disks")) {
        for g in rd.flatten() {
            if let Ok(files) = std::fs::read_dir(g.path()) {
                disks.extend(files.flatten().map(|f| f.path()));
            }
        }
    }
    disks.sort();
    disks.dedup();
    for d in disks {
        if let Ok((_, _, Some(backing))) = crate::disk::image_info(&d)
            && let Some(h) = cache.source_of(Path::new(&backing))
        {
            keep.insert(h);
        }
    }
    keep
}
