//! The benchmark's results: the table it prints and the JSON it writes.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::datapath::{Config, Latency, Suite};

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: BTreeMap<&'static str, String>,
    /// Suite → Services → configuration → latency.
    pub datapath: BTreeMap<Suite, BTreeMap<usize, BTreeMap<Config, Latency>>>,
    /// Services → the cold programming of the datapath's dual-stack Services.
    pub programming: BTreeMap<usize, Value>,
    pub throughput_connects_per_s: BTreeMap<&'static str, f64>,
    pub control_plane: BTreeMap<&'static str, Value>,
    /// The whole run, build excluded.
    pub run_seconds: f64,
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

    println!("\nProgramming the dual-stack Services (4 frontends each), cold");
    for (scale, p) in &report.programming {
        println!("  {scale:>6} Services: {p}");
    }
    println!("\nThroughput, TCP over IPv4, 2 concurrent clients (connects/s)");
    for (name, rate) in &report.throughput_connects_per_s {
        println!("  {name:<8} {rate:>10.0}");
    }
    println!("\nControl plane (IPv4 Services, one TCP port)");
    for (key, value) in &report.control_plane {
        println!("  {key:<30} {value}");
    }

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
    let cp = |k: &str| {
        report
            .control_plane
            .get(k)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    if !report.control_plane.is_empty() {
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
