//! `cargo xtask bench`: what lb costs, measured side by side in one run against the floor (no load
//! balancer) and against kube-proxy's iptables shape, on the veth testbed.
//!
//! 1. Datapath: sequential connect + 1-byte echo + close, with 1, 1 000 and 10 000 Services of
//!    10 backends loaded. Configurations, interleaved round by round so that drift hits all alike:
//!    a. direct to pod IPs, no load balancer on the path (the floor);
//!    b. ClusterIP through lb;
//!    c. direct to pod IPs from inside lb's cgroup (bystanders);
//!    d. the same ClusterIP through kube-proxy-shaped iptables rules (KUBE-SERVICES → KUBE-SVC-…
//!    → KUBE-SEP-…, `statistic` random, DNAT) in another client namespace;
//!    e. direct to pod IPs from that namespace (what every other connection pays for the rules).
//! 2. Throughput: connects per second with 2 concurrent clients, through lb and direct.
//! 3. Control plane at 10 000 Services × 10 endpoints: cold programming from manifests and from the
//!    API server, endpoint-change latency (event pushed → maps written, ≥ 200 changes), agent RSS.
//!
//! All traffic stays inside the testbed's namespaces; iptables rules exist only in the benchmark's
//! own client namespace and vanish with it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use serde_json::{Value, json};
use xtask::testbed::{
    PodSpec, ServiceRoute, Testbed,
    agent::SYNCED,
    cleanup::{self, Undo},
    fake_api::{ENDPOINT_SLICES, FakeApi, SERVICES},
    probe::{self, EchoSummary, ProbeArgs},
};

const BACKENDS: u8 = 10;
const ECHO_PORT: u16 = 9000;
const SERVICE_PORT: u16 = 80;
/// The second client namespace's address, for the iptables comparison.
const IPTABLES_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 253);
const CHANGES: usize = 200;

/// How much to measure.
#[derive(Clone, Copy)]
pub struct Plan {
    scales: &'static [usize],
    rounds: usize,
    samples_per_round: u32,
    throughput_secs: u64,
}

pub const FULL: Plan = Plan {
    scales: &[1, 1_000, 10_000],
    rounds: 20,
    samples_per_round: 200,
    throughput_secs: 2,
};

/// A short run to check the benchmark itself works.
pub const QUICK: Plan = Plan {
    scales: &[1, 1_000],
    rounds: 2,
    samples_per_round: 200,
    throughput_secs: 1,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
enum Config {
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

    fn label(self) -> &'static str {
        match self {
            Config::Direct => "a direct (floor)",
            Config::DirectInCgroup => "a' direct, own cgroup",
            Config::Lb => "b ClusterIP via lb",
            Config::Bystander => "c direct, in lb's cgroup",
            Config::Iptables => "d ClusterIP via iptables",
            Config::IptablesBystander => "e direct, iptables loaded",
        }
    }
}

#[derive(Debug, Serialize)]
struct Latency {
    samples: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    /// Median over rounds of (this p50 / the floor's p50 in the same round).
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: BTreeMap<&'static str, String>,
    datapath: BTreeMap<usize, BTreeMap<Config, Latency>>,
    throughput_connects_per_s: BTreeMap<&'static str, f64>,
    control_plane: BTreeMap<&'static str, Value>,
}

fn step(text: &str) {
    eprintln!("==> {text}");
}

fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (index / 250) as u8, (index % 250 + 1) as u8)
}

fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, index + 1)
}

fn pod_targets() -> Vec<SocketAddr> {
    (0..BACKENDS)
        .map(|i| SocketAddr::from((pod_ip(i), ECHO_PORT)))
        .collect()
}

