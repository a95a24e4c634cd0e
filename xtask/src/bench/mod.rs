//! `cargo xtask bench`: what lb costs, measured side by side in one run against the floor (no load
//! balancer) and against kube-proxy's iptables shape, on the veth testbed.
//!
//! 1. Datapath ([`datapath`]): with 1, 1 000 and 10 000 dual-stack Services loaded (each with an
//!    IPv4 and an IPv6 ClusterIP, TCP and UDP port 80, and 10 backends per family: four
//!    frontends), the same request/response exchange through lb and straight to the pods, for
//!    TCP (connect + 1-byte echo + close) and UDP (sendto + recvfrom on an unconnected socket,
//!    long-lived and fresh per exchange) over IPv4 and IPv6; bystanders (direct traffic from
//!    inside lb's cgroup); and for TCP over IPv4 also kube-proxy-shaped iptables rules. All
//!    configurations are interleaved round by round so that drift hits all alike, and compared
//!    with the floor of the same round.
//! 2. What attaching lb costs the host's other sockets ([`host`]): the direct exchanges, from
//!    outside and inside lb's cgroup, against the same with no lb program attached anywhere.
//! 3. Throughput: TCP connects per second with 2 concurrent clients, through lb and direct.
//! 4. Control plane ([`control_plane`]) at the largest scale, IPv4 Services × 10 endpoints, from
//!    manifest files and from a stand-in API server: cold programming, endpoint-change latency (a
//!    file renamed into place, or a watch event pushed → maps written; 200 changes each), agent
//!    RSS after the cold start, after a periodic resync and after the changes.
//! 5. Changes through a real API server ([`real_api`]): etcd, kube-apiserver and
//!    kube-controller-manager, 100 IPv4 Services, 100 changes each a `kubectl apply` of one
//!    EndpointSlice → maps written (20 with `--quick`); skipped, saying why, without the
//!    binaries. `LB_BENCH_ONLY=real-api` runs this part alone.
//!
//! All traffic stays inside the testbed's namespaces; iptables rules exist only in the benchmark's
//! own client namespace and vanish with it. Every probe is bounded in count and time.

mod control_plane;
mod datapath;
mod host;
mod real_api;
mod report;
mod workload;

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::json;
use xtask::testbed::{
    PodSpec, ServiceRoute, Testbed,
    cleanup::{self, Undo},
    probe::now_us,
};

use datapath::Clients;
use report::Report;
use workload::{BACKENDS, ECHO_PORT};

/// The second client namespace's address, for the iptables comparison.
const IPTABLES_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 253);
/// The manifest file of the datapath's Services.
const MANIFEST: &str = "bench.yaml";

/// How much to measure.
#[derive(Clone, Copy)]
pub struct Plan {
    scales: &'static [usize],
    rounds: usize,
    samples_per_round: u32,
    throughput_secs: u64,
    /// Endpoint changes through the real API server ([`real_api`]).
    real_api_changes: usize,
}

pub const FULL: Plan = Plan {
    scales: &[1, 1_000, 10_000],
    rounds: 40,
    samples_per_round: 200,
    throughput_secs: 2,
    real_api_changes: 100,
};

/// A short run to check the benchmark itself works.
pub const QUICK: Plan = Plan {
    scales: &[1, 1_000],
    rounds: 2,
    samples_per_round: 200,
    throughput_secs: 1,
    real_api_changes: 20,
};

fn step(text: &str) {
    eprintln!("==> {text}");
}

