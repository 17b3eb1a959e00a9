//! A real nginx for the deployment tests: the shipped site config (`deploy/nginx/`) with its
//! paths and ports moved into a temporary prefix, checked with `nginx -t` or run in the
//! foreground as one process, killed on drop.
//!
//! Moving is done with [`moved`], which fails the test when a text to move is not in the file,
//! so a change to the shipped config cannot silently leave the test checking something else.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::process::Proc;

/// `text` with each `(from, to)` replaced once; panics naming `what` when a `from` is missing.
pub fn moved(what: &str, text: &str, replacements: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (from, to) in replacements {
        assert!(
            out.contains(from),
            "{what}: {from:?} not found; the test's view of the shipped config is out of date"
        );
        out = out.replacen(from, to, 1);
    }
    out
}

/// The nginx binary (Debian installs it in /usr/sbin, which a non-root PATH may lack).
fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("nginx is not installed (Debian: apt-get install nginx-light; scripts/test.sh does)");
}

/// An nginx prefix directory holding `nginx.conf` (a minimal main config whose `http` block
/// includes `site.conf`) and the files a test writes beside it.
pub struct Nginx {
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl Nginx {
    /// A prefix with `site` as the http-level config.
    pub fn prepare(site: &str) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("rim-nginx-")
            .tempdir()
            .expect("tempdir");
        let p = dir.path().display();
        // Temp paths inside the prefix: the defaults under /var/lib/nginx may not be writable.
        let main = format!(
            "pid {p}/nginx.pid;\n\
             error_log {p}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             access_log off;\n\
             client_body_temp_path {p}/client_body;\n\
             proxy_temp_path {p}/proxy;\n\
             fastcgi_temp_path {p}/fastcgi;\n\
             uwsgi_temp_path {p}/uwsgi;\n\
             scgi_temp_path {p}/scgi;\n\
             include {p}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).expect("nginx.conf");
        std::fs::write(dir.path().join("site.conf"), site).expect("site.conf");
        Nginx { dir, proc: None }
    }

    /// A path inside the prefix.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Writes `file` inside the prefix (an included snippet, certificates).
    pub fn write(&self, file: &str, text: &str) {
        std::fs::write(self.path(file), text).expect("write nginx file");
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(nginx_bin());
        cmd.arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.path("nginx.conf"))
            .args(["-e", "stderr"]);
        cmd
    }

    /// `nginx -t`: `Ok` or what nginx said.
    pub fn check(&self) -> Result<(), String> {
        let out: Output = self.command().arg("-t").output().expect("run nginx -t");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Starts nginx in the foreground as a single process (no workers, no user switch).
    pub fn start(&mut self) {
        let mut cmd = self.command();
        cmd.args(["-g", "daemon off; master_process off;"]);
        self.proc = Some(Proc::start("nginx", cmd, &[]));
    }
}
