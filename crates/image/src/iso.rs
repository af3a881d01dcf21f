//! One file out of an ISO 9660 image (Rock Ridge and Joliet names too),
//! streamed: a memstick image inside an installer ISO may be large.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use hadris_iso::read::IsoImage;

use crate::{ImageError, Result};

/// ISO 9660's logical block size (every image berth has seen; the volume
/// descriptor may in theory say otherwise).
const BLOCK: u64 = 2048;

/// Copies `inner` (e.g. "/boot/vmlinuz") out of the ISO at `iso` into `out`;
/// returns the bytes written.
pub fn extract(image: &str, iso: &Path, inner: &str, out: &mut impl Write) -> Result<u64> {
    let f = File::open(iso).map_err(|e| ImageError::io("opening", iso, e))?;
    let img = IsoImage::open(std::io::BufReader::new(f)).map_err(|e| ImageError::NotIso {
        image: image.to_string(),
        message: format!("{e:?}"),
    })?;
    let not_iso = |e: hadris_iso::sync::Error| ImageError::NotIso {
        image: image.to_string(),
        message: format!("{e:?}"),
    };
    let entry = img.find_path(inner).map_err(not_iso)?;
    let Some(entry) = entry.filter(|e| e.is_file()) else {
        return Err(ImageError::NotInIso {
            image: image.to_string(),
            path: inner.to_string(),
            near: siblings(&img, inner),
        });
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    for ext in entry.extents() {
        let mut off = ext.sector.0 as u64 * BLOCK;
        let mut left = u64::from(ext.length);
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            img.read_bytes_at(off, &mut buf[..n]).map_err(not_iso)?;
            out.write_all(&buf[..n])
                .map_err(|e| ImageError::io("writing what was extracted from", iso, e))?;
            off += n as u64;
            left -= n as u64;
            written += n as u64;
        }
    }
    Ok(written)
}

/// Names in the directory `inner` would be in (for the error message).
fn siblings<R: std::io::Read + std::io::Seek>(img: &IsoImage<R>, inner: &str) -> Vec<String> {
    let parent = inner
        .trim_end_matches('/')
        .rsplit_once('/')
        .map_or("", |(p, _)| p);
    let dir = if parent.trim_matches('/').is_empty() {
        Some(img.open_dir(img.root_dir().dir_ref()))
    } else {
        match img.find_path(parent) {
            Ok(Some(e)) if e.is_directory() => e.as_dir_ref(img).ok().map(|r| img.open_dir(r)),
            _ => None,
        }
    };
    let Some(dir) = dir else { return Vec::new() };
    let mut names: Vec<String> = dir
        .entries()
        .filter_map(|e| e.ok())
        .filter(|e| !e.is_special())
        .map(|e| {
            let n = e.display_name().trim_end_matches(";1").to_string();
            if e.is_directory() { format!("{n}/") } else { n }
        })
        .take(20)
        .collect();
    names.sort();
    names
}
