//! lb-agent as a child process, with its log lines kept for waiting on.

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

use super::cleanup::{self, Guard, Undo};

/// The line the agent logs after each sync of the maps with the manifests.
pub const SYNCED: &str = "dataplane synced";

pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _kill: Guard,
}

impl Agent {
    /// Starts `lb-agent ARGS`; `echo` prefixes and prints its log lines as they come.
    pub fn start(
        bin: &Path,
        args: &[OsString],
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

    /// Where the agent serves /healthz and /readyz (from its log).
    pub fn health_addr(&mut self) -> anyhow::Result<SocketAddr> {
        let line = self.wait_for("serving /healthz and /readyz", 0, Duration::from_secs(10))?;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .with_context(|| format!("no addr= in {line:?}"))?;
        addr.parse()
            .with_context(|| format!("bad address in {line:?}"))
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

/// The HTTP status of `GET path` on `addr`.
pub fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))
}
