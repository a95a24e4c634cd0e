//! The client: connects to an address from inside a namespace (and, unless told otherwise, inside
//! the testbed's cgroup, so lb's program sees its connects), and reports who answered.
//!
//! It runs as its own process (`xtask probe`), because cgroup membership is per process: the test
//! or demo process itself stays outside the cgroup.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::netns;

/// Longest a probe may run, whatever it is asked.
const MAX_DURATION: Duration = Duration::from_secs(30);
const MAX_COUNT: u32 = 100_000;
const IO_TIMEOUT: Duration = Duration::from_secs(1);

/// What to probe.
#[derive(Clone, Debug, clap::Args)]
pub struct ProbeArgs {
    /// Namespace to connect from.
    #[arg(long)]
    pub netns: String,
    /// cgroup v2 directory to join first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    #[arg(long)]
    pub target: SocketAddr,
    /// More targets: attempts go round-robin over --target and these.
    #[arg(long, value_delimiter = ',')]
    pub also: Vec<SocketAddr>,
    /// Benchmark mode: connect, echo one byte, close; print one [`EchoSummary`] line.
    #[arg(long)]
    pub echo: bool,
    /// Use a connected UDP socket instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// Number of attempts.
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Keep going for this long instead (bounded by --count too).
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Pause between attempts.
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

/// One connect and exchange.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// When it started, in microseconds since the Unix epoch.
    pub at_us: u64,
    /// How long connect() took.
    pub connect_us: u64,
    /// The name of the pod that answered.
    pub answer: Option<String>,
    /// The errno name (`ECONNREFUSED`, ...) or what went wrong.
    pub error: Option<String>,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// What a benchmark probe (`--echo`) reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EchoSummary {
    /// Each exchange (connect, one byte each way, close), in nanoseconds.
    pub samples_ns: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Wall time of the whole run.
    pub elapsed_ns: u64,
}

/// The probe process: joins the cgroup, enters the namespace, prints one JSON line per attempt
/// (or, with `--echo`, one summary).
pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    if let Some(cgroup) = &args.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
    }
    netns::enter(&args.netns)?;
    if args.echo {
        let summary = echo_run(args);
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let deadline = Instant::now()
        + args
            .duration_ms
            .map(Duration::from_millis)
            .unwrap_or(MAX_DURATION)
            .min(MAX_DURATION);
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for _ in 0..args.count.min(MAX_COUNT) {
        if Instant::now() >= deadline {
            break;
        }
        let attempt = if args.udp {
            udp(args.target)
        } else {
            tcp(args.target)
        };
        writeln!(out, "{}", serde_json::to_string(&attempt)?)?;
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    Ok(())
}

fn echo_run(args: &ProbeArgs) -> EchoSummary {
    let targets: Vec<SocketAddr> = std::iter::once(args.target)
        .chain(args.also.iter().copied())
        .collect();
    let deadline = args
        .duration_ms
        .map(Duration::from_millis)
        .unwrap_or(MAX_DURATION)
        .min(MAX_DURATION);
    let started = Instant::now();
    let mut summary = EchoSummary::default();
    for i in 0..args.count.min(MAX_COUNT) as usize {
        if started.elapsed() >= deadline {
            break;
        }
        let t = Instant::now();
        match echo_once(targets[i % targets.len()]) {
            Ok(()) => summary.samples_ns.push(t.elapsed().as_nanos() as u64),
            Err(e) => {
                summary.errors += 1;
                summary.first_error.get_or_insert_with(|| errno_name(&e));
            }
        }
    }
    summary.elapsed_ns = started.elapsed().as_nanos() as u64;
    summary
}

fn echo_once(target: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"x")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(())
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
        None => e.to_string(),
    }
}

fn tcp(target: SocketAddr) -> Attempt {
    let at_us = now_us();
    let started = Instant::now();
    let connected = TcpStream::connect_timeout(&target, IO_TIMEOUT);
    let connect_us = started.elapsed().as_micros() as u64;
    let result = connected
        .map_err(|e| errno_name(&e))
        .and_then(|mut stream| {
            let exchange = || -> std::io::Result<String> {
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")?;
                let mut response = String::new();
                stream.take(64 * 1024).read_to_string(&mut response)?;
                Ok(response)
            };
            let response = exchange().map_err(|e| errno_name(&e))?;
            match response.split_once("\r\n\r\n") {
                Some((_, body)) => Ok(body.trim().to_owned()),
                None => Err(format!("not an HTTP answer: {response:?}")),
            }
        });
    attempt(at_us, connect_us, result)
}

fn udp(target: SocketAddr) -> Attempt {
    let at_us = now_us();
    let started = Instant::now();
    let result = (|| -> Result<(UdpSocket, u64), String> {
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| errno_name(&e))?;
        // connect() on UDP is what lb's connect4 hook rewrites.
        socket.connect(target).map_err(|e| errno_name(&e))?;
        Ok((socket, started.elapsed().as_micros() as u64))
    })();
    let (socket, connect_us) = match result {
        Ok(ok) => ok,
        Err(e) => return attempt(at_us, started.elapsed().as_micros() as u64, Err(e)),
    };
    let exchange = || -> std::io::Result<String> {
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    attempt(at_us, connect_us, exchange().map_err(|e| errno_name(&e)))
}

fn attempt(at_us: u64, connect_us: u64, result: Result<String, String>) -> Attempt {
    match result {
        Ok(answer) => Attempt {
            at_us,
            connect_us,
            answer: Some(answer),
            error: None,
        },
        Err(error) => Attempt {
            at_us,
            connect_us,
            answer: None,
            error: Some(error),
        },
    }
}

/// Starts a probe process (`exe probe ARGS`) without waiting for it.
pub fn spawn(exe: &Path, args: &ProbeArgs) -> anyhow::Result<Child> {
    let mut command = Command::new(exe);
    command
        .arg("probe")
        .args(["--netns", &args.netns])
        .args(["--target", &args.target.to_string()])
        .args(["--count", &args.count.to_string()])
        .args(["--interval-ms", &args.interval_ms.to_string()]);
    if let Some(cgroup) = &args.cgroup {
        command.arg("--cgroup").arg(cgroup);
    }
    if let Some(ms) = args.duration_ms {
        command.args(["--duration-ms", &ms.to_string()]);
    }
    if args.udp {
        command.arg("--udp");
    }
    if args.echo {
        command.arg("--echo");
    }
    if !args.also.is_empty() {
        let also: Vec<String> = args.also.iter().map(ToString::to_string).collect();
        command.args(["--also", &also.join(",")]);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the probe {}", exe.display()))
}

/// Waits for a benchmark probe (`--echo`) and parses its summary.
pub fn collect_echo(child: Child) -> anyhow::Result<EchoSummary> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("bad probe summary")
}

/// Waits for a probe process and parses its attempts.
pub fn collect(child: Child) -> anyhow::Result<Vec<Attempt>> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "probe failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad probe line {l:?}")))
        .collect()
}
