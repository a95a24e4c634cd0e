//! Client programs the testbed builds for itself (sources in xtask/clients/), run with
//! [`Testbed::client_command`](super::Testbed::client_command).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, bail};

/// Builds (when missing or older than its source) and returns the static musl client
/// `musl_resolve [-4|-6] NAME [--http PORT]`: resolves NAME with musl's getaddrinfo, prints one
/// address per line, and with `--http` prints the body of `GET /` from the first address.
/// Exit status 2 means the name did not resolve, 3 that the HTTP exchange failed.
pub fn musl_resolve() -> anyhow::Result<PathBuf> {
    build_static_c("musl_resolve")
}

fn build_static_c(name: &str) -> anyhow::Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(format!("{name}.c"));
    let out_dir = target_dir().join("clients");
    let binary = out_dir.join(name);
    let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let source_time = modified(&source)
        .with_context(|| format!("{} is missing from the checkout", source.display()))?;
    if modified(&binary).is_some_and(|built: SystemTime| built >= source_time) {
        return Ok(binary);
    }
    let musl_gcc = super::find_tool("musl-gcc").context(
        "musl-gcc not found: run `xtask/run setup`, which installs it (Debian package musl-tools)",
    )?;
    std::fs::create_dir_all(&out_dir)?;
    // Build beside the binary and rename: concurrent tests never see half a file.
    let partial = out_dir.join(format!(".{name}.{}", std::process::id()));
    let out = Command::new(&musl_gcc)
        .args(["-static", "-O2", "-Wall", "-Wextra", "-o"])
        .arg(&partial)
        .arg(&source)
        .output()
        .with_context(|| format!("running {}", musl_gcc.display()))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!(
            "building {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&partial, &binary)?;
    Ok(binary)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else the workspace's `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}
