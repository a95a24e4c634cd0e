//! The client: connects to an address from inside a namespace (and, unless told otherwise, inside
//! the testbed's cgroup, so lb's program sees its connects), and reports who answered.
//!
//! It runs as its own process (`xtask probe`), because cgroup membership is per process: the test
//! or demo process itself stays outside the cgroup.
//!
//! Modes: TCP with an HTTP GET (the default), a connected UDP socket (`--udp`), an unconnected UDP
//! socket with sendto/recvfrom (`--udp-unconnected`), and the benchmark's echo (`--echo`: TCP
//! connect, one byte each way, close; with `--udp-unconnected`, datagrams echoed on unconnected
//! sockets), and one socket held across exchanges (`--hold`: a line at a time on TCP, or with
//! `--udp` a datagram at a time on a connected UDP socket, reconnecting after an error). Every mode
//! takes IPv4 and IPv6 targets. An IPv4-mapped target (`[::ffff:10.96.0.10]:80`, see
//! [`v4_mapped`]) makes the probe use an AF_INET6 socket towards an IPv4 address, as dual-stack
//! programs do; no flag is needed for that.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

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
    /// Benchmark mode: connect, echo one byte, close; print one [`EchoSummary`] line. With
    /// --udp-unconnected: --count sockets, each sending --messages datagrams to an echo port and
    /// waiting for each one's echo (see [`udp_echo_run`]).
    #[arg(long)]
    pub echo: bool,
    /// Use a connected UDP socket instead of TCP.
    #[arg(long)]
    pub udp: bool,
    /// Hold one socket (see [`hold`]): TCP to a pod's line port, or with --udp a connected UDP
    /// socket; one exchange (an attempt) each --interval-ms, a new socket after any error.
    #[arg(long, conflicts_with_all = ["udp_unconnected", "echo", "peer"])]
    pub hold: bool,
    /// Use an unconnected UDP socket instead of TCP: sendto(target), then recvfrom, recording
    /// where the reply came from. A new socket per --count iteration.
    #[arg(long, conflicts_with = "udp")]
    pub udp_unconnected: bool,
    /// Datagrams per socket with --udp-unconnected, each waiting for its reply (one attempt each).
    #[arg(long, default_value_t = 1)]
    pub messages: u32,
    /// Record getpeername() after connect (TCP and --udp).
    #[arg(long)]
    pub peer: bool,
    /// Number of attempts (sockets, with --udp-unconnected).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
    /// Keep going for this long instead (bounded by --count too).
    #[arg(long)]
    pub duration_ms: Option<u64>,
    /// Pause between attempts (with --udp-unconnected, also between a socket's datagrams).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
}

/// One connect and exchange (with --udp-unconnected: one datagram and its reply).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attempt {
    /// When it started, in microseconds since the Unix epoch.
    pub at_us: u64,
    /// How long connect() took (with --udp-unconnected: the sendto(); with --hold: 0 when the
    /// exchange was on a socket opened before).
    pub connect_us: u64,
    /// The name of the pod that answered.
    pub answer: Option<String>,
    /// The errno name (`ECONNREFUSED`, ...) or what went wrong.
    pub error: Option<String>,
    /// getpeername() after connect, as `SocketAddr` prints it (with --peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Where the reply came from, as recvfrom() reported it (with --udp-unconnected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Which socket made the exchange: 0.. in --count order with --udp-unconnected; with --hold,
    /// 0.. in the order they were opened (each error ends one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<u32>,
}

/// `addr` as an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]:port`): a probe to it uses an AF_INET6
/// socket towards the IPv4 address. IPv6 addresses are returned as they are.
pub fn v4_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::from((v4.ip().to_ipv6_mapped(), v4.port())),
        SocketAddr::V6(_) => addr,
    }
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
    /// Each exchange in nanoseconds: TCP connect, one byte each way, close; with
    /// --udp-unconnected, one sendto + recvfrom (with --messages 1, the socket's whole life).
    pub samples_ns: Vec<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// UDP echoes whose source, as recvfrom() reported it, was not the address the datagram was
    /// sent to (through lb: the ClusterIP, shown by its recvmsg program).
    #[serde(default)]
    pub foreign_sources: u64,
    /// Wall time of the whole run.
    pub elapsed_ns: u64,
}

