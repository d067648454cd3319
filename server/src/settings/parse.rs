//! Settings as text, by name, and how each kind of value is read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SETTINGS;
use crate::error::SettingError;

/// Every setting given, by its name in [`SETTINGS`], as text.
#[derive(Debug, Default)]
pub(super) struct Raw(BTreeMap<&'static str, String>);

impl Raw {
    /// The settings of a TOML file; an unknown name is an error.
    pub(super) fn from_file(path: &Path) -> Result<Self, SettingError> {
        let file_error = |reason: String| SettingError::File {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
        let mut raw = Self::default();
        for (name, value) in table {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map_or_else(|| item.to_string(), str::to_owned)
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            if !raw.set_known(&name, text) {
                return Err(file_error(format!("unknown setting `{name}`")));
            }
        }
        Ok(raw)
    }

    /// Sets `name` if it is a setting; says whether it is.
    pub(super) fn set_known(&mut self, name: &str, value: String) -> bool {
        let known = SETTINGS.iter().find(|(known, _)| *known == name);
        if let Some((known, _)) = known {
            self.0.insert(known, value);
        }
        known.is_some()
    }

    /// The setting's text, trimmed; `None` when unset or empty.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    pub(super) fn boolean(&self, name: &'static str, default: bool) -> Result<bool, SettingError> {
        match self.get(name) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(_) => Err(SettingError::invalid(name, "expected true or false")),
        }
    }

    pub(super) fn number<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: T,
    ) -> Result<T, SettingError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| SettingError::invalid(name, "expected a whole number")),
        }
    }

    pub(super) fn duration(
        &self,
        name: &'static str,
        default: Duration,
    ) -> Result<Duration, SettingError> {
        match self.get(name) {
            None => Ok(default),
            Some(text) => parse_duration(text).ok_or_else(|| {
                SettingError::invalid(name, "expected a duration such as 500ms, 5s, 30m or 1h")
            }),
        }
    }

    /// The contents of the PEM file the setting names.
    pub(super) fn pem(&self, name: &'static str) -> Result<Option<Vec<u8>>, SettingError> {
        self.get(name)
            .map(|path| {
                std::fs::read(PathBuf::from(path))
                    .map_err(|e| SettingError::invalid(name, format!("cannot read {path:?}: {e}")))
            })
            .transpose()
    }
}

/// Parses `<whole number><ms|s|m|h>`.
pub(super) fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    Some(Duration::from_millis(number.checked_mul(millis)?))
}

/// 64 hex digits as 32 bytes.
pub(super) fn parse_key_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(hex.as_bytes().chunks(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(key)
}
