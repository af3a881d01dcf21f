//! Decompression of downloads, by format name or by magic bytes.

use std::io::{Read, Write};

use berth_spec::image::Decompress;

/// A concrete format (what `auto` resolved to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gz,
    Bz2,
    Xz,
    Zstd,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Gz => "gz",
            Format::Bz2 => "bz2",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
        }
    }
}

/// The format `head` (the first bytes of a file) starts with, if any.
pub fn sniff(head: &[u8]) -> Option<Format> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Format::Gz)
    } else if head.starts_with(b"BZh") {
        Some(Format::Bz2)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        Some(Format::Xz)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Format::Zstd)
    } else {
        None
    }
}

/// What to do with a file starting with `head` under the spec's setting.
pub fn resolve(setting: Decompress, head: &[u8]) -> Option<Format> {
    match setting {
        Decompress::Auto => sniff(head),
        Decompress::None => None,
        Decompress::Gz => Some(Format::Gz),
        Decompress::Bz2 => Some(Format::Bz2),
        Decompress::Xz => Some(Format::Xz),
        Decompress::Zstd => Some(Format::Zstd),
    }
}

/// Streams `input` decompressed as `format` into `out`; returns the bytes
/// written. Multi-member gzip and concatenated streams are read whole.
pub fn decompress(format: Format, input: impl Read, out: &mut impl Write) -> std::io::Result<u64> {
    let input = std::io::BufReader::with_capacity(1 << 20, input);
    match format {
        Format::Gz => std::io::copy(&mut flate2::read::MultiGzDecoder::new(input), out),
        Format::Bz2 => std::io::copy(&mut bzip2::read::MultiBzDecoder::new(input), out),
        Format::Xz => std::io::copy(&mut liblzma::read::XzDecoder::new_multi_decoder(input), out),
        Format::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
            std::io::copy(&mut d, out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(format: Format, compressed: Vec<u8>, plain: &[u8]) {
        assert_eq!(sniff(&compressed), Some(format), "{format:?}");
        let mut out = Vec::new();
        let n = decompress(format, compressed.as_slice(), &mut out).expect("decompress");
        assert_eq!(n as usize, plain.len());
        assert_eq!(out, plain, "{format:?}");
    }

    #[test]
    fn every_format_roundtrips() {
        let plain: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).expect("gz");
        roundtrip(Format::Gz, gz.finish().expect("gz"), &plain);
        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&plain).expect("bz2");
        roundtrip(Format::Bz2, bz.finish().expect("bz2"), &plain);
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&plain).expect("xz");
        roundtrip(Format::Xz, xz.finish().expect("xz"), &plain);
        roundtrip(
            Format::Zstd,
            zstd::encode_all(plain.as_slice(), 1).expect("zstd"),
            &plain,
        );
    }

    #[test]
    fn auto_and_explicit() {
        assert_eq!(resolve(Decompress::Auto, b"QFI\xfb"), None);
        assert_eq!(resolve(Decompress::None, &[0x1f, 0x8b]), None);
        assert_eq!(resolve(Decompress::Xz, b"anything"), Some(Format::Xz));
    }

    #[test]
    fn corrupt_input_is_an_error() {
        let mut out = Vec::new();
        assert!(decompress(Format::Gz, &b"\x1f\x8bnot really gzip"[..], &mut out).is_err());
        assert!(decompress(Format::Xz, &b"plain text"[..], &mut out).is_err());
    }
}
