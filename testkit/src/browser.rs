//! What the real-browser tests (`tests/browser.rs`, `tests/goim_client.rs`) need: Debian's
//! Chromium, node, and playwright-core in `testkit/browser/node_modules` (`scripts/test.sh`
//! installs all three). `RIM_SKIP_BROWSER=1` skips those tests.

use std::path::{Path, PathBuf};

/// Where Chromium is looked for unless `CHROMIUM` names another binary.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// `testkit/browser`: the node scripts and their `node_modules`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// `Some(reason)` when a browser test cannot run on this machine.
pub fn missing_prerequisite() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_string());
    if !Path::new(&chromium).exists() {
        return Some(format!("{chromium} is missing"));
    }
    let playwright = dir().join("node_modules/playwright-core");
    if !playwright.is_dir() {
        return Some(format!("{} is missing (npm ci)", playwright.display()));
    }
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("node is missing".into()),
    }
}

/// Whether the browser test `what` runs: `false` (saying so) with `RIM_SKIP_BROWSER=1`; panics
/// naming the missing piece when the machine lacks one, so a suite that should run it cannot
/// pass without it.
#[allow(clippy::print_stdout)] // the skip notice goes to the calling test's captured output
pub fn required(what: &str) -> bool {
    if std::env::var("RIM_SKIP_BROWSER").as_deref() == Ok("1") {
        println!("RIM_SKIP_BROWSER=1: skipping {what}");
        return false;
    }
    if let Some(why) = missing_prerequisite() {
        panic!(
            "{what} needs Chromium, node and playwright-core: {why}. \
             Run scripts/test.sh (it installs them), or set RIM_SKIP_BROWSER=1 to skip this test."
        );
    }
    true
}

/// Runs `node <script> <args>` in [`dir`] and returns whether it succeeded and what it printed
/// (stdout, then stderr), which it also prints into the calling test's output. The scripts stop
/// themselves on their own time limit; `within` only guards against node itself hanging.
pub async fn run_script(
    script: &str,
    args: &[&std::ffi::OsStr],
    within: std::time::Duration,
) -> (bool, String) {
    let child = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(dir())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start node {script}: {e}"));
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not exit within {within:?}"))
        .unwrap_or_else(|e| panic!("wait for {script}: {e}"));
    let printed = format!(
        "--- {script} stdout\n{}--- {script} stderr\n{}---",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    #[allow(clippy::print_stdout)] // into the calling test's captured output
    {
        println!("{printed}");
    }
    (out.status.success(), printed)
}

/// Where a test's screenshot goes: `docs/<name>` with `RIM_UPDATE_SCREENSHOT=1` (the one the
/// docs show), else `target/<name>`, so a test run leaves the tree clean.
pub fn screenshot_path(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if std::env::var_os("RIM_UPDATE_SCREENSHOT").is_some() {
        root.join("docs").join(name)
    } else {
        root.join("target").join(name)
    }
}
