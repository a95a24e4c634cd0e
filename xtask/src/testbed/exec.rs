//! Real programs as clients (`xtask exec`): join a cgroup, enter a namespace, see the testbed's
//! resolv.conf instead of the host's, then become the program. Used for glibc's and musl's
//! resolvers, busybox wget, dig, and for the DNS pod's dnsmasq.
//!
//! The files are bind-mounted in a private mount namespace of the new process only; the host's
//! /etc is never written.

use std::{
    ffi::OsString,
    fmt::Write as _,
    io::Read as _,
    net::IpAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};

use super::netns;

/// What `xtask exec` runs, and where.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecArgs {
    /// Namespace to run in.
    #[arg(long)]
    pub netns: String,
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// A file to see as /etc/resolv.conf (shorthand for --bind FILE:/etc/resolv.conf).
    #[arg(long)]
    pub resolv_conf: Option<PathBuf>,
    /// SRC:DST: see file SRC at DST (bind mount in a private mount namespace).
    #[arg(long = "bind", value_parser = parse_bind)]
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

fn parse_bind(text: &str) -> Result<(PathBuf, PathBuf), String> {
    let (src, dst) = text
        .split_once(':')
        .ok_or_else(|| format!("--bind {text:?}: expected SRC:DST"))?;
    Ok((src.into(), dst.into()))
}

/// The `xtask exec` process: sets itself up and execs the command. Never returns: on any error
/// it exits with 127, as a shell does for a command it cannot run.
pub fn run(args: &ExecArgs) -> ! {
    let error = match prepare(args) {
        Ok(()) => {
            let error = Command::new(&args.command[0])
                .args(&args.command[1..])
                .exec();
            anyhow::Error::new(error).context(format!("executing {:?}", args.command[0]))
        }
        Err(e) => e,
    };
    eprintln!("xtask exec: {error:#}");
    std::process::exit(127)
}

fn prepare(args: &ExecArgs) -> anyhow::Result<()> {
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    // This process has one thread here, so the namespace holds for the program it becomes.
    netns::enter(&args.netns)?;
    let mut binds = args.binds.clone();
    if let Some(resolv) = &args.resolv_conf {
        binds.push((resolv.clone(), "/etc/resolv.conf".into()));
    }
    if binds.is_empty() {
        return Ok(());
    }
    unshare(CloneFlags::CLONE_NEWNS).context("unsharing the mount namespace")?;
    // Slave first, so the bind mounts below never propagate back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("making / a slave mount")?;
    for (src, dst) in &binds {
        mount(
            Some(src.as_path()),
            dst.as_path(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} over {}", src.display(), dst.display()))?;
    }
    // A running nscd would answer glibc's lookups from the host's namespace: hide its socket.
    for nscd in ["/run/nscd", "/var/run/nscd"] {
        if Path::new(nscd).is_dir() {
            mount(
                Some("tmpfs"),
                nscd,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .with_context(|| format!("hiding {nscd}"))?;
        }
    }
    Ok(())
}

/// A resolv.conf for the client, as kubelet writes one into a pod.
#[derive(Clone, Debug)]
pub struct Resolv {
    /// In order (IPv4 and IPv6 may be mixed).
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl Resolv {
    /// A pod's view in Kubernetes namespace `namespace`: search
    /// `{namespace}.svc.cluster.local svc.cluster.local cluster.local`, `ndots:5`, and short
    /// timeouts (`timeout:1 attempts:2`) so a failing lookup fails within seconds.
    pub fn pod(namespace: &str, nameservers: &[IpAddr]) -> Self {
        Self {
            nameservers: nameservers.to_vec(),
            search: vec![
                format!("{namespace}.svc.cluster.local"),
                "svc.cluster.local".into(),
                "cluster.local".into(),
            ],
            options: vec!["ndots:5".into(), "timeout:1".into(), "attempts:2".into()],
        }
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for ns in &self.nameservers {
            let _ = writeln!(text, "nameserver {ns}");
        }
        if !self.search.is_empty() {
            let _ = writeln!(text, "search {}", self.search.join(" "));
        }
        if !self.options.is_empty() {
            let _ = writeln!(text, "options {}", self.options.join(" "));
        }
        text
    }
}

/// Waits for `child` (stdout and stderr piped) at most `timeout`; kills it on expiry.
pub fn wait_with_timeout(
    mut child: Child,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                // Bounded: a client that floods its output is cut off, not buffered forever.
                let _ = pipe.by_ref().take(16 << 20).read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {timeout:?} and was killed; stdout: {:?}, stderr: {:?}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// `exe exec --netns NS [--cgroup CG] [--bind SRC:DST]... -- CMD ARGS`, not yet started, with
/// stdin closed and stdout/stderr piped.
pub fn command(
    exe: &Path,
    netns: &str,
    cgroup: Option<&Path>,
    binds: &[(PathBuf, PathBuf)],
    cmd: &str,
    args: &[&str],
) -> Command {
    let mut command = Command::new(exe);
    command.arg("exec").args(["--netns", netns]);
    if let Some(cgroup) = cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    for (src, dst) in binds {
        let mut bind = OsString::from(src);
        bind.push(":");
        bind.push(dst);
        command.arg("--bind").arg(bind);
    }
    command
        .arg("--")
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}
