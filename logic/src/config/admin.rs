//! `[admin]`: who may read the operator page's data (`/admin/state`).

use rim_runtime::settings::SettingsError;
use serde::Deserialize;

/// Shortest admin secret accepted (the same floor as the cluster secret).
const MIN_SECRET_BYTES: usize = 16;

/// The operator page (`GET /admin`) and its data (`GET /admin/state`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token `/admin/state` requires. Empty = `push.secret` (whoever may push may watch);
    /// with both empty (loopback only, dev) the data is open, as the push routes are. Set it to
    /// give operators access without giving them the power to push. Never logged.
    pub secret: String,
}

impl AdminConfig {
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        if !self.secret.is_empty() && self.secret.len() < MIN_SECRET_BYTES {
            return Err(SettingsError::invalid(
                "admin.secret",
                format!("must be at least {MIN_SECRET_BYTES} bytes when set"),
            ));
        }
        Ok(())
    }
}