impl EchoSummary {
    fn failed(&mut self, e: &std::io::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| errno_name(e));
    }
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
    if args.hold {
        return hold(args, deadline, &mut out);
    }
    for index in 0..args.count.min(MAX_COUNT) {
        if Instant::now() >= deadline {
            break;
        }
        let attempts = if args.udp_unconnected {
            udp_unconnected(args, index, deadline)
        } else if args.udp {
            vec![udp(args.target, args.peer)]
        } else {
            vec![tcp(args.target, args.peer)]
        };
        for attempt in attempts {
            writeln!(out, "{}", serde_json::to_string(&attempt)?)?;
        }
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
    let count = args.count.min(MAX_COUNT);
    if args.udp_unconnected {
        return udp_echo_run(&targets, count, args.messages.clamp(1, MAX_COUNT), deadline);
    }
    let started = Instant::now();
    let mut summary = EchoSummary::default();
    for i in 0..count as usize {
        if started.elapsed() >= deadline {
            break;
        }
        let t = Instant::now();
        match echo_once(targets[i % targets.len()]) {
            Ok(()) => summary.samples_ns.push(nanos_since(t)),
            Err(e) => summary.failed(&e),
        }
    }
    summary.elapsed_ns = nanos_since(started);
    summary
}

fn nanos_since(t: Instant) -> u64 {
    t.elapsed().as_nanos() as u64
}

/// `sockets` unconnected UDP sockets, one after the other, each sending `messages` datagrams
/// (an 8-byte sequence number) with sendto() and taking each one's echo with recvfrom() before
/// the next. Datagram k of the run goes to `targets[k % targets.len()]`. The sockets are not
/// bound first: sendto() binds them, as most resolvers and metrics clients let it.
///
/// A sample is one sendto() + recvfrom(). With `messages` = 1 it is the socket's whole life
/// instead: socket(), sendto(), recvfrom(), close(), what a resolver pays per lookup.
fn udp_echo_run(
    targets: &[SocketAddr],
    sockets: u32,
    messages: u32,
    deadline: Duration,
) -> EchoSummary {
    let started = Instant::now();
    let mut summary = EchoSummary::default();
    let mut sent: u64 = 0;
    'sockets: for _ in 0..sockets {
        if started.elapsed() >= deadline {
            break;
        }
        let opened = Instant::now();
        let socket = match socket_for(targets[0], Type::DGRAM, Protocol::UDP).and_then(|s| {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            Ok(UdpSocket::from(s))
        }) {
            Ok(socket) => socket,
            Err(e) => {
                summary.failed(&e);
                continue;
            }
        };
        let mut answered = 0;
        for _ in 0..messages {
            if started.elapsed() >= deadline {
                break 'sockets;
            }
            let target = targets[sent as usize % targets.len()];
            sent += 1;
            let t = Instant::now();
            match udp_echo_once(&socket, target, sent) {
                Ok(from) => {
                    if messages > 1 {
                        summary.samples_ns.push(nanos_since(t));
                    }
                    answered += 1;
                    if (from.ip(), from.port()) != (target.ip(), target.port()) {
                        summary.foreign_sources += 1;
                    }
                }
                Err(e) => summary.failed(&e),
            }
        }
        drop(socket);
        if messages == 1 && answered == 1 {
            summary.samples_ns.push(nanos_since(opened));
        }
    }
    summary.elapsed_ns = nanos_since(started);
    summary
}

/// Sends `seq` to `target` and waits for its echo (skipping late echoes of earlier datagrams);
/// returns where the echo came from.
fn udp_echo_once(socket: &UdpSocket, target: SocketAddr, seq: u64) -> std::io::Result<SocketAddr> {
    let request = seq.to_le_bytes();
    socket.send_to(&request, target)?;
    let mut buf = [0u8; 64];
    // Each recvfrom() is bounded by the read timeout; at most a few late echoes are skipped.
    for _ in 0..8 {
        let (n, from) = socket.recv_from(&mut buf)?;
        if buf[..n] == request {
            return Ok(from);
        }
    }
    Err(std::io::Error::other(
        "only late echoes of earlier datagrams",
    ))
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

/// A socket of `target`'s family; an AF_INET6 one also reaches IPv4-mapped addresses.
fn socket_for(target: SocketAddr, kind: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(target), kind, Some(protocol))?;
    if target.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    Ok(socket)
}

fn peer_of(socket: &Socket) -> String {
    match socket.peer_addr().map(|a| a.as_socket()) {
        Ok(Some(addr)) => addr.to_string(),
        Ok(None) => "not an IP address".to_owned(),
        Err(e) => errno_name(&e),
    }
}

fn tcp(target: SocketAddr, want_peer: bool) -> Attempt {
    let at_us = now_us();
    let started = Instant::now();
    let connected = socket_for(target, Type::STREAM, Protocol::TCP).and_then(|socket| {
        socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
        Ok(socket)
    });
    let connect_us = started.elapsed().as_micros() as u64;
    let peer = match &connected {
        Ok(socket) if want_peer => Some(peer_of(socket)),
        _ => None,
    };
    let result = connected
        .map(TcpStream::from)
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
    Attempt {
        peer,
        ..attempt(at_us, connect_us, result)
    }
}

