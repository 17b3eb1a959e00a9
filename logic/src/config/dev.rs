//! The local-dev conveniences: [`Config::dev`] (what tests and tools on loopback start from)
//! and the warnings logic logs at start for each door a config leaves open.

use super::{AuthMode, Config};

impl Config {
    /// The defaults with the local-dev conveniences `config/logic.toml` turns on: trust mode,
    /// open online routes and the demo (each warned about at start), and the history of `chat`
    /// rooms the demo shows. For tests and tools on loopback; never what a config file that
    /// leaves these out gets.
    pub fn dev() -> Config {
        let mut c = Config::default();
        c.auth.mode = AuthMode::Trust;
        c.push.open_online = true;
        c.demo.enabled = true;
        c.history
            .rooms
            .insert("chat".into(), super::Retention::default());
        c
    }

    /// The dev conveniences this config turns on, each as the warning logged at start: an
    /// operator must see that a door is open, and which.
    pub fn dev_conveniences(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.auth.mode == AuthMode::Trust {
            out.push(
                "auth.mode is \"trust\": the mid a client claims is believed (goim \
                 compatibility; dev only)"
                    .to_string(),
            );
        }
        if self.push.secret.is_empty() {
            let admin = if self.admin.secret.is_empty() {
                ", and so is the operator data (/admin/state; admin.secret is empty too)"
            } else {
                ""
            };
            out.push(format!(
                "push.secret is empty: push, online and session routes are open to anyone who \
                 reaches listen.http ({}){admin}",
                self.listen.http
            ));
        } else if self.push.open_online {
            out.push(
                "push.open_online is true: online, node and room member routes answer without \
                 push.secret"
                    .to_string(),
            );
        }
        if self.demo.enabled {
            out.push(format!(
                "demo.enabled is true: anyone who reaches listen.http ({}) can sign in as a new \
                 user{}",
                self.listen.http,
                if self.auth.secret.is_empty() {
                    ""
                } else {
                    " and get a valid client token"
                }
            ));
        }
        out
    }
}
