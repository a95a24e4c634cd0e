//! A "pod": threads inside a namespace that answer as the pod's name, over HTTP on TCP, line by
//! line on a TCP connection the client keeps open, and as a datagram on UDP; and echo ports for
//! the benchmarks (TCP and UDP). Every socket is bound to `[::]` with IPV6_V6ONLY off, so one
//! socket serves the pod's IPv4 and IPv6 addresses alike.

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket as RawSocket, Type};

use super::netns;

/// How long a server waits in one poll before checking whether to stop.
const POLL: Duration = Duration::from_millis(50);

pub struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    /// Starts listening on every port (all IPv4 and IPv6 addresses of `netns`); returns once all
    /// are bound. `tcp_ports` answer HTTP with `name`, `line_ports` answer each line with `name`
    /// and a newline on the same connection until the client closes it, `udp_ports` answer each
    /// datagram with `name` (sent back to whoever sent it), `echo_ports` echo every byte back on
    /// TCP and every datagram back on UDP (the same port number for both).
    pub fn start(
        netns: &str,
        name: &str,
        tcp_ports: &[u16],
        line_ports: &[u16],
        udp_ports: &[u16],
        echo_ports: &[u16],
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let ports = tcp_ports
            .iter()
            .map(|&p| (p, Kind::Http))
            .chain(line_ports.iter().map(|&p| (p, Kind::Lines)))
            .chain(udp_ports.iter().map(|&p| (p, Kind::Udp)))
            .chain(echo_ports.iter().map(|&p| (p, Kind::Echo)))
            .chain(echo_ports.iter().map(|&p| (p, Kind::UdpEcho)));
        for (port, kind) in ports {
            let (netns, name, stop, ready) = (
                netns.to_owned(),
                name.to_owned(),
                stop.clone(),
                ready_tx.clone(),
            );
            threads.push(thread::spawn(move || {
                let bound = netns::enter(&netns).and_then(|()| match kind {
                    Kind::Http | Kind::Lines | Kind::Echo => {
                        Ok(Socket::Tcp(dual_stack_listener(port)?))
                    }
                    Kind::Udp | Kind::UdpEcho => {
                        let socket = dual_stack_udp(port)?;
                        socket.set_read_timeout(Some(POLL))?;
                        Ok(Socket::Udp(socket))
                    }
                });
                let socket = match bound {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.context(format!("{name}: binding port {port}"))));
                        return;
                    }
                };
                match socket {
                    Socket::Tcp(listener) => match kind {
                        Kind::Lines => serve_lines(&listener, &stop, &name),
                        Kind::Echo => serve_tcp(&listener, &stop, echo),
                        _ => serve_tcp(&listener, &stop, |stream| answer_http(stream, &name)),
                    },
                    Socket::Udp(socket) => {
                        let answer = match kind {
                            Kind::UdpEcho => None,
                            _ => Some(name.as_bytes()),
                        };
                        serve_udp(&socket, &stop, answer)
                    }
                }
            }));
        }
        drop(ready_tx);
        let expected = threads.len();
        let server = Self { stop, threads };
        for _ in 0..expected {
            ready_rx
                .recv()
                .context("a server thread died before binding")??;
        }
        Ok(server)
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    /// A line answered per line, on connections that stay open.
    Lines,
    Udp,
    /// TCP echo.
    Echo,
    UdpEcho,
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A socket bound to `[::]:port` that also takes IPv4 (as `::ffff:a.b.c.d`), whatever the
/// namespace's `net.ipv6.bindv6only` says.
fn dual_stack(kind: Type, protocol: Protocol, port: u16) -> std::io::Result<RawSocket> {
    let socket = RawSocket::new(Domain::IPV6, kind, Some(protocol))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(socket)
}

fn dual_stack_listener(port: u16) -> std::io::Result<TcpListener> {
    let socket = dual_stack(Type::STREAM, Protocol::TCP, port)?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn dual_stack_udp(port: u16) -> std::io::Result<UdpSocket> {
    Ok(dual_stack(Type::DGRAM, Protocol::UDP, port)?.into())
}

fn serve_tcp(
    listener: &TcpListener,
    stop: &AtomicBool,
    handle: impl Fn(TcpStream) -> anyhow::Result<()>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !readable(listener.as_raw_fd(), POLL) {
            continue;
        }
        if let Ok((stream, _)) = listener.accept() {
            let _ = handle(stream);
        }
    }
}

/// Like [`serve_tcp`], but each connection gets a thread of its own, since it stays open for as
/// long as its client wants: one held connection must not keep the next from being answered.
/// Returns once every connection has ended too.
fn serve_lines(listener: &TcpListener, stop: &AtomicBool, name: &str) {
    thread::scope(|connections| {
        while !stop.load(Ordering::Relaxed) {
            if !readable(listener.as_raw_fd(), POLL) {
                continue;
            }
            if let Ok((stream, _)) = listener.accept() {
                connections.spawn(move || answer_lines(stream, stop, name));
            }
        }
    });
}

/// Answers each newline-terminated line with `name` and a newline, until the client closes the
/// connection, it fails (a reset), or the server stops.
fn answer_lines(stream: TcpStream, stop: &AtomicBool, name: &str) -> anyhow::Result<()> {
    // Short reads, so that a connection the client keeps idle still sees the server stop.
    stream.set_read_timeout(Some(POLL))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let answer = format!("{name}\n");
    // A line may arrive over several reads: read_until keeps what it got across a timeout.
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_until(b'\n', &mut line) {
            Ok(_) if line.ends_with(b"\n") => {
                writer.write_all(answer.as_bytes())?;
                line.clear();
            }
            // End of stream (after a last line without its newline, maybe): the client closed.
            Ok(_) => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes back every byte until the client closes (bounded in time per read).
fn echo(mut stream: TcpStream) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.set_nodelay(true)?;
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => stream.write_all(&buf[..n])?,
        }
    }
}

/// Reads the request head (bounded in size and time), then answers with the pod's name.
fn answer_http(mut stream: TcpStream, name: &str) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while request.len() < 8192 && !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let body = format!("{name}\n");
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .context("writing the answer")?;
    Ok(())
}

/// Answers each datagram with `answer`, or with the datagram itself when there is none (echo),
/// sent back to whoever sent it.
fn serve_udp(socket: &UdpSocket, stop: &AtomicBool, answer: Option<&[u8]>) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(answer.unwrap_or(&buf[..n]), peer);
        }
    }
}

fn readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) > 0 }
}
