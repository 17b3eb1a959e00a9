//! Config loading: an optional TOML file, then environment variables on top.
//!
//! Every field can be set from the environment as `RIM_<TIER>__<SECTION>__<FIELD>`, e.g.
//! `RIM_COMET__SERVER_ID=comet-2` or `RIM_LOGIC__REDIS__URL=redis://10.0.0.5/`. List fields take
//! comma-separated values. Errors name the field at fault; binaries exit with status 64 on them.

use std::path::Path;

use serde::de::DeserializeOwned;

/// A config that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file or environment could not be read or did not match the schema.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value is present but not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `http.body_limit`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl SettingsError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        SettingsError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Semantic checks beyond what deserialisation enforces.
pub trait Validate {
    /// Returns the first invalid field.
    fn validate(&self) -> Result<(), SettingsError>;
}

/// Loads `T` from `path` (if any) and the `RIM_<TIER>__` environment, then validates it.
///
/// `list_keys` are the dotted fields that take comma-separated lists from the environment.
pub fn load<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
    tier: &str,
    list_keys: &[&str],
) -> Result<T, SettingsError> {
    load_with(path, tier, list_keys, None)
}

/// [`load`] with `env` in place of the process environment: the config a deployment file
/// (compose `environment:`, a unit's `EnvironmentFile`) gives, checked without starting it.
pub fn load_with_env<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
    tier: &str,
    list_keys: &[&str],
    env: std::collections::HashMap<String, String>,
) -> Result<T, SettingsError> {
    load_with(path, tier, list_keys, Some(env))
}

fn load_with<T: DeserializeOwned + Validate>(
    path: Option<&Path>,
    tier: &str,
    list_keys: &[&str],
    source: Option<std::collections::HashMap<String, String>>,
) -> Result<T, SettingsError> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let mut env = config::Environment::with_prefix(&format!("RIM_{}", tier.to_ascii_uppercase()))
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(source);
    if !list_keys.is_empty() {
        env = env.list_separator(",");
        for key in list_keys {
            env = env.with_list_parse_key(key);
        }
    }
    let cfg: T = builder.add_source(env).build()?.try_deserialize()?;
    cfg.validate()?;
    Ok(cfg)
}

/// Fails unless `value` is at least 1 (counts, sizes, durations in ms), naming the field.
pub fn positive(field: &str, value: impl Into<u64>) -> Result<(), SettingsError> {
    if value.into() == 0 {
        return Err(SettingsError::invalid(field, "must be at least 1"));
    }
    Ok(())
}

/// Parses a `host:port` listen address, naming the field on error.
pub fn socket_addr(field: &str, value: &str) -> Result<std::net::SocketAddr, SettingsError> {
    value
        .parse()
        .map_err(|_| SettingsError::invalid(field, format!("{value:?} is not an ip:port address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Demo {
        name: String,
        #[serde(default)]
        ports: Vec<u16>,
    }

    impl Validate for Demo {
        fn validate(&self) -> Result<(), SettingsError> {
            if self.name.is_empty() {
                return Err(SettingsError::invalid("name", "must not be empty"));
            }
            Ok(())
        }
    }

    #[test]
    fn file_then_env_and_errors_name_fields() {
        let dir = std::env::temp_dir().join(format!("rim-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("demo.toml");
        std::fs::write(&file, "name = \"a\"\nports = [1]\n").unwrap();
        let d: Demo = load(Some(&file), "settingstest", &["ports"]).unwrap();
        assert_eq!((d.name.as_str(), d.ports.as_slice()), ("a", &[1u16][..]));

        std::fs::write(&file, "name = \"\"\n").unwrap();
        let err = load::<Demo>(Some(&file), "settingstest", &[]).unwrap_err();
        assert_eq!(err.to_string(), "name: must not be empty");

        std::fs::write(&file, "ports = [1]\n").unwrap();
        let err = load::<Demo>(Some(&file), "settingstest", &[]).unwrap_err();
        assert!(err.to_string().contains("name"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
