//! `[extensions.NAME]` sections: named instances of extension kinds, with
//! the kind's own settings, and the lists that attach them (a route's
//! `extensions`, the top-level `global_extensions`). Whether a kind exists
//! and accepts its settings is known only to the program's registry, so
//! that is checked where instances are built (`extension::Instances`).

use std::path::PathBuf;

use serde::Deserialize;

/// One `[extensions.NAME]`: `kind = "..."` and the kind's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct ExtensionDecl {
    pub kind: String,
    /// Every other key of the section, handed to the kind.
    pub settings: toml::Table,
    /// Where it is declared: the line (for errors that name it) and the
    /// configuration file's folder (what the files it names are relative to).
    pub line: usize,
    pub dir: PathBuf,
}

impl PartialEq for ExtensionDecl {
    /// The same instance: kind and settings (where it is written is not part of it).
    fn eq(&self, other: &ExtensionDecl) -> bool {
        self.kind == other.kind && self.settings == other.settings
    }
}

impl TryFrom<toml::Table> for ExtensionDecl {
    type Error = String;

    fn try_from(mut settings: toml::Table) -> Result<ExtensionDecl, String> {
        let kind = match settings.remove("kind") {
            Some(toml::Value::String(kind)) => kind,
            Some(other) => {
                return Err(format!(
                    "kind must be a string naming the kind of extension (e.g. kind = \"lua\"), not {other}"
                ))
            }
            None => {
                return Err(
                    "missing field `kind`: say which kind of extension this is (e.g. kind = \"lua\")"
                        .to_owned(),
                )
            }
        };
        Ok(ExtensionDecl {
            kind,
            settings,
            line: 0,
            dir: PathBuf::new(),
        })
    }
}

/// Whether `name` may name an instance: the rule of group names.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
