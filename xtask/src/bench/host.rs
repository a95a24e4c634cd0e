//! What attaching lb costs sockets it does not translate, measured against a host with no lb
//! program attached anywhere.
//!
//! The datapath's floor (a) runs outside lb's cgroup, but with lb's programs attached to another
//! cgroup. That is not quite a host without lb: once any cgroup has a sock_addr program of a kind,
//! the kernel runs the hook for every socket on the host (a static branch), which locks the
//! socket and walks that socket's cgroup's (empty) program array on each connect, and on each
//! sendto and recvfrom with an address. The floor and the pods pay it too, so b/a and c/a leave it
//! out. Here a0 is the same direct exchange with lb's programs detached from everything:
//!
//! - a/a0: what a socket outside lb's cgroup pays for lb being attached elsewhere;
//! - c/a0: what a bystander in lb's cgroup pays in all, against a host without lb; in a cluster,
//!   where lb is attached to the cgroup of every pod, this is what other traffic pays.
//!
//! Rounds alternate attached and detached phases (taking turns at going first) with 1 Service
//! programmed: nothing here depends on the number of Services (a socket that is not translated
//! costs one failed lookup per program). The agent is stopped in both phases; its programs stay
//! attached through their pins until `reset`. Each phase first waits [`SETTLE`] and runs every
//! suite once unrecorded: without the wait, a0's TCP came out 7 % slower than a (most likely the
//! kernel still freeing the reset maps, about 200 MB preallocated, in a worker).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use serde_json::Value;
use xtask::testbed::{Testbed, find_tool, probe};

use super::{
    MANIFEST,
    datapath::{Clients, Config, Suite, probe_args},
    median, percentile, round_order,
    workload::dual_stack_manifests,
};

const SUITES: [Suite; 4] = [Suite::Tcp4, Suite::Tcp6, Suite::Udp4, Suite::Udp6];
/// The bystander target, here against a host without lb.
pub const TARGET: f64 = 1.02;
/// Quiet time after attaching or detaching (300 ms was enough here; see the module's doc).
const SETTLE: Duration = Duration::from_millis(400);