pub fn run(agent_bin: &Path, plan: Plan, scales: Option<Vec<usize>>) -> anyhow::Result<()> {
    if real_api::only() {
        return real_api::run_alone(agent_bin, plan);
    }
    let scales: Vec<usize> = scales.unwrap_or_else(|| plan.scales.to_vec());
    let started = Instant::now();
    let largest = *scales.iter().max().context("no scales")?;
    ensure!(largest < 65_535, "at most 65 534 Services (fd00:96::/112)");
    let pods: Vec<PodSpec> = (0..BACKENDS)
        .map(|i| PodSpec {
            name: format!("pod-{}", i + 1),
            ip: workload::pod_ip(i),
            tcp_ports: vec![],
            line_ports: vec![],
            udp_ports: vec![],
            // TCP and UDP.
            echo_ports: vec![ECHO_PORT],
        })
        .collect();
    step(&format!(
        "building the testbed: {BACKENDS} echo pods, a client for lb and one for iptables"
    ));
    // The probe is this very binary. /proc/self/exe, not its path: a build running beside the
    // bench may replace target/debug/xtask, and the probes must stay the binary measured so far.
    let mut tb = Testbed::new(agent_bin, Path::new("/proc/self/exe"), &pods)?;
    let iptables_ns = tb.add_client("i", IPTABLES_CLIENT_IP, ServiceRoute::Discard)?;
    // A sibling of lb's cgroup with no program: separates what cgroup placement costs.
    let floor_cgroup = tb.cgroup().with_file_name(format!("{}-floor", tb.id));
    std::fs::create_dir(&floor_cgroup)
        .with_context(|| format!("creating {}", floor_cgroup.display()))?;
    let _floor_cgroup = cleanup::register(Undo::Cgroup(floor_cgroup.clone()));
    for ns in [tb.client_netns().to_owned(), iptables_ns.clone()] {
        // Thousands of short connections per second: reuse TIME_WAIT ports (this namespace only;
        // the ipv4 sysctl covers TCP over IPv6 too).
        sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
    }

    let mut report = Report {
        machine: report::machine(),
        datapath: BTreeMap::new(),
        programming: BTreeMap::new(),
        host: None,
        throughput_connects_per_s: BTreeMap::new(),
        control_plane: None,
        real_api: None,
        run_seconds: 0.0,
        load_average: [report::load_average(), String::new()],
    };

    for &scale in &scales {
        step(&format!(
            "{scale} dual-stack Services × {BACKENDS} backends per family: programming lb (cold)"
        ));
        tb.stop_agent()?;
        tb.agent_command(&["reset"])?;
        tb.write_manifest(MANIFEST, &workload::dual_stack_manifests(scale))?;
        let spawned = now_us();
        let agent = tb.spawn_agent()?;
        agent.wait_ready(Duration::from_secs(60))?;
        let synced = agent.metrics()?;
        // IPv4 and IPv6, TCP and UDP.
        let frontends = 4 * scale;
        control_plane::check_programmed(&synced, frontends)?;
        control_plane::sleep_for_trim();
        let phases = control_plane::Phases::of(&synced)?;
        report.programming.insert(
            scale,
            json!({
                "frontends": frontends,
                "wall_ms": control_plane::wall_ms(spawned, &synced)?,
                "sync_ms": phases.total(),
                "breakdown_ms": phases,
                "rss_mib": control_plane::rss_mib(agent.pid())?,
            }),
        );

        step(&format!(
            "{scale} Services: loading kube-proxy-shaped iptables rules into {iptables_ns}"
        ));
        let loaded = Instant::now();
        iptables_restore(&iptables_ns, &workload::iptables_rules(scale))?;
        eprintln!(
            "    {} rules in {:.1} s",
            workload::iptables_rule_count(scale),
            loaded.elapsed().as_secs_f64()
        );

        step(&format!(
            "{scale} Services: {} rounds × {} exchanges per configuration, with Service {}",
            plan.rounds,
            plan.samples_per_round,
            scale / 2
        ));
        let clients = Clients {
            tb: &tb,
            iptables_ns: &iptables_ns,
            floor_cgroup: &floor_cgroup,
        };
        let tables = datapath::measure(&clients, scale, plan.rounds, plan.samples_per_round)?;
        for (suite, table) in tables {
            report
                .datapath
                .entry(suite)
                .or_default()
                .insert(scale, table);
        }
    }

    step(&format!(
        "throughput at {largest} Services: 2 concurrent clients, {} s each way, twice (ABBA)",
        plan.throughput_secs
    ));
    let clients = Clients {
        tb: &tb,
        iptables_ns: &iptables_ns,
        floor_cgroup: &floor_cgroup,
    };
    report.throughput_connects_per_s =
        datapath::throughput(&clients, largest, plan.throughput_secs)?;

    step(&format!(
        "what attaching lb costs other sockets: {} rounds, lb attached and detached in turn",
        plan.rounds
    ));
    report.host = Some(host::measure(
        &mut tb,
        &iptables_ns,
        &floor_cgroup,
        plan.rounds,
        plan.samples_per_round,
    )?);

    report.control_plane = Some(control_plane::measure(&mut tb, largest)?);
    report.real_api = Some(real_api::measure(agent_bin, plan.real_api_changes)?);
    report.run_seconds = started.elapsed().as_secs_f64();
    report.load_average[1] = report::load_average();

    report::print(&report);
    save(&report)
}

/// Writes the run's JSON to target/bench.json and says where.
fn save(report: &Report) -> anyhow::Result<()> {
    let json_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(report)?)?;
    eprintln!(
        "\nJSON: {} (whole run {:.0} s)",
        json_path.display(),
        report.run_seconds
    );
    Ok(())
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

/// The order of a round's `n` runs: run `round % n` first, so that each takes its turn at going
/// first, then the others in an order shuffled per round (fixed by `round`, so runs repeat).
///
/// Shuffled, not merely rotated: rotation keeps the cyclic order, so every run would always follow
/// the same other run, and what that one leaves behind would bias it. With rotation alone, TCP
/// over IPv6 to the pods (a), always run just after the iptables namespace's run (e), came out
/// 2-5 % slower than the same connects from lb's cgroup (c), at 1 and 1 000 Services; shuffled,
/// they agree within about 1 %.
fn round_order(n: usize, round: usize) -> Vec<usize> {
    let first = round % n.max(1);
    let mut rest: Vec<usize> = (0..n).filter(|&k| k != first).collect();
    // xorshift64, seeded by the round; Fisher-Yates.
    let mut x = 0x9E37_79B9_7F4A_7C15_u64 ^ (round as u64).wrapping_mul(0x2545_F491_4F6C_DD1D);
    for i in (1..rest.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rest.swap(i, (x % (i as u64 + 1)) as usize);
    }
    std::iter::once(first).chain(rest).take(n).collect()
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

#[cfg(test)]
mod tests {
    use super::round_order;

    #[test]
    fn each_round_runs_everything_once_and_each_run_goes_first_in_turn() {
        for round in 0..50 {
            let mut order = round_order(19, round);
            assert_eq!(order[0], round % 19);
            order.sort_unstable();
            assert_eq!(order, (0..19).collect::<Vec<_>>());
        }
        // Not a rotation: the run after run 0 changes from round to round.
        let followers: std::collections::BTreeSet<usize> = (0..40)
            .map(|round| {
                let order = round_order(19, round);
                let at = order.iter().position(|&k| k == 0).unwrap();
                order[(at + 1) % 19]
            })
            .collect();
        assert!(followers.len() > 5, "{followers:?}");
        assert_eq!(round_order(0, 3), Vec::<usize>::new());
    }
}