pub fn run(agent_bin: &Path, plan: Plan, scales: Option<Vec<usize>>) -> anyhow::Result<()> {
    let scales: Vec<usize> = scales.unwrap_or_else(|| plan.scales.to_vec());
    let started = Instant::now();
    let largest = *scales.iter().max().context("no scales")?;
    let pods: Vec<PodSpec> = (0..BACKENDS)
        .map(|i| PodSpec {
            name: format!("pod-{}", i + 1),
            ip: pod_ip(i),
            tcp_ports: vec![],
            udp_ports: vec![],
            echo_ports: vec![ECHO_PORT],
        })
        .collect();
    step(&format!(
        "building the testbed: {BACKENDS} echo pods, a client for lb and one for iptables"
    ));
    let mut tb = Testbed::new(agent_bin, &std::env::current_exe()?, &pods)?;
    let iptables_ns = tb.add_client("i", IPTABLES_CLIENT_IP, ServiceRoute::Discard)?;
    // A sibling of lb's cgroup with no program: separates what cgroup placement costs.
    let floor_cgroup = tb.cgroup().with_file_name(format!("{}-floor", tb.id));
    std::fs::create_dir(&floor_cgroup)
        .with_context(|| format!("creating {}", floor_cgroup.display()))?;
    let _floor_cgroup = cleanup::register(Undo::Cgroup(floor_cgroup.clone()));
    for ns in [tb.client_netns().to_owned(), iptables_ns.clone()] {
        // Thousands of short connections per second: reuse TIME_WAIT ports (this namespace only).
        sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
    }

    let mut report = Report {
        machine: machine(),
        datapath: BTreeMap::new(),
        throughput_connects_per_s: BTreeMap::new(),
        control_plane: BTreeMap::new(),
    };

    for &scale in &scales {
        step(&format!(
            "{scale} Services × {BACKENDS} backends: programming lb"
        ));
        tb.stop_agent()?;
        tb.write_manifest("bench.yaml", &manifests(scale))?;
        let agent = tb.start_agent()?;
        let synced = agent.wait_for(SYNCED, 0, Duration::from_secs(60))?;
        ensure!(
            synced.contains(&format!("frontends={scale} ")),
            "not all programmed: {synced}"
        );
        step(&format!(
            "{scale} Services: loading kube-proxy-shaped iptables rules into {iptables_ns}"
        ));
        let loaded = Instant::now();
        iptables_restore(&iptables_ns, &iptables_rules(scale))?;
        eprintln!(
            "    {} rules in {:.1} s",
            1 + scale * (1 + 3 * BACKENDS as usize),
            loaded.elapsed().as_secs_f64()
        );

        let target = SocketAddr::from((cluster_ip(scale / 2), SERVICE_PORT));
        step(&format!(
            "{scale} Services: {} rounds × {} connects per configuration, to {target} (Service {})",
            plan.rounds,
            plan.samples_per_round,
            scale / 2
        ));
        let mut samples: BTreeMap<Config, Vec<u64>> = BTreeMap::new();
        // Per round, each configuration's p50 over the floor's: paired, so drift between rounds
        // (other load, cache state) cancels out.
        let mut round_ratios: BTreeMap<Config, Vec<f64>> = BTreeMap::new();
        for round in 0..=plan.rounds {
            let mut round_p50 = BTreeMap::new();
            // Each configuration takes its turn at going first.
            for k in 0..Config::ALL.len() {
                let config = Config::ALL[(k + round) % Config::ALL.len()];
                let args = probe_args(
                    &tb,
                    &iptables_ns,
                    &floor_cgroup,
                    config,
                    target,
                    plan.samples_per_round,
                );
                let summary = probe::collect_echo(tb.spawn_probe(&args)?)?;
                if summary.errors > 0 {
                    bail!(
                        "{}: {} of the connects failed ({:?})",
                        config.label(),
                        summary.errors,
                        summary.first_error
                    );
                }
                if round > 0 {
                    round_p50.insert(config, percentile(&summary.samples_ns, 50.0));
                    samples
                        .entry(config)
                        .or_default()
                        .extend(summary.samples_ns);
                } // round 0 warms caches, ARP and the pods' accept loops
            }
            if let Some(&floor) = round_p50.get(&Config::Direct) {
                for (config, p50) in round_p50 {
                    round_ratios.entry(config).or_default().push(p50 / floor);
                }
            }
            eprint!("    round {round}/{}\r", plan.rounds);
        }
        eprintln!();
        let table = samples
            .into_iter()
            .map(|(config, s)| {
                let latency = Latency {
                    samples: s.len(),
                    p50_us: percentile(&s, 50.0),
                    p90_us: percentile(&s, 90.0),
                    p99_us: percentile(&s, 99.0),
                    ratio: median(round_ratios.remove(&config).unwrap_or_default()),
                };
                (config, latency)
            })
            .collect();
        report.datapath.insert(scale, table);
    }

    step(&format!(
        "throughput at {largest} Services: 2 concurrent clients, {} s each way, twice",
        plan.throughput_secs
    ));
    let target = SocketAddr::from((cluster_ip(largest / 2), SERVICE_PORT));
    for (name, config) in [
        ("direct", Config::Direct),
        ("lb", Config::Lb),
        ("direct", Config::Direct),
        ("lb", Config::Lb),
    ] {
        let mut args = probe_args(&tb, &iptables_ns, &floor_cgroup, config, target, 10_000_000);
        args.duration_ms = Some(plan.throughput_secs * 1000);
        let children = [tb.spawn_probe(&args)?, tb.spawn_probe(&args)?];
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
        *report.throughput_connects_per_s.entry(name).or_default() += rate / 2.0;
    }

    control_plane(&mut tb, largest, &mut report)?;

    print_report(&report);
    let json_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    eprintln!(
        "\nJSON: {} (whole run {:.0} s)",
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn probe_args(
    tb: &Testbed,
    iptables_ns: &str,
    floor_cgroup: &Path,
    config: Config,
    service: SocketAddr,
    count: u32,
) -> ProbeArgs {
    let pods = pod_targets();
    let mut args = tb.probe_args(service, count);
    args.echo = true;
    match config {
        Config::Lb => {}
        Config::Iptables => {
            args.cgroup = None;
            args.netns = iptables_ns.to_owned();
        }
        Config::Direct | Config::DirectInCgroup | Config::Bystander | Config::IptablesBystander => {
            // Round-robin over the pods, as the load balancer spreads over them.
            args.target = pods[0];
            args.also = pods[1..].to_vec();
            args.cgroup = match config {
                Config::Bystander => args.cgroup,
                Config::DirectInCgroup => Some(floor_cgroup.to_owned()),
                _ => None,
            };
            if config == Config::IptablesBystander {
                args.netns = iptables_ns.to_owned();
            }
        }
    }
    args
}

/// Cold programming, endpoint-change latency and memory at `scale` Services.
fn control_plane(tb: &mut Testbed, scale: usize, report: &mut Report) -> anyhow::Result<()> {
    let cp = &mut report.control_plane;

    step(&format!(
        "control plane: cold start from manifests, {scale} Services × {BACKENDS} endpoints"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    let started = Instant::now();
    let agent = tb.start_agent()?;
    let wall = started.elapsed();
    let line = agent.wait_for(SYNCED, 0, Duration::from_secs(1))?;
    cp.insert("manifests_cold_wall_ms", json!(wall.as_millis() as u64));
    cp.insert("manifests_cold_sync_ms", json!(sync_ms(&line)));
    cp.insert("manifests_cold_breakdown_ms", breakdown(&line));
    thread_sleep_for_trim();
    cp.insert("manifests_rss_mib", json!(rss_mib(tb.agent().pid())?));

    step(&format!(
        "control plane: cold start from the API server, {scale} Services"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    let api = FakeApi::start()?;
    let (services, slices) = api_objects(scale);
    for s in services {
        api.put(SERVICES, s);
    }
    for s in &slices {
        api.put(ENDPOINT_SLICES, s.clone());
    }
    tb.use_api(&api, None)?;
    let started = Instant::now();
    let agent = tb.start_agent()?;
    let wall = started.elapsed();
    let line = agent.wait_for(SYNCED, 0, Duration::from_secs(1))?;
    cp.insert("api_cold_wall_ms", json!(wall.as_millis() as u64));
    cp.insert("api_cold_sync_ms", json!(sync_ms(&line)));
    cp.insert("api_cold_breakdown_ms", breakdown(&line));
    thread_sleep_for_trim();
    cp.insert("api_rss_after_cold_mib", json!(rss_mib(tb.agent().pid())?));

    step(&format!(
        "control plane: {CHANGES} endpoint changes, event pushed → maps written"
    ));
    let mut latencies = Vec::new();
    let mut applies = Vec::new();
    for change in 0..CHANGES {
        // A different slice each time (37 is coprime to the scales), its last endpoint replaced.
        let index = (change * 37) % scale;
        let mut slice = slices[index].clone();
        let replaced = Ipv4Addr::new(10, 244, 2, (change % 250) as u8 + 1);
        slice["endpoints"][BACKENDS as usize - 1]["addresses"] = json!([replaced.to_string()]);
        let agent = tb.agent();
        let mark = agent.mark();
        let pushed = day_micros(SystemTime::now());
        api.push_event(
            ENDPOINT_SLICES,
            &json!({"type": "MODIFIED", "object": slice}),
        );
        let line = agent.wait_for(SYNCED, mark, Duration::from_secs(5))?;
        ensure!(
            line.contains("updated=1"),
            "unexpected sync for a one-endpoint change: {line}"
        );
        let logged = log_day_micros(&line)?;
        latencies.push(logged.saturating_sub(pushed) * 1000);
        applies.push(field(&line, "apply_us")? * 1000);
        if change % 20 == 19 {
            eprint!("    {}/{CHANGES}\r", change + 1);
        }
    }
    eprintln!();
    cp.insert(
        "change_latency_p50_ms",
        json!(percentile(&latencies, 50.0) / 1000.0),
    );
    cp.insert(
        "change_latency_p99_ms",
        json!(percentile(&latencies, 99.0) / 1000.0),
    );
    cp.insert(
        "change_apply_p50_ms",
        json!(percentile(&applies, 50.0) / 1000.0),
    );
    cp.insert(
        "change_apply_p99_ms",
        json!(percentile(&applies, 99.0) / 1000.0),
    );
    cp.insert("api_rss_mib", json!(rss_mib(tb.agent().pid())?));
    tb.stop_agent()?;
    Ok(())
}

/// `count` Services (ClusterIP `cluster_ip(i)`, port 80 → targetPort `echo`), each with a slice
/// of all pods on the echo port.
fn manifests(count: usize) -> String {
    let mut out = String::with_capacity(count * 1400);
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: {}, ports: [{{name: echo, port: {SERVICE_PORT}, targetPort: echo}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: echo, port: {ECHO_PORT}}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for p in 0..BACKENDS {
            let _ = writeln!(
                out,
                "- {{addresses: [{}], conditions: {{ready: true}}}}",
                pod_ip(p)
            );
        }
    }
    out
}

/// The same objects as the API server would send them.
fn api_objects(count: usize) -> (Vec<Value>, Vec<Value>) {
    let services = (0..count)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
                   "spec": {"clusterIP": cluster_ip(i).to_string(),
                            "ports": [{"name": "echo", "port": SERVICE_PORT, "targetPort": "echo", "protocol": "TCP"}]}})
        })
        .collect();
    let slices = (0..count)
        .map(|i| {
            let endpoints: Vec<Value> = (0..BACKENDS)
                .map(|p| json!({"addresses": [pod_ip(p).to_string()], "conditions": {"ready": true}}))
                .collect();
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("svc-{i}-a"), "namespace": "bench",
                                "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                   "addressType": "IPv4",
                   "ports": [{"name": "echo", "port": ECHO_PORT, "protocol": "TCP"}],
                   "endpoints": endpoints})
        })
        .collect();
    (services, slices)
}

