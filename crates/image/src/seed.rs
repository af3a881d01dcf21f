//! Seed volumes: small VFAT images made in Rust (`fatfs`), for cloud-init's
//! NoCloud (`CIDATA`) and for configuration files read from a USB disk
//! (pfSense's config loader). Built in a temp file and renamed into place.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use berth_spec::image::{Seed, SeedContent};

use crate::{ImageError, Result};

/// The bytes of every file of `seed` (host files are read now).
pub fn contents(seed: &Seed) -> Result<Vec<(String, Vec<u8>)>> {
    seed.files
        .iter()
        .map(|(name, c)| {
            let bytes = match c {
                SeedContent::Inline(s) => s.clone().into_bytes(),
                SeedContent::Path(p) => {
                    std::fs::read(p).map_err(|e| ImageError::io("reading seed file", p, e))?
                }
            };
            Ok((name.clone(), bytes))
        })
        .collect()
}

/// Writes the VFAT volume for `seed` to `dest` (replacing it atomically).
pub fn build(seed: &Seed, dest: &Path) -> Result<()> {
    let files = contents(seed)?;
    let payload: u64 = files.iter().map(|(_, b)| b.len() as u64 + 4096).sum();
    // FAT12/16 overhead is small; leave room and round to whole MiB.
    let size = (payload + payload / 4 + (2 << 20)).div_ceil(1 << 20) * (1 << 20);
    let mut label = [b' '; 11];
    for (i, b) in seed.label.bytes().take(11).enumerate() {
        label[i] = b.to_ascii_uppercase();
    }
    let dir = dest.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| ImageError::io("creating", dir, e))?;
    let tmp = dest.with_extension("img.tmp");
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&tmp)?;
        f.set_len(size)?;
        fatfs::format_volume(
            fscommon::BufStream::new(&mut f),
            fatfs::FormatVolumeOptions::new().volume_label(label),
        )?;
        f.seek(SeekFrom::Start(0))?;
        {
            let fs =
                fatfs::FileSystem::new(fscommon::BufStream::new(&mut f), fatfs::FsOptions::new())?;
            for (name, bytes) in &files {
                let root = fs.root_dir();
                let mut parts: Vec<&str> = name.split('/').collect();
                let file = parts.pop().unwrap_or_default();
                let mut d = root;
                for p in parts {
                    d = match d.open_dir(p) {
                        Ok(x) => x,
                        Err(_) => d.create_dir(p)?,
                    };
                }
                let mut out = d.create_file(file)?;
                out.truncate()?;
                out.write_all(bytes)?;
                out.flush()?;
            }
            fs.unmount()?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::Seed(format!(
            "building {}: {e}",
            dest.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn volume_has_label_and_files() {
        let d = tempfile::tempdir().expect("tmp");
        let host = d.path().join("config.xml");
        std::fs::write(&host, "<pfsense/>\n").expect("write");
        let seed = Seed {
            kind: "files".into(),
            label: "CONFIG".into(),
            files: [
                ("config.xml".to_string(), SeedContent::Path(host)),
                ("sub/note.txt".to_string(), SeedContent::Inline("hi".into())),
            ]
            .into(),
            usb: false,
        };
        let img = d.path().join("seed.img");
        build(&seed, &img).expect("build");
        let f = std::fs::File::open(&img).expect("open");
        let fs = fatfs::FileSystem::new(f, fatfs::FsOptions::new()).expect("fat");
        assert_eq!(fs.volume_label().trim(), "CONFIG");
        let mut s = String::new();
        fs.root_dir()
            .open_file("config.xml")
            .expect("file")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "<pfsense/>\n");
        let mut s = String::new();
        fs.root_dir()
            .open_file("sub/note.txt")
            .expect("file")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "hi");
        // A missing host file is an error and leaves nothing behind.
        let bad = Seed {
            files: [("x".to_string(), SeedContent::Path(d.path().join("missing")))].into(),
            ..seed
        };
        let img2 = d.path().join("seed2.img");
        assert!(build(&bad, &img2).is_err());
        assert!(!img2.exists());
    }
}
