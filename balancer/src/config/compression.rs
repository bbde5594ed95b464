//! The `[compression]` section: which encodings, at which levels, for which
//! responses. Parsed into types that cannot hold a bad value (an unknown
//! algorithm, a level out of its range, a malformed media type pattern).

use std::fmt;

use serde::{de, Deserialize, Deserializer};

use super::diff::{Keys, Section};
use super::ByteSize;

/// Response compression; absent: nothing is compressed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// The encodings offered, in the order of preference among those a
    /// client accepts equally.
    #[serde(default = "default_algorithms", deserialize_with = "algorithms")]
    pub algorithms: Vec<Encoding>,
    #[serde(default)]
    pub levels: Levels,
    /// Smaller bodies (by their `Content-Length`) are sent as they are.
    #[serde(default = "default_min_length")]
    pub min_length: ByteSize,
    /// The media types compressed.
    #[serde(default = "default_types")]
    pub types: Vec<TypePattern>,
}

impl Default for Compression {
    /// A `[compression]` section that sets nothing.
    fn default() -> Self {
        Compression {
            algorithms: default_algorithms(),
            levels: Levels::default(),
            min_length: default_min_length(),
            types: default_types(),
        }
    }
}

impl Compression {
    /// The level `encoding` is compressed at.
    pub fn level(&self, encoding: Encoding) -> u32 {
        match encoding {
            Encoding::Gzip => self.levels.gzip.0,
            Encoding::Br => self.levels.br.0,
            Encoding::Zstd => self.levels.zstd.0,
        }
    }
}

impl Section for Compression {
    /// Read for each response.
    fn keys(&mut self, _old: &Self, keys: &mut Keys) {
        let Compression {
            algorithms,
            levels,
            min_length,
            types,
        } = self;
        keys.live("algorithms", algorithms);
        keys.live("levels", levels);
        keys.live("min_length", min_length);
        keys.live("types", types);
    }
}

/// A content coding the balancer can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Gzip,
    Br,
    Zstd,
}

impl Encoding {
    /// Its name in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
        }
    }
}

fn default_algorithms() -> Vec<Encoding> {
    vec![Encoding::Gzip]
}

fn algorithms<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Encoding>, D::Error> {
    let list = Vec::<Encoding>::deserialize(d)?;
    if list.is_empty() {
        return Err(de::Error::custom(
            "compression.algorithms is empty: list one or more of \"gzip\", \"br\", \"zstd\" (or remove [compression])",
        ));
    }
    if let Some(twice) = list
        .iter()
        .enumerate()
        .find(|(i, a)| list[..*i].contains(a))
    {
        return Err(de::Error::custom(format!(
            "compression.algorithms lists {:?} twice",
            twice.1.token()
        )));
    }
    Ok(list)
}

fn default_min_length() -> ByteSize {
    ByteSize(1 << 10)
}

fn default_types() -> Vec<TypePattern> {
    [
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "image/svg+xml",
        "+json",
        "+xml",
    ]
    .iter()
    .filter_map(|t| TypePattern::parse(t).ok())
    .collect()
}

/// The level of each algorithm (`{ gzip = 6, br = 4, zstd = 3 }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Levels {
    pub gzip: Level<1, 9>,
    pub br: Level<1, 11>,
    pub zstd: Level<1, 19>,
}

impl Default for Levels {
    /// Where each algorithm trades little speed for most of its gain.
    fn default() -> Self {
        Levels {
            gzip: Level(6),
            br: Level(4),
            zstd: Level(3),
        }
    }
}

/// A compression level within `MIN..=MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level<const MIN: u32, const MAX: u32>(pub u32);

impl<'de, const MIN: u32, const MAX: u32> Deserialize<'de> for Level<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let level = i64::deserialize(d)?;
        u32::try_from(level)
            .ok()
            .filter(|l| (MIN..=MAX).contains(l))
            .map(Level)
            .ok_or_else(|| {
                de::Error::custom(format!(
                    "invalid compression level {level}: from {MIN} to {MAX}"
                ))
            })
    }
}

/// A media type pattern: `text/*`, `application/json`, or `+json` (any
/// type with that structured-syntax suffix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypePattern {
    /// `text/*`: the top-level type, with its slash.
    Prefix(String),
    Exact(String),
    /// `+json`.
    Suffix(String),
}

impl TypePattern {
    pub fn parse(text: &str) -> Result<TypePattern, String> {
        let t = text.trim().to_ascii_lowercase();
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        let pattern = match t.split_once('/') {
            _ if t.starts_with('+') && token(&t[1..]) => TypePattern::Suffix(t),
            Some((top, "*")) if token(top) => TypePattern::Prefix(format!("{top}/")),
            Some((top, sub)) if token(top) && token(sub) => TypePattern::Exact(t),
            _ => {
                return Err(format!(
                    "invalid media type pattern {text:?}: write \"text/*\", \"application/json\" or \"+json\""
                ))
            }
        };
        Ok(pattern)
    }

    /// Whether `media` (lower-case, without parameters) is of this pattern.
    pub fn matches(&self, media: &str) -> bool {
        match self {
            TypePattern::Prefix(top) => media.starts_with(top.as_str()),
            TypePattern::Exact(exact) => media == exact,
            TypePattern::Suffix(suffix) => media.contains('/') && media.ends_with(suffix.as_str()),
        }
    }
}

impl fmt::Display for TypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypePattern::Prefix(top) => write!(f, "{top}*"),
            TypePattern::Exact(t) | TypePattern::Suffix(t) => f.write_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for TypePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TypePattern::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Compression, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn an_empty_section_has_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Compression::default());
        assert_eq!(c.algorithms, [Encoding::Gzip]);
        assert_eq!(c.min_length, ByteSize(1024));
        assert_eq!(
            (
                c.level(Encoding::Gzip),
                c.level(Encoding::Br),
                c.level(Encoding::Zstd)
            ),
            (6, 4, 3)
        );
        assert_eq!(
            c.types.len(),
            7,
            "the text types, JSON, XML, SVG and JavaScript"
        );
    }

    #[test]
    fn every_key_is_read_and_bad_values_are_refused() {
        let c = parse(
            "algorithms = [\"br\", \"zstd\", \"gzip\"]\nlevels = { gzip = 1, br = 11 }\nmin_length = \"2KiB\"\ntypes = [\"application/wasm\", \"+yaml\", \"font/*\"]\n",
        )
        .unwrap();
        assert_eq!(c.algorithms, [Encoding::Br, Encoding::Zstd, Encoding::Gzip]);
        assert_eq!(
            (
                c.level(Encoding::Gzip),
                c.level(Encoding::Br),
                c.level(Encoding::Zstd)
            ),
            (1, 11, 3)
        );
        assert_eq!(c.min_length, ByteSize(2048));
        assert_eq!(
            c.types.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["application/wasm", "+yaml", "font/*"]
        );

        for (bad, says) in [
            ("algorithms = [\"deflate\"]", "unknown variant `deflate`"),
            ("algorithms = []", "algorithms is empty"),
            ("algorithms = [\"gzip\", \"gzip\"]", "\"gzip\" twice"),
            ("levels = { gzip = 10 }", "level 10: from 1 to 9"),
            ("levels = { zstd = -1 }", "level -1"),
            ("levels = { lz4 = 1 }", "unknown field `lz4`"),
            ("types = [\"text\"]", "invalid media type pattern \"text\""),
            ("types = [\"*/*\"]", "invalid media type pattern"),
            ("min_length = \"big\"", "invalid size"),
            ("level = 3", "unknown field `level`"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
