//! The datapath: the same request/response exchange through lb and straight to the pods, for TCP
//! and UDP over IPv4 and IPv6, and through kube-proxy's iptables shape for TCP over IPv4.
//!
//! Suites (what one sample is):
//! - TCP ([`Suite::Tcp4`], [`Suite::Tcp6`]): connect + 1-byte echo + close on a new socket.
//! - UDP ([`Suite::Udp4`], [`Suite::Udp6`]): one sendto() + recvfrom() of an 8-byte datagram on a
//!   long-lived unconnected socket (one socket per probe run, all its datagrams in a row). This is
//!   what lb adds per datagram, the work of its sendmsg and recvmsg programs, and what a client
//!   that keeps its socket (metrics, a resolver with a socket per process) pays.
//! - UDP, fresh socket ([`Suite::Udp4Fresh`], [`Suite::Udp6Fresh`]): socket() + sendto() +
//!   recvfrom() + close() per sample, as a resolver that opens a socket per lookup pays; here lb
//!   also picks a backend and writes its two per-socket map entries each time.
//!
//! Configurations (who sends where), per suite:
//! - a: direct to the pods, from outside lb's cgroup: the floor;
//! - a': the same from an empty cgroup of its own (TCP over IPv4 only): cgroup placement alone;
//! - b: the ClusterIP, through lb;
//! - c: direct to the pods from inside lb's cgroup: what lb costs bystanders;
//! - d: the ClusterIP through kube-proxy-shaped iptables rules, in a client namespace of its own
//!   (TCP over IPv4 only);
//! - e: direct to the pods from that namespace, with the rules loaded (TCP over IPv4 only).
//!
//! Where the direct configurations send: lb picks a backend per connect and per unconnected
//! socket, and keeps a socket's backend for all its datagrams. So the direct TCP and fresh-socket
//! UDP runs go round-robin over the pods, a sample each; a direct long-lived UDP socket sends all
//! its datagrams to one pod, the next pod each round.
//!
//! Method: each round runs every (suite, configuration) once, as one probe process of
//! `samples_per_round` samples, in the order [`round_order`] gives (each takes its turn at going
//! first; the rest shuffled); round 0 only warms up (ARP/ND, caches, the pods' sockets). A
//! configuration's ratio is the median over rounds of its p50 over its suite's floor p50 in the
//! same round: paired, so drift between rounds cancels.

use std::{collections::BTreeMap, net::SocketAddr, path::Path};

use anyhow::{bail, ensure};
use serde::Serialize;
use xtask::testbed::{
    Testbed,
    probe::{self, EchoSummary, ProbeArgs},
};

use super::{
    median, percentile, round_order,
    workload::{BACKENDS, ECHO_PORT, Family, SERVICE_PORT},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Suite {
    #[serde(rename = "tcp4")]
    Tcp4,
    #[serde(rename = "tcp6")]
    Tcp6,
    #[serde(rename = "udp4")]
    Udp4,
    #[serde(rename = "udp6")]
    Udp6,
    #[serde(rename = "udp4_fresh_socket")]
    Udp4Fresh,
    #[serde(rename = "udp6_fresh_socket")]
    Udp6Fresh,
}

/// What one sample of a suite is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Tcp,
    UdpLongLived,
    UdpFreshSocket,
}

impl Suite {
    pub const ALL: [Suite; 6] = [
        Suite::Tcp4,
        Suite::Tcp6,
        Suite::Udp4,
        Suite::Udp6,
        Suite::Udp4Fresh,
        Suite::Udp6Fresh,
    ];

    fn family(self) -> Family {
        match self {
            Suite::Tcp4 | Suite::Udp4 | Suite::Udp4Fresh => Family::V4,
            Suite::Tcp6 | Suite::Udp6 | Suite::Udp6Fresh => Family::V6,
        }
    }

    fn exchange(self) -> Exchange {
        match self {
            Suite::Tcp4 | Suite::Tcp6 => Exchange::Tcp,
            Suite::Udp4 | Suite::Udp6 => Exchange::UdpLongLived,
            Suite::Udp4Fresh | Suite::Udp6Fresh => Exchange::UdpFreshSocket,
        }
    }

