//! The benchmark's results: the table it prints and the JSON it writes.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{
    control_plane::{ControlPlane, Phases, SourceRun},
    datapath::{Config, Latency, Suite},
    host::HostReport,
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: BTreeMap<&'static str, String>,
    /// Suite → Services → configuration → latency.
    pub datapath: BTreeMap<Suite, BTreeMap<usize, BTreeMap<Config, Latency>>>,
    /// Services → the cold programming of the datapath's dual-stack Services.
    pub programming: BTreeMap<usize, Value>,
    /// What attaching lb costs sockets it does not translate, against a host without lb.
    pub host: Option<HostReport>,
    pub throughput_connects_per_s: BTreeMap<&'static str, f64>,
    pub control_plane: Option<ControlPlane>,
    /// Endpoint changes through a real API server (`kubectl apply` → maps written).
    pub real_api: Option<super::real_api::RealApiRun>,
    /// The whole run, build excluded.
    pub run_seconds: f64,
    /// /proc/loadavg when the run started and when it ended: other work on the machine shows
    /// here (on 2 cores, a concurrent build moves every figure).
    pub load_average: [String; 2],
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn print(report: &Report) {
    println!(
        "\nDatapath (µs; ratio = median over rounds of p50 / the same round's floor p50, a = the floor)"
    );
    for (suite, scales) in &report.datapath {
        println!("\n{}", suite.title());
        println!(
            "{:>8}  {:<26} {:>7} {:>8} {:>8} {:>8} {:>7}  target",
            "Services", "configuration", "samples", "p50", "p90", "p99", "ratio"
        );
        for (scale, table) in scales {
            for (config, l) in table {
                let target = match (l.target, l.met) {
                    (Some(t), Some(met)) => format!("<= {t:.2} {}", verdict(met)),
                    _ => String::new(),
                };
                println!(
                    "{scale:>8}  {:<26} {:>7} {:>8.1} {:>8.1} {:>8.1} {:>7.3}  {target}",
                    config.label(),
                    l.samples,
                    l.p50_us,
                    l.p90_us,
                    l.p99_us,
                    l.ratio
                );
            }
        }
    }

    if let Some(host) = &report.host {
        println!(
            "\nAgainst a host without lb (a0: direct, no lb program attached anywhere; 1 Service; p50 µs)"
        );
        println!(
            "  {:<10} {:>8} {:>8} {:>8} {:>7} {:>7}  target",
            "suite", "a0", "a", "c", "a/a0", "c/a0"
        );
        for (suite, h) in &host.suites {
            println!(
                "  {:<10} {:>8.1} {:>8.1} {:>8.1} {:>7.3} {:>7.3}  c/a0 <= {:.2} {}",
                format!("{suite:?}"),
                h.p50_us_without_lb,
                h.p50_us_floor,
                h.p50_us_bystander,
                h.floor_ratio,
                h.bystander_ratio,
                h.target,
                verdict(h.met)
            );
        }
        if host.foreign_programs > 0 {
            println!(
                "  WARNING: {} cgroup sock_addr programs of others were attached while lb's were not: a0 had the hooks on too",
                host.foreign_programs
            );
        }
    }

    println!("\nProgramming the datapath's dual-stack Services (cold, from manifests)");
    for (scale, p) in &report.programming {
        let ms = |k: &str| p["breakdown_ms"][k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {scale:>6} Services, {:>6} frontends: sync {:.0} ms (read {:.0}, model {:.0}, apply {:.0}); start to synced {} ms; RSS {:.1} MiB",
            p["frontends"],
            p["sync_ms"].as_f64().unwrap_or(f64::NAN),
            ms("read"),
            ms("model"),
            ms("apply"),
            p["wall_ms"],
            p["rss_mib"].as_f64().unwrap_or(f64::NAN),
        );
    }
    println!("\nThroughput, TCP over IPv4, 2 concurrent clients (connects/s)");
    for (name, rate) in &report.throughput_connects_per_s {
        println!("  {name:<8} {rate:>10.0}");
    }
    if let Some(cp) = &report.control_plane {
        print_control_plane(cp);
    }
    if let Some(real_api) = &report.real_api {
        super::real_api::print(real_api);
    }

    println!(
        "\nLoad average (1, 5, 15 min) at the start: {}; at the end: {}",
        report.load_average[0], report.load_average[1]
    );

    println!("\nTargets");
    let mut missed = Vec::new();
    let mut total = 0;
    for (suite, scales) in &report.datapath {
        for (scale, table) in scales {
            for (config, l) in table {
                if l.met == Some(false) {
                    missed.push(format!(
                        "{:?} {} at {scale}: {:.3}",
                        suite,
                        config.label(),
                        l.ratio
                    ));
                }
                total += usize::from(l.met.is_some());
            }
        }
    }
    println!(
        "  datapath ratios, every suite and scale: {} of {total} met{}",
        total - missed.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!("; MISSED: {}", missed.join(", "))
        }
    );
    if let Some(host) = &report.host {
        let missed: Vec<String> = host
            .suites
            .iter()
            .filter(|(_, h)| !h.met)
            .map(|(s, h)| format!("{s:?} {:.3}", h.bystander_ratio))
            .collect();
        println!(
            "  bystanders against a host without lb (c/a0 <= {:.2}): {} of {} met{}",
            super::host::TARGET,
            host.suites.len() - missed.len(),
            host.suites.len(),
            if missed.is_empty() {
                String::new()
            } else {
                format!("; MISSED: {}", missed.join(", "))
            }
        );
    }
    if let Some(cp) = &report.control_plane {
        let (m, a) = (&cp.manifests, &cp.api);
        if cp.services != 10_000 {
            println!(
                "  (the control plane ran at {} Services; its targets are for 10 000)",
                cp.services
            );
        }
        target(
            "cold from manifests, read + model + apply",
            m.cold_ms.total(),
            500.0,
            "ms",
            "",
        );
        target(
            "cold from the API, model + apply",
            a.cold_ms.model + a.cold_ms.apply,
            100.0,
            "ms",
            "",
        );
        target(
            "a file changed among the manifests: p99, renamed → maps written",
            m.changes.latency_p99_ms,
            20.0,
            "ms",
            "",
        );
        target(
            "an API event: p99, pushed → maps written",
            a.changes.latency_p99_ms,
            5.0,
            "ms",
            "",
        );
        for (source, run) in [("manifests", m), ("the API", a)] {
            let rss = &run.rss_mib;
            target(
                &format!("RSS from {source}"),
                rss.max(),
                64.0,
                "MiB",
                &format!(
                    " (after cold {:.1}, after a resync {:.1}, after the changes {:.1})",
                    rss.after_cold, rss.after_resync, rss.after_changes
                ),
            );
        }
    }
}

