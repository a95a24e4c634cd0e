//! lb-agent as a child process: its /readyz and /metrics to wait on, and its log lines for the
//! messages a user reads.

use std::{
    ffi::OsString,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    cleanup::{self, Guard, Undo},
    metrics::Metrics,
};

pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    health: SocketAddr,
    _kill: Guard,
}

impl Agent {
    /// Starts `lb-agent ARGS`, whose `--health-addr` is `health`; `echo` prefixes and prints its
    /// log lines as they come.
    pub fn start(
        bin: &Path,
        args: &[OsString],
        health: SocketAddr,
        echo: Option<&'static str>,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("LB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let kill = cleanup::register(Undo::Kill(child.id()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(prefix) = echo {
                    eprintln!("{prefix}{line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Self {
            child,
            lines,
            health,
            _kill: kill,
        })
    }

    /// Number of lines logged so far: pass it to [`wait_for`](Self::wait_for) to wait for a line
    /// logged after this point.
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle`, logged at or after `mark`.
    pub fn wait_for(
        &mut self,
        needle: &str,
        mark: usize,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .skip(mark)
                .find(|l| l.contains(needle))
            {
                return Ok(line.clone());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "lb-agent exited ({status}) before logging {needle:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "lb-agent did not log {needle:?} within {timeout:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then waits (bounded) for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("lb-agent exited with {status} on SIGTERM");
                }
                return Ok(());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("lb-agent did not stop within 5s of SIGTERM")
    }

    /// Where the agent serves /healthz, /readyz and /metrics.
    pub fn health_addr(&self) -> SocketAddr {
        self.health
    }

    /// One scrape of /metrics.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        scrape(self.health)
    }

    /// Waits for /healthz to answer 200: the agent is up, whether or not it is ready.
    pub fn wait_live(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = self.health;
        self.poll("/healthz to answer 200", timeout, || {
            Ok((http_status(addr, "/healthz")? == 200).then_some(()))
        })
    }

    /// Waits for /readyz to answer 200: the initial sync is done and the maps are programmed.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = self.health;
        self.poll("/readyz to turn 200", timeout, || {
            Ok((http_status(addr, "/readyz")? == 200).then_some(()))
        })
    }

    /// Waits for a sync after the `after`-th (`lb_syncs_total > after`); returns the scrape that
    /// saw it.
    pub fn wait_synced(&mut self, after: u64, timeout: Duration) -> anyhow::Result<Metrics> {
        self.wait_metrics(&format!("sync {}", after + 1), timeout, |m| {
            Ok(m.syncs()? > after)
        })
    }

    /// Scrapes /metrics until `until` holds; returns that scrape.
    pub fn wait_metrics(
        &mut self,
        what: &str,
        timeout: Duration,
        until: impl Fn(&Metrics) -> anyhow::Result<bool>,
    ) -> anyhow::Result<Metrics> {
        let addr = self.health;
        self.poll(what, timeout, || {
            let metrics = scrape(addr)?;
            Ok(until(&metrics)?.then_some(metrics))
        })
    }

    /// Calls `check` every few milliseconds until it returns a value; fails when the agent exits
    /// or `timeout` passes. Errors (the agent not listening yet, say) count as "not yet".
    fn poll<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match check() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => String::new(),
                Err(e) => format!(" (last: {e:#})"),
            };
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "lb-agent exited ({status}) while waiting for {what}:\n{}",
                    self.lines().join("\n")
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {what} within {timeout:?}{last}:\n{}",
                    self.lines().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Runs a one-shot lb-agent command (`list`, `reset`) and returns its stdout.
pub fn command(bin: &Path, args: &[&str], pin_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .arg("--pin-dir")
        .arg(pin_dir)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "lb-agent {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where `cargo build -p lb-agent` put the agent: `LB_AGENT_BIN`, else next to this executable's
/// target directory.
pub fn default_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("LB_AGENT_BIN") {
        return PathBuf::from(bin);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lb-agent")
}

fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        bail!("GET /metrics: {status} {body}");
    }
    Metrics::parse(&body)
}

/// The HTTP status of `GET path` on `addr`.
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(http_get(addr, path)?.0)
}

/// `GET path` on `addr`: the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_request(addr, "GET", path, "", Duration::from_secs(2))
}

/// One HTTP/1.0 request (a JSON `body` unless empty), waiting up to `timeout` for the answer:
/// the status and the body. HTTP/1.0, so that the server ends the body by closing the connection
/// rather than chunking it (Go's does), and reading to the end gives it whole.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(timeout))?;
    let content = if body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{content}\r\n{body}"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