    pub fn configs(self) -> &'static [Config] {
        match self {
            Suite::Tcp4 => &Config::ALL,
            Suite::Tcp6 | Suite::Udp4 | Suite::Udp6 => {
                &[Config::Direct, Config::Lb, Config::Bystander]
            }
            Suite::Udp4Fresh | Suite::Udp6Fresh => &[Config::Direct, Config::Lb],
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Suite::Tcp4 => "TCP, IPv4: connect + 1-byte echo + close",
            Suite::Tcp6 => "TCP, IPv6: connect + 1-byte echo + close",
            Suite::Udp4 => {
                "UDP, IPv4: sendto + recvfrom of 8 bytes, one long-lived unconnected socket"
            }
            Suite::Udp6 => {
                "UDP, IPv6: sendto + recvfrom of 8 bytes, one long-lived unconnected socket"
            }
            Suite::Udp4Fresh => {
                "UDP, IPv4: socket + sendto + recvfrom + close (a socket per exchange)"
            }
            Suite::Udp6Fresh => {
                "UDP, IPv6: socket + sendto + recvfrom + close (a socket per exchange)"
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Config {
    /// a: direct, no load balancer
    Direct,
    /// a': direct, from a cgroup of its own with no program (cgroup placement alone)
    DirectInCgroup,
    /// b: ClusterIP through lb
    Lb,
    /// c: direct from inside lb's cgroup
    Bystander,
    /// d: ClusterIP through iptables
    Iptables,
    /// e: direct with the iptables rules loaded
    IptablesBystander,
}

impl Config {
    const ALL: [Config; 6] = [
        Config::Direct,
        Config::DirectInCgroup,
        Config::Lb,
        Config::Bystander,
        Config::Iptables,
        Config::IptablesBystander,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Config::Direct => "a direct (floor)",
            Config::DirectInCgroup => "a' direct, own cgroup",
            Config::Lb => "b ClusterIP via lb",
            Config::Bystander => "c direct, in lb's cgroup",
            Config::Iptables => "d ClusterIP via iptables",
            Config::IptablesBystander => "e direct, iptables loaded",
        }
    }

    /// The most this configuration's ratio to the floor may be, if it has a target.
    pub fn target(self) -> Option<f64> {
        match self {
            Config::Lb => Some(1.05),
            Config::Bystander => Some(1.02),
            _ => None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Median over rounds of (this p50 / the suite's floor p50 in the same round).
    pub ratio: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub met: Option<bool>,
}

/// Where the probes run.
pub struct Clients<'a> {
    pub tb: &'a Testbed,
    /// The namespace with the iptables rules (d, e).
    pub iptables_ns: &'a str,
    /// An empty cgroup beside lb's (a').
    pub floor_cgroup: &'a Path,
}

/// Runs `rounds` (+ a warm-up round) of every suite's configurations at `scale` Services.
pub fn measure(
    clients: &Clients,
    scale: usize,
    rounds: usize,
    samples_per_round: u32,
) -> anyhow::Result<BTreeMap<Suite, BTreeMap<Config, Latency>>> {
    let runs: Vec<(Suite, Config)> = Suite::ALL
        .iter()
        .flat_map(|&s| s.configs().iter().map(move |&c| (s, c)))
        .collect();
    let mut samples: BTreeMap<(Suite, Config), Vec<u64>> = BTreeMap::new();
    // Per round, each configuration's p50 over its suite's floor's.
    let mut round_ratios: BTreeMap<(Suite, Config), Vec<f64>> = BTreeMap::new();
    for round in 0..=rounds {
        let mut round_p50 = BTreeMap::new();
        for k in round_order(runs.len(), round) {
            let (suite, config) = runs[k];
            let args = probe_args(clients, suite, config, scale, round, samples_per_round);
            let summary = probe::collect_echo(clients.tb.spawn_probe(&args)?)?;
            check(suite, config, &summary)?;
            if round > 0 {
                round_p50.insert((suite, config), percentile(&summary.samples_ns, 50.0));
                samples
                    .entry((suite, config))
                    .or_default()
                    .extend(summary.samples_ns);
            } // round 0 warms caches, ARP/ND and the pods' sockets
        }
        for (&(suite, config), &p50) in &round_p50 {
            if let Some(&floor) = round_p50.get(&(suite, Config::Direct)) {
                round_ratios
                    .entry((suite, config))
                    .or_default()
                    .push(p50 / floor);
            }
        }
        eprint!("    round {round}/{rounds}\r");
    }
    eprintln!();
    let mut tables: BTreeMap<Suite, BTreeMap<Config, Latency>> = BTreeMap::new();
    for ((suite, config), s) in samples {
        let ratio = median(round_ratios.remove(&(suite, config)).unwrap_or_default());
        let target = config.target();
        let latency = Latency {
            samples: s.len(),
            p50_us: percentile(&s, 50.0),
            p90_us: percentile(&s, 90.0),
            p99_us: percentile(&s, 99.0),
            ratio,
            target,
            met: target.map(|t| ratio <= t),
        };
        tables.entry(suite).or_default().insert(config, latency);
    }
    Ok(tables)
}

/// Every exchange must have worked, and every UDP echo must show the address it was sent to (for
/// b: the ClusterIP, which only lb's recvmsg program puts there).
fn check(suite: Suite, config: Config, summary: &EchoSummary) -> anyhow::Result<()> {
    if summary.errors > 0 {
        bail!(
            "{:?} {}: {} of the exchanges failed ({:?})",
            suite,
            config.label(),
            summary.errors,
            summary.first_error
        );
    }
    ensure!(
        summary.foreign_sources == 0,
        "{:?} {}: {} echoes came from another address than they were sent to",
        suite,
        config.label(),
        summary.foreign_sources
    );
    Ok(())
}

/// The probe for `config` of `suite` in `round`: `samples` exchanges with Service `scale / 2` or
/// with the pods.
pub fn probe_args(
    clients: &Clients,
    suite: Suite,
    config: Config,
    scale: usize,
    round: usize,
    samples: u32,
) -> ProbeArgs {
    let family = suite.family();
    let service = SocketAddr::new(family.cluster_ip(scale / 2), SERVICE_PORT);
    let pods: Vec<SocketAddr> = (0..BACKENDS)
        .map(|i| SocketAddr::new(family.pod_ip(i), ECHO_PORT))
        .collect();
    let mut args = clients.tb.probe_args(service, samples);
    args.echo = true;
    match suite.exchange() {
        Exchange::Tcp => {}
        Exchange::UdpLongLived => {
            args.udp_unconnected = true;
            args.count = 1;
            args.messages = samples;
        }
        Exchange::UdpFreshSocket => {
            args.udp_unconnected = true;
            args.count = samples;
            args.messages = 1;
        }
    }
    match config {
        Config::Lb => {}
        Config::Iptables => {
            args.cgroup = None;
            args.netns = clients.iptables_ns.to_owned();
        }
        Config::Direct | Config::DirectInCgroup | Config::Bystander | Config::IptablesBystander => {
            if suite.exchange() == Exchange::UdpLongLived {
                // One socket keeps one backend through lb: here, the round's pod.
                args.target = pods[round % pods.len()];
            } else {
                // Round-robin over the pods, as lb spreads connects and sockets over them.
                args.target = pods[0];
                args.also = pods[1..].to_vec();
            }
            args.cgroup = match config {
                Config::Bystander => args.cgroup,
                Config::DirectInCgroup => Some(clients.floor_cgroup.to_owned()),
                _ => None,
            };
            if config == Config::IptablesBystander {
                args.netns = clients.iptables_ns.to_owned();
            }
        }
    }
    args
}

/// Connects per second through TCP over IPv4 with 2 concurrent clients, direct and through lb,
/// each measured twice, in the order direct, lb, lb, direct (so that a steady drift cancels).
pub fn throughput(
    clients: &Clients,
    scale: usize,
    seconds: u64,
) -> anyhow::Result<BTreeMap<&'static str, f64>> {
    let mut rates = BTreeMap::new();
    for (name, config) in [
        ("direct", Config::Direct),
        ("lb", Config::Lb),
        ("lb", Config::Lb),
        ("direct", Config::Direct),
    ] {
        let mut args = probe_args(clients, Suite::Tcp4, config, scale, 0, 10_000_000);
        args.duration_ms = Some(seconds * 1000);
        let children = [
            clients.tb.spawn_probe(&args)?,
            clients.tb.spawn_probe(&args)?,
        ];
        let mut rate = 0.0;
        for child in children {
            let s: EchoSummary = probe::collect_echo(child)?;
            ensure!(
                s.errors == 0,
                "{name}: {} connects failed ({:?})",
                s.errors,
                s.first_error
            );
            rate += s.samples_ns.len() as f64 / (s.elapsed_ns as f64 / 1e9);
        }
        *rates.entry(name).or_default() += rate / 2.0;
    }
    Ok(rates)
}