/// One target line: `what <= limit unit: value met` (or MISSED), then `detail`.
fn target(what: &str, value: f64, limit: f64, unit: &str, detail: &str) {
    let shown = match value {
        v if v < 10.0 => format!("{v:.2}"),
        v if v < 100.0 => format!("{v:.1}"),
        v => format!("{v:.0}"),
    };
    println!(
        "  {what} <= {limit} {unit}: {shown} {}{detail}",
        verdict(value <= limit)
    );
}

fn print_control_plane(cp: &ControlPlane) {
    println!(
        "\nControl plane: {} IPv4 Services × {} endpoints, one TCP port (manifests: {} files of up \
         to {} Services; agent resyncs every {} s)",
        cp.services,
        cp.endpoints_per_service,
        cp.manifest_files,
        cp.services_per_file,
        cp.resync_interval_s
    );
    println!("  {:<46} {:>24} {:>24}", "", "manifests", "API");
    let row = |what: &str, value: &dyn Fn(&SourceRun) -> String| {
        println!(
            "  {what:<46} {:>24} {:>24}",
            value(&cp.manifests),
            value(&cp.api)
        );
    };
    let phases = |p: &Phases| format!("{:.1} / {:.1} / {:.1}", p.read, p.model, p.apply);
    row("cold: start → synced (ms)", &|r| {
        r.cold_wall_ms.to_string()
    });
    row("cold sync: read + model + apply (ms)", &|r| {
        format!("{:.0}", r.cold_ms.total())
    });
    row("  read / model / apply (ms)", &|r| phases(&r.cold_ms));
    row("changes: written → maps written, p50 (ms)", &|r| {
        format!("{:.2}", r.changes.latency_p50_ms)
    });
    row("  p99 / max (ms)", &|r| {
        format!(
            "{:.2} / {:.2}",
            r.changes.latency_p99_ms, r.changes.latency_max_ms
        )
    });
    row("  sync p50: read / model / apply (ms)", &|r| {
        phases(&r.changes.sync_p50_ms)
    });
    row("  sync p99: read / model / apply (ms)", &|r| {
        phases(&r.changes.sync_p99_ms)
    });
    row("  changes timed, pauses for a resync", &|r| {
        format!("{}, {}", r.changes.count, r.changes.resyncs_awaited)
    });
    row("RSS after cold / a resync / changes (MiB)", &|r| {
        format!(
            "{:.1} / {:.1} / {:.1}",
            r.rss_mib.after_cold, r.rss_mib.after_resync, r.rss_mib.after_changes
        )
    });
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

pub fn machine() -> BTreeMap<&'static str, String> {
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
