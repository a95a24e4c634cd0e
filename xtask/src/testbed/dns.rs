//! A DNS pod: dnsmasq from Debian, in the foreground in its own pod namespace, answering the
//! names it is given (A and AAAA) on UDP and TCP port 53 of the pod's addresses, and nothing else:
//! it reads no system file and forwards no query.
//!
//! It runs through `xtask exec` in a cgroup of its own (`{id}-dns`), so that dnsmasq and the
//! children it forks for TCP queries are all killed when the cgroup is removed, on every exit
//! path (see [`super::cleanup`]).

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    cleanup::{self, Guard, Undo},
    exec, netns,
};

/// DNS's port.
pub const PORT: u16 = 53;
/// How long dnsmasq may take to answer its first query.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running dnsmasq.
pub struct DnsServer {
    child: Child,
    kill: Option<Guard>,
    log: PathBuf,
}

/// Where dnsmasq lives: its namespace, cgroup, addresses, and a directory for its files.
pub struct DnsPlace<'a> {
    pub netns: &'a str,
    pub cgroup: &'a Path,
    pub addrs: &'a [IpAddr],
    pub dir: &'a Path,
    /// The namespace to check readiness from (the client's, so the whole path is checked).
    pub check_from: &'a str,
}

impl DnsServer {
    /// Starts dnsmasq (via `exe exec`) serving `records` and waits until it answers on every one
    /// of `place.addrs`.
    pub fn start(
        exe: &Path,
        name: &str,
        place: &DnsPlace,
        records: &[(&str, IpAddr)],
    ) -> anyhow::Result<Self> {
        let dnsmasq = super::find_tool("dnsmasq").context(
            "dnsmasq not found: run `xtask/run setup`, which installs it (Debian package dnsmasq-base)",
        )?;
        let file = |suffix: &str| place.dir.join(format!("{name}.{suffix}"));
        let hosts = file("hosts");
        let mut text = String::new();
        for (host, ip) in records {
            let _ = writeln!(text, "{ip} {host}");
        }
        std::fs::write(&hosts, text).with_context(|| format!("writing {}", hosts.display()))?;
        let log = file("log");
        let mut args = vec![
            "--keep-in-foreground".to_owned(),
            // No /etc/dnsmasq.conf, /etc/hosts or /etc/resolv.conf: only the records given.
            "--conf-file=/dev/null".to_owned(),
            "--no-hosts".to_owned(),
            "--no-resolv".to_owned(),
            format!("--addn-hosts={}", hosts.display()),
            // Answer cluster.local from the records alone (NXDOMAIN otherwise); with no
            // upstream server configured, nothing is ever forwarded.
            "--local=/cluster.local/".to_owned(),
            // Only the pod's own addresses, not its loopback or link-local ones.
            "--bind-interfaces".to_owned(),
            format!("--port={PORT}"),
            "--user=root".to_owned(),
            format!("--pid-file={}", file("pid").display()),
            format!("--dhcp-leasefile={}", file("leases").display()),
            "--log-queries".to_owned(),
            format!("--log-facility={}", log.display()),
        ];
        args.extend(place.addrs.iter().map(|a| format!("--listen-address={a}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut command = exec::command(
            exe,
            place.netns,
            Some(place.cgroup),
            &[],
            &dnsmasq.to_string_lossy(),
            &args,
        );
        // Startup errors go to stderr, before dnsmasq switches to its log file.
        let stderr = std::fs::File::create(file("stderr"))?;
        command.stdout(Stdio::null()).stderr(stderr);
        let child = command
            .spawn()
            .with_context(|| format!("starting dnsmasq via {}", exe.display()))?;
        let mut server = Self {
            kill: Some(cleanup::register(Undo::Kill(child.id()))),
            child,
            log,
        };
        server
            .wait_ready(place)
            .with_context(|| format!("DNS pod {name}"))?;
        Ok(server)
    }

    /// dnsmasq's log: every query and its answer.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn wait_ready(&mut self, place: &DnsPlace) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for &addr in place.addrs {
            let server = SocketAddr::from((addr, PORT));
            loop {
                if let Some(status) = self.child.try_wait()? {
                    let stderr = std::fs::read_to_string(self.log.with_extension("stderr"))
                        .unwrap_or_default();
                    bail!("dnsmasq exited ({status}): {}", stderr.trim());
                }
                let from = place.check_from.to_owned();
                let answered = thread::spawn(move || {
                    netns::enter(&from)?;
                    answers(server, Duration::from_millis(200))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the readiness check panicked"))?;
                match answered {
                    Ok(true) => break,
                    Ok(false) | Err(_) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(50))
                    }
                    other => bail!(
                        "dnsmasq did not answer at {server} within {READY_TIMEOUT:?} ({other:?}); see {}",
                        self.log.display()
                    ),
                }
            }
        }
        Ok(())
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // SIGKILL through the guard while the pid is still our unreaped child, then reap it.
        drop(self.kill.take());
        let _ = self.child.wait();
    }
}

/// Whether a DNS server answers a query (any answer, NXDOMAIN included) at `server`.
fn answers(server: SocketAddr, timeout: Duration) -> anyhow::Result<bool> {
    let socket = UdpSocket::bind(match server {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    })?;
    socket.set_read_timeout(Some(timeout))?;
    let id = (std::process::id() as u16).to_be_bytes();
    // Header: id, RD, one question; then `ready.cluster.local` IN A.
    let mut query = vec![id[0], id[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["ready", "cluster", "local"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send_to(&query, server)?;
    let mut buf = [0u8; 512];
    match socket.recv_from(&mut buf) {
        // Our id, and the QR bit that marks a response.
        Ok((n, _)) => Ok(n >= 12 && buf[..2] == id && buf[2] & 0x80 != 0),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}
