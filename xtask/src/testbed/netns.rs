//! Network namespaces made with iproute2, entered per thread with setns(2).

use std::{fs::File, process::Command};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

use super::cleanup::{self, Guard, Undo};

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); `xtask/run setup` installs it")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
    _guard: Guard,
}

impl Netns {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
            _guard: cleanup::register(Undo::Netns(name.to_owned())),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }
}

/// Moves the calling thread into namespace `name` (other threads stay where they are).
pub fn enter(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    setns(file, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering netns {name}"))?;
    Ok(())
}