#[derive(Debug, Serialize)]
pub struct HostCost {
    pub samples: usize,
    /// p50 over all rounds (µs): a0, no lb program on the host.
    pub p50_us_without_lb: f64,
    /// a: direct from outside lb's cgroup, lb attached to its own.
    pub p50_us_floor: f64,
    /// c: direct from inside lb's cgroup.
    pub p50_us_bystander: f64,
    /// Median over rounds of a / a0 (p50s of the same round).
    pub floor_ratio: f64,
    /// Median over rounds of c / a0.
    pub bystander_ratio: f64,
    pub target: f64,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct HostReport {
    pub suites: BTreeMap<Suite, HostCost>,
    /// cgroup sock_addr programs of others seen while lb's were detached: with any, the hooks
    /// stayed on and a0 is not a host without lb (the figures are then too low).
    pub foreign_programs: usize,
}

pub fn measure(
    tb: &mut Testbed,
    iptables_ns: &str,
    floor_cgroup: &Path,
    rounds: usize,
    samples_per_round: u32,
) -> anyhow::Result<HostReport> {
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    tb.write_manifest(MANIFEST, &dual_stack_manifests(1))?;
    let mut samples: BTreeMap<(Suite, Config, bool), Vec<u64>> = BTreeMap::new();
    let mut ratios: BTreeMap<(Suite, Config), Vec<f64>> = BTreeMap::new();
    let mut ours = BTreeSet::new();
    let mut foreign_programs = 0;
    for round in 0..=rounds {
        let mut p50 = BTreeMap::new();
        for phase in 0..2 {
            let attached = (phase + round) % 2 == 0;
            tb.stop_agent()?;
            tb.agent_command(&["reset"])?;
            if attached {
                tb.start_agent()?;
                tb.stop_agent()?;
                ours = attached_programs(tb.cgroup())?;
                ensure!(!ours.is_empty(), "no program attached to lb's cgroup");
            } else {
                foreign_programs = foreign_programs.max(wait_detached(&ours)?);
            }
            std::thread::sleep(SETTLE);
            let clients = Clients {
                tb,
                iptables_ns,
                floor_cgroup,
            };
            // The ClusterIP answers exactly when lb is attached.
            let args = probe_args(&clients, Suite::Tcp4, Config::Lb, 1, round, 1);
            let check = probe::collect_echo(tb.spawn_probe(&args)?)?;
            if attached != (check.errors == 0) {
                bail!(
                    "lb {} attached, yet the ClusterIP {}",
                    if attached { "is" } else { "is not" },
                    if attached { "fails" } else { "answers" }
                );
            }
            let configs: &[Config] = if attached {
                &[Config::Direct, Config::Bystander]
            } else {
                &[Config::Direct]
            };
            let runs: Vec<(Suite, Config)> = SUITES
                .iter()
                .flat_map(|&s| configs.iter().map(move |&c| (s, c)))
                .collect();
            for warm_up in [true, false] {
                for k in round_order(runs.len(), round) {
                    let (suite, config) = runs[k];
                    if warm_up && config != Config::Direct {
                        continue;
                    }
                    let args = probe_args(&clients, suite, config, 1, round, samples_per_round);
                    let s = probe::collect_echo(tb.spawn_probe(&args)?)?;
                    ensure!(
                        s.errors == 0 && s.foreign_sources == 0,
                        "{suite:?} {}: {} failed ({:?})",
                        config.label(),
                        s.errors,
                        s.first_error
                    );
                    if warm_up || round == 0 {
                        continue;
                    }
                    p50.insert((suite, config, attached), percentile(&s.samples_ns, 50.0));
                    samples
                        .entry((suite, config, attached))
                        .or_default()
                        .extend(s.samples_ns);
                }
            }
        }
        for suite in SUITES {
            if let Some(&without) = p50.get(&(suite, Config::Direct, false)) {
                for config in [Config::Direct, Config::Bystander] {
                    if let Some(&with) = p50.get(&(suite, config, true)) {
                        ratios
                            .entry((suite, config))
                            .or_default()
                            .push(with / without);
                    }
                }
            }
        }
        eprint!("    round {round}/{rounds}\r");
    }
    eprintln!();
    tb.agent_command(&["reset"])?;
    let mut suites = BTreeMap::new();
    for suite in SUITES {
        let p50 = |config, attached| {
            samples
                .get(&(suite, config, attached))
                .map_or(f64::NAN, |s| percentile(s, 50.0))
        };
        let mut ratio = |config| median(ratios.remove(&(suite, config)).unwrap_or_default());
        let bystander_ratio = ratio(Config::Bystander);
        suites.insert(
            suite,
            HostCost {
                samples: samples
                    .get(&(suite, Config::Direct, false))
                    .map_or(0, Vec::len),
                p50_us_without_lb: p50(Config::Direct, false),
                p50_us_floor: p50(Config::Direct, true),
                p50_us_bystander: p50(Config::Bystander, true),
                floor_ratio: ratio(Config::Direct),
                bystander_ratio,
                target: TARGET,
                met: bystander_ratio <= TARGET,
            },
        );
    }
    Ok(HostReport {
        suites,
        foreign_programs,
    })
}

fn bpftool_json(args: &[&str]) -> anyhow::Result<Value> {
    let bpftool = find_tool("bpftool").context("bpftool not found")?;
    let out = Command::new(bpftool).args(args).arg("--json").output()?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The ids of the programs attached to `cgroup`.
fn attached_programs(cgroup: &Path) -> anyhow::Result<BTreeSet<u64>> {
    let path = cgroup.to_str().context("cgroup path")?;
    let shown = bpftool_json(&["cgroup", "show", path])?;
    Ok(shown
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["id"].as_u64())
        .collect())
}

/// Waits until none of `ours` is loaded (a detached link is released asynchronously), then
/// returns how many other cgroup sock_addr programs the host has.
fn wait_detached(ours: &BTreeSet<u64>) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let programs = bpftool_json(&["prog", "show"])?;
        let programs = programs.as_array().cloned().unwrap_or_default();
        let ids = |p: &Value| p["id"].as_u64().unwrap_or(0);
        if !programs.iter().any(|p| ours.contains(&ids(p))) {
            return Ok(programs
                .iter()
                .filter(|p| p["type"] == "cgroup_sock_addr")
                .count());
        }
        ensure!(
            Instant::now() < deadline,
            "lb's programs still loaded 10 s after reset"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
