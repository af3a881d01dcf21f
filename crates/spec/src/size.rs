//! `ByteSize`: a number of bytes written as an integer or a string with a
//! binary (1024-based) suffix.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const UNITS: [(char, u64); 4] = [
    ('T', 1 << 40),
    ('G', 1 << 30),
    ('M', 1 << 20),
    ('K', 1 << 10),
];

/// A size in bytes. In a spec it is either an integer (bytes) or a string
/// with an optional `K`, `M`, `G` or `T` suffix (1024-based; `KiB`, `KB`
/// and lower case are accepted too): `"128M"`, `"1G"`, `"512k"`, `"128MiB"`.
///
/// Displays as the largest exact unit (`128M`), or plain bytes (`1000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size string that is not a number with an optional K, M, G or T suffix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size \"{0}\": use a number with an optional K, M, G or T suffix, e.g. \"128M\"")]
pub struct ParseSizeError(pub String);

impl ByteSize {
    /// Number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }

    /// True when the size is a whole number of KiB (so it serializes as a
    /// string like `"128M"`).
    fn is_exact(self) -> bool {
        self.0 != 0 && self.0.is_multiple_of(1024)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, unit) in UNITS {
            if self.0 != 0 && self.0.is_multiple_of(unit) {
                return write!(f, "{}{}", self.0 / unit, suffix);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = ParseSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseSizeError(s.to_string());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_exact() {
            s.collect_str(self)
        } else {
            s.serialize_u64(self.0)
        }
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: bytes as an integer, or a string like \"128M\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
        u64::try_from(v)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("invalid size {v}: a size cannot be negative")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
        Err(E::custom(format!(
            "invalid size {v}: use whole bytes or a string with a K, M, G or T suffix, e.g. \"1536M\""
        )))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ByteSizeVisitor)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size: bytes as an integer, or a string with an optional K, M, G or T suffix (1024-based), e.g. \"128M\".",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^\\s*[0-9]+\\s*([kKmMgGtT]([iI]?[bB])?|[bB])?\\s*$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        let cases = [
            ("128M", 128 << 20),
            ("128MiB", 128 << 20),
            ("128mb", 128 << 20),
            ("1G", 1 << 30),
            ("512k", 512 << 10),
            ("2T", 2 << 40),
            ("4096", 4096),
            (" 7 K ", 7 << 10),
        ];
        for (s, want) in cases {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(want)), "{s}");
        }
    }

    #[test]
    fn rejects_bad_strings() {
        for s in [
            "12Q",
            "",
            "M",
            "1.5G",
            "-1M",
            "99999999999999999999T",
            "1 G B",
        ] {
            let e = s.parse::<ByteSize>().expect_err(s);
            let msg = e.to_string();
            assert!(msg.contains(&format!("invalid size \"{s}\"")), "{msg}");
            assert!(msg.contains("e.g. \"128M\""), "{msg}");
        }
    }

    #[test]
    fn display_picks_largest_exact_unit() {
        assert_eq!(ByteSize(128 << 20).to_string(), "128M");
        assert_eq!(ByteSize(1 << 30).to_string(), "1G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(512 << 10).to_string(), "512K");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(0).to_string(), "0");
    }

    #[test]
    fn json_round_trip() {
        for v in [0, 1000, 1024, 128 << 20, 3 << 40, (1 << 30) + 1] {
            let b = ByteSize(v);
            let j = serde_json::to_string(&b).expect("serialize");
            let back: ByteSize = serde_json::from_str(&j).expect("deserialize");
            assert_eq!(back, b, "{j}");
        }
        assert_eq!(
            serde_json::to_string(&ByteSize(128 << 20)).expect("ser"),
            "\"128M\""
        );
        assert_eq!(serde_json::to_string(&ByteSize(1000)).expect("ser"), "1000");
    }

    #[test]
    fn toml_round_trip() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct W {
            a: ByteSize,
            b: ByteSize,
        }
        let w = W {
            a: ByteSize(256 << 20),
            b: ByteSize(12345),
        };
        let t = toml::to_string(&w).expect("serialize");
        assert!(t.contains("a = \"256M\""), "{t}");
        assert!(t.contains("b = 12345"), "{t}");
        let back: W = toml::from_str(&t).expect("deserialize");
        assert_eq!(back, w);
    }

    #[test]
    fn negative_and_float_rejected() {
        let e = serde_json::from_str::<ByteSize>("-5").expect_err("negative");
        assert!(e.to_string().contains("cannot be negative"), "{e}");
        let e = serde_json::from_str::<ByteSize>("1.5").expect_err("float");
        assert!(e.to_string().contains("invalid size 1.5"), "{e}");
    }
}