/// kube-proxy's iptables shape for `count` Services (its `iptables-save` layout, nat table).
fn iptables_rules(count: usize) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for i in 0..count {
        let svc = format!("KUBE-SVC-{:016X}", hash(&format!("svc-{i}")));
        let name = format!("bench/svc-{i}:echo");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            cluster_ip(i)
        );
        for p in 0..BACKENDS {
            let sep = format!("KUBE-SEP-{:016X}", hash(&format!("svc-{i}-{p}")));
            let pod = pod_ip(p);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = BACKENDS - p;
            let statistic = if remaining > 1 {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / f64::from(remaining)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {pod}:{ECHO_PORT}\" {statistic}-j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {pod}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {pod}:{ECHO_PORT}"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

fn iptables_restore(netns: &str, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iptables-restore (xtask/run setup installs iptables)")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "iptables-restore failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl {key} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The `p`th percentile, in microseconds, of nanosecond samples.
fn percentile(samples: &[u64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank] as f64 / 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A `key=123` field of a log line.
fn field(line: &str, key: &str) -> anyhow::Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

fn sync_ms(line: &str) -> f64 {
    let total: u64 = ["read_us", "model_us", "apply_us"]
        .iter()
        .filter_map(|k| field(line, k).ok())
        .sum();
    total as f64 / 1000.0
}

fn breakdown(line: &str) -> Value {
    let ms = |k| {
        field(line, k)
            .map(|us| us as f64 / 1000.0)
            .unwrap_or(f64::NAN)
    };
    json!({"read": ms("read_us"), "model": ms("model_us"), "apply": ms("apply_us")})
}

/// Microseconds since midnight UTC.
fn day_micros(t: SystemTime) -> u64 {
    let us = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64;
    us % 86_400_000_000
}

/// Microseconds since midnight UTC of a log line's timestamp (`2026-11-25T09:28:51.997077Z ...`).
fn log_day_micros(line: &str) -> anyhow::Result<u64> {
    let time = line
        .split_whitespace()
        .next()
        .and_then(|t| t.split_once('T'))
        .map(|(_, t)| t.trim_end_matches('Z'))
        .with_context(|| format!("no timestamp in {line:?}"))?;
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let parts: Vec<u64> = hms.split(':').filter_map(|p| p.parse().ok()).collect();
    ensure!(parts.len() == 3, "bad timestamp in {line:?}");
    let micros: u64 = format!("{fraction:0<6}")[..6].parse()?;
    Ok(((parts[0] * 60 + parts[1]) * 60 + parts[2]) * 1_000_000 + micros)
}

/// The agent releases freed memory just after logging its sync; read RSS once it has.
fn thread_sleep_for_trim() {
    std::thread::sleep(Duration::from_millis(300));
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}

fn machine() -> BTreeMap<&'static str, String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_owned();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    [
        ("cpu", cpu),
        ("cores", cores.to_string()),
        ("kernel", kernel),
        ("memory", mem),
    ]
    .into()
}

fn print_report(report: &Report) {
    println!(
        "\nDatapath: sequential connect + 1-byte echo + close (µs; ratio = median over rounds of p50 / the round's floor p50)"
    );
    println!(
        "{:>8}  {:<26} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "Services", "configuration", "samples", "p50", "p90", "p99", "ratio"
    );
    for (scale, table) in &report.datapath {
        for (config, l) in table {
            println!(
                "{scale:>8}  {:<26} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>7.3}",
                config.label(),
                l.samples,
                l.p50_us,
                l.p90_us,
                l.p99_us,
                l.ratio
            );
        }
    }
    println!("\nThroughput, 2 concurrent clients (connects/s)");
    for (name, rate) in &report.throughput_connects_per_s {
        println!("  {name:<8} {rate:>10.0}");
    }
    println!("\nControl plane");
    for (key, value) in &report.control_plane {
        println!("  {key:<30} {value}");
    }
    if let Some(largest) = report.datapath.iter().next_back() {
        let ratio = |c| {
            largest
                .1
                .get(&c)
                .map(|l: &Latency| l.ratio)
                .unwrap_or(f64::NAN)
        };
        let cp = |k: &str| {
            report
                .control_plane
                .get(k)
                .and_then(Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        println!("\nTargets at {} Services", largest.0);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!(
            "  b/a <= 1.05: {:.3} {}",
            ratio(Config::Lb),
            verdict(ratio(Config::Lb) <= 1.05)
        );
        println!(
            "  c/a <= 1.02: {:.3} {}",
            ratio(Config::Bystander),
            verdict(ratio(Config::Bystander) <= 1.02)
        );
        println!(
            "  cold <= 1000 ms (manifests): {:.0} {}",
            cp("manifests_cold_sync_ms"),
            verdict(cp("manifests_cold_sync_ms") <= 1000.0)
        );
        println!(
            "  change p99 <= 5 ms: {:.2} {}",
            cp("change_latency_p99_ms"),
            verdict(cp("change_latency_p99_ms") <= 5.0)
        );
        let rss = cp("api_rss_mib").max(cp("manifests_rss_mib"));
        println!("  RSS <= 64 MiB: {rss:.1} {}", verdict(rss <= 64.0));
    }
}