fn udp(target: SocketAddr, want_peer: bool) -> Attempt {
    let at_us = now_us();
    let started = Instant::now();
    let result = (|| -> Result<(Socket, u64), String> {
        let socket = socket_for(target, Type::DGRAM, Protocol::UDP).map_err(|e| errno_name(&e))?;
        // connect() on UDP is what lb's connect hooks rewrite.
        socket.connect(&target.into()).map_err(|e| errno_name(&e))?;
        Ok((socket, started.elapsed().as_micros() as u64))
    })();
    let (socket, connect_us) = match result {
        Ok(ok) => ok,
        Err(e) => return attempt(at_us, started.elapsed().as_micros() as u64, Err(e)),
    };
    let peer = want_peer.then(|| peer_of(&socket));
    let socket = UdpSocket::from(socket);
    let exchange = || -> std::io::Result<String> {
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.send(b"ping")?;
        let mut buf = [0u8; 1500];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
    };
    Attempt {
        peer,
        ..attempt(at_us, connect_us, exchange().map_err(|e| errno_name(&e)))
    }
}

/// One unconnected socket, bound to the wildcard address of `target`'s family, sending
/// `--messages` datagrams `--interval-ms` apart with sendto() (what lb's sendmsg hooks rewrite)
/// and taking each reply with recvfrom() (whose source address lb's recvmsg hooks rewrite back).
fn udp_unconnected(args: &ProbeArgs, index: u32, deadline: Instant) -> Vec<Attempt> {
    let target = args.target;
    let wildcard = match target {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    let bound = socket_for(target, Type::DGRAM, Protocol::UDP).and_then(|socket| {
        socket.bind(&wildcard.into())?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(UdpSocket::from(socket))
    });
    let mut attempts = Vec::new();
    for message in 0..args.messages.min(MAX_COUNT) {
        if Instant::now() >= deadline {
            break;
        }
        if message > 0 && args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
        let at_us = now_us();
        let started = Instant::now();
        let mut connect_us = 0;
        let mut from = None;
        let result = match &bound {
            Err(e) => Err(errno_name(e)),
            Ok(socket) => (|| -> std::io::Result<String> {
                socket.send_to(b"ping", target)?;
                connect_us = started.elapsed().as_micros() as u64;
                let mut buf = [0u8; 1500];
                let (n, source) = socket.recv_from(&mut buf)?;
                from = Some(source.to_string());
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            })()
            .map_err(|e| errno_name(&e)),
        };
        attempts.push(Attempt {
            from,
            socket: Some(index),
            ..attempt(at_us, connect_us, result)
        });
    }
    attempts
}

/// `--hold`: one socket to the target, an exchange on it every --interval-ms (one attempt each,
/// printed as it ends); after an error the socket is closed and the next exchange opens a new one.
fn hold(args: &ProbeArgs, deadline: Instant, out: &mut impl Write) -> anyhow::Result<()> {
    let mut held: Option<Held> = None;
    let mut socket = 0;
    for _ in 0..args.count.min(MAX_COUNT) {
        if Instant::now() >= deadline {
            break;
        }
        let at_us = now_us();
        let mut connect_us = 0;
        let opened = match held.take() {
            Some(open) => Ok(open),
            None => {
                let started = Instant::now();
                let opened = Held::connect(args.target, args.udp).map_err(|e| errno_name(&e));
                connect_us = started.elapsed().as_micros() as u64;
                opened
            }
        };
        let result = opened.and_then(|mut open| {
            let answer = open.exchange()?;
            held = Some(open);
            Ok(answer)
        });
        let failed = result.is_err();
        let attempt = Attempt {
            socket: Some(socket),
            ..attempt(at_us, connect_us, result)
        };
        writeln!(out, "{}", serde_json::to_string(&attempt)?)?;
        if failed {
            socket += 1;
        }
        if args.interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(args.interval_ms));
        }
    }
    Ok(())
}

/// The socket `--hold` keeps between exchanges.
enum Held {
    Tcp(BufReader<TcpStream>),
    Udp(UdpSocket),
}

