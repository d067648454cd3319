//! The layers settings come from (defaults, the TOML file, the
//! environment), merged into [`Raw`], and what serde cannot read alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::error::Kind;
use figment::providers::Serialized;
use redis_failover::NodeAddr;
use serde::{Deserialize, Deserializer, de};

use super::table::{Raw, SETTINGS};
use crate::error::SettingError;

impl Raw {
    /// The defaults, under `file`, under the `SERVER_*` variables of `env`.
    pub(super) fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, SettingError> {
        let defaults: BTreeMap<&str, &str> = SETTINGS
            .iter()
            .filter_map(|setting| Some((setting.name, setting.default?)))
            .collect();
        let mut figment = Figment::from(Serialized::defaults(defaults));
        if let Some(path) = file {
            figment = figment.merge(Serialized::defaults(file_layer(path)?));
        }
        let mut raw: Self = figment
            .merge(Serialized::defaults(env_layer(env)))
            // Lossy: the environment's text reads as numbers and booleans
            // where the field is one, and stays text where it is text (an
            // all-digit password).
            .extract_lossy()
            .map_err(|error| setting_error(error, file))?;
        raw.read_secret_files()?;
        Ok(raw)
    }

    /// Moves each secret given as a `*_file` into its setting.
    fn read_secret_files(&mut self) -> Result<(), SettingError> {
        // Each setting's name is its field's: no spelling to drift.
        macro_rules! secret {
            ($value:ident, $file:ident) => {
                (
                    &mut self.$value,
                    &mut self.$file,
                    stringify!($value),
                    stringify!($file),
                )
            };
        }
        let secrets = [
            secret!(redis_password, redis_password_file),
            secret!(redis_sentinel_password, redis_sentinel_password_file),
            secret!(jwt_secret, jwt_secret_file),
            secret!(encryption_key, encryption_key_file),
            secret!(cursor_secret, cursor_secret_file),
        ];
        for (value, file, name, file_name) in secrets {
            let Some(path) = file.take() else {
                continue;
            };
            if value.is_some() {
                return Err(SettingError::invalid(
                    name,
                    format!("set {name} or {file_name}, not both"),
                ));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| {
                SettingError::invalid(file_name, format!("cannot read {path:?}: {e}"))
            })?;
            // `echo secret > file` and editors end the file with a newline
            // that is no part of the secret.
            let text = text.trim_end_matches(['\n', '\r']);
            *value = (!text.is_empty()).then(|| text.to_owned());
        }
        Ok(())
    }
}

/// The file's settings, with empty strings dropped (unset, as in the
/// environment).
fn file_layer(path: &Path) -> Result<toml::Table, SettingError> {
    let file_error = |reason: String| SettingError::File {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| file_error(e.message().to_owned()))?;
    table.retain(|_, value| value.as_str().is_none_or(|text| !text.trim().is_empty()));
    Ok(table)
}

/// The known settings among the `SERVER_*` variables, trimmed, empty ones
/// dropped. Unknown ones are ignored: Kubernetes injects `SERVER_PORT` and
/// the like for a service named `server`.
fn env_layer(env: impl IntoIterator<Item = (String, String)>) -> BTreeMap<&'static str, String> {
    env.into_iter()
        .filter_map(|(name, value)| {
            let name = name.strip_prefix("SERVER_")?.to_ascii_lowercase();
            let setting = SETTINGS.iter().find(|setting| setting.name == name)?;
            let value = value.trim();
            (!value.is_empty()).then(|| (setting.name, value.to_owned()))
        })
        .collect()
}

/// The error of the first setting that failed, by name.
fn setting_error(error: figment::Error, file: Option<&Path>) -> SettingError {
    // Only the file can hold an unknown key: the defaults and the
    // environment give known ones only.
    if let (Kind::UnknownField(name, _), Some(path)) = (&error.kind, file) {
        return SettingError::File {
            path: path.to_owned(),
            reason: format!("unknown setting `{name}`"),
        };
    }
    let setting = error
        .path
        .first()
        .and_then(|key| SETTINGS.iter().find(|setting| setting.name == key));
    match setting {
        Some(setting) => SettingError::invalid(setting.name, error.kind.to_string()),
        None => SettingError::File {
            path: file.map_or_else(PathBuf::new, Path::to_owned),
            reason: error.to_string(),
        },
    }
}

/// Text (a variable, or a TOML string) or a TOML array of text.
#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrList {
    Text(String),
    List(Vec<String>),
}

/// `host:port` nodes, comma-separated or as a TOML array.
pub(super) fn nodes<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<NodeAddr>>, D::Error> {
    let items = match TextOrList::deserialize(deserializer)? {
        TextOrList::Text(text) => text.split(',').map(str::to_owned).collect(),
        TextOrList::List(items) => items,
    };
    items
        .iter()
        .map(|item| parse_node(item))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// One `host:port` node.
pub(super) fn node<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<NodeAddr>, D::Error> {
    parse_node(&String::deserialize(deserializer)?).map(Some)
}

fn parse_node<E: de::Error>(text: &str) -> Result<NodeAddr, E> {
    let text = text.trim();
    text.parse()
        .map_err(|_| E::custom(format!("{text:?} is not host:port")))
}

/// An `ip:port` address; serde's own error would not say what is expected.
pub(super) fn address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    let text = text.trim();
    text.parse()
        .map_err(|_| de::Error::custom(format!("{text:?} is not ip:port")))
}

/// A quota's default: a number, or `unlimited` (or `none`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct QuotaLimit(pub(super) Option<u64>);

impl<'de> Deserialize<'de> for QuotaLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Number(u64),
            Text(String),
        }
        let expected = "expected a whole number, or unlimited";
        match Given::deserialize(deserializer).map_err(|_| de::Error::custom(expected))? {
            Given::Number(number) => Ok(Self(Some(number))),
            Given::Text(text) => match text.trim() {
                "unlimited" | "none" => Ok(Self(None)),
                number => number
                    .parse()
                    .map(|number| Self(Some(number)))
                    .map_err(|_| de::Error::custom(format!("{number:?}: {expected}"))),
            },
        }
    }
}
