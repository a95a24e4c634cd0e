//! lb-agent binaries other than the one under test, for the upgrade and rollback tests: the agent
//! of an earlier commit of this repository, and the working tree's agent built with cargo
//! features. Each is built once into a target directory of its own under `target/` (so it never
//! replaces the agent under test) and reused while its sources are unchanged.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The agent as it was at `commit` (a full or abbreviated hash: commits travel with a clone,
/// branches and tags may not), built from a copy of that commit's tree.
pub fn agent_at_commit(commit: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let full = git(
        &root,
        &["rev-parse", "--verify", &format!("{commit}^{{commit}}")],
    )
    .with_context(|| {
        format!(
            "commit {commit} is not in this repository's history (a shallow clone? fetch \
                 the full history: `git fetch --unshallow`)"
        )
    })?;
    let dir = root.join("target/agents").join(&full[..12]);
    let tree = dir.join("tree");
    if !tree.join("Cargo.toml").exists() {
        eprintln!(
            "==> extracting commit {} into {}",
            &full[..12],
            tree.display()
        );
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(&tree)?;
        let archive = Command::new("git")
            .args(["archive", "--format=tar", &full])
            .current_dir(&root)
            .stdout(Stdio::piped())
            .spawn()
            .context("running git archive")?;
        let status = Command::new("tar")
            .args(["-x", "-C"])
            .arg(&tree)
            .stdin(archive.stdout.context("git archive's output")?)
            .status()
            .context("running tar")?;
        ensure!(status.success(), "extracting commit {full} failed");
    }
    build(
        &tree,
        &dir.join("target"),
        &[],
        &format!("lb-agent at commit {}", &full[..12]),
    )
}

/// The working tree's agent with `features` (of lb-agent).
pub fn agent_with_features(features: &[&str]) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let name = features.join("-");
    build(
        &root,
        &root.join("target/agents").join(&name),
        features,
        &format!("lb-agent with --features {}", features.join(",")),
    )
}

/// `cargo build -p lb-agent` in `workspace` into `target_dir`; the binary.
fn build(
    workspace: &Path,
    target_dir: &Path,
    features: &[&str],
    what: &str,
) -> anyhow::Result<PathBuf> {
    eprintln!("==> building {what} (the first time: a few minutes)");
    let mut command = cargo();
    command
        .args(["build", "--quiet", "--package", "lb-agent", "--target-dir"])
        .arg(target_dir)
        .current_dir(workspace);
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    let status = command.status().context("running cargo")?;
    if !status.success() {
        bail!("building {what} failed (see above)");
    }
    Ok(target_dir.join("debug/lb-agent"))
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running git")?;
    ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}