impl Held {
    /// A TCP connection to `target`, or with `udp` a UDP socket connected to it (either connect
    /// is what lb's connect hooks rewrite).
    fn connect(target: SocketAddr, udp: bool) -> std::io::Result<Self> {
        if udp {
            let socket = socket_for(target, Type::DGRAM, Protocol::UDP)?;
            socket.connect(&target.into())?;
            socket.set_read_timeout(Some(IO_TIMEOUT))?;
            return Ok(Held::Udp(socket.into()));
        }
        let socket = socket_for(target, Type::STREAM, Protocol::TCP)?;
        socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
        socket.set_read_timeout(Some(IO_TIMEOUT))?;
        socket.set_tcp_nodelay(true)?;
        Ok(Held::Tcp(BufReader::new(socket.into())))
    }

    /// One request and its reply: a line and the line that answers it on TCP, a datagram and
    /// the datagram that answers it on UDP. Errors are errno names, `EOF` when the server closed
    /// the connection, `timeout` when no reply came within [`IO_TIMEOUT`].
    fn exchange(&mut self) -> Result<String, String> {
        let name = |e: std::io::Error| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => "timeout".to_owned(),
            _ => errno_name(&e),
        };
        match self {
            Held::Tcp(stream) => {
                stream.get_mut().write_all(b"ping\n").map_err(name)?;
                let mut line = String::new();
                stream.read_line(&mut line).map_err(name)?;
                // Without its newline, the line was cut short by the end of the stream.
                match line.strip_suffix('\n') {
                    Some(answer) => Ok(answer.to_owned()),
                    None => Err("EOF".to_owned()),
                }
            }
            Held::Udp(socket) => {
                socket.send(b"ping").map_err(name)?;
                let mut buf = [0u8; 1500];
                let n = socket.recv(&mut buf).map_err(name)?;
                Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned())
            }
        }
    }
}

fn attempt(at_us: u64, connect_us: u64, result: Result<String, String>) -> Attempt {
    let (answer, error) = match result {
        Ok(answer) => (Some(answer), None),
        Err(error) => (None, Some(error)),
    };
    Attempt {
        at_us,
        connect_us,
        answer,
        error,
        ..Attempt::default()
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
    if args.hold {
        command.arg("--hold");
    }
    if args.udp_unconnected {
        command
            .arg("--udp-unconnected")
            .args(["--messages", &args.messages.to_string()]);
    }
    if args.peer {
        command.arg("--peer");
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

/// A probe process whose output is read as it comes: its attempts can be looked at while it runs,
/// and a long run's output cannot fill the pipe (the probe would stall on its writes, not
/// connecting, until someone read it).
pub struct Running {
    child: Arc<Mutex<Child>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    /// Set by [`stop`](Self::stop): the probe was killed on purpose.
    stopped: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// The attempts the probe has reported so far, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// Waits for the probe to end; its attempts.
    pub fn finish(self) -> anyhow::Result<Vec<Attempt>> {
        self.reader
            .join()
            .map_err(|_| anyhow::anyhow!("the thread reading a probe's output panicked"))??;
        Ok(std::mem::take(&mut *self.attempts.lock().unwrap()))
    }

    /// Ends the probe now, before its --count or --duration-ms; the attempts it reported.
    pub fn stop(self) -> anyhow::Result<Vec<Attempt>> {
        self.stopped.store(true, Ordering::Relaxed);
        // Does nothing if the probe has ended and been waited for already.
        self.child.lock().unwrap().kill()?;
        self.finish()
    }
}

/// Starts a probe process and reads its output as it comes ([`Running`]).
pub fn start(exe: &Path, args: &ProbeArgs) -> anyhow::Result<Running> {
    let mut child = spawn(exe, args)?;
    let stdout = child.stdout.take().context("the probe's stdout")?;
    let mut stderr = child.stderr.take().context("the probe's stderr")?;
    let child = Arc::new(Mutex::new(child));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let stopped = Arc::new(AtomicBool::new(false));
    let (waited, sink, killed) = (child.clone(), attempts.clone(), stopped.clone());
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        while lines.read_line(&mut line)? > 0 {
            // A line without its newline was cut short by the probe's end: the status says why.
            let Some(json) = line.strip_suffix('\n') else {
                break;
            };
            let attempt =
                serde_json::from_str(json).with_context(|| format!("bad probe line {json:?}"))?;
            sink.lock().unwrap().push(attempt);
            line.clear();
        }
        // Its stdout is closed: the probe has ended (a probe writes little to stderr, so it
        // cannot have stalled on that pipe).
        let status = waited.lock().unwrap().wait()?;
        let stopped = killed.load(Ordering::Relaxed) && status.signal() == Some(libc::SIGKILL);
        if !status.success() && !stopped {
            let mut errors = String::new();
            stderr.read_to_string(&mut errors)?;
            bail!("probe failed ({status}): {}", errors.trim());
        }
        Ok(())
    });
    Ok(Running {
        child,
        attempts,
        stopped,
        reader,
    })
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
