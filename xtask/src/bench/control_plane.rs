//! The control plane at the largest scale: cold programming from manifests and from the API
//! server, endpoint-change latency (event pushed → maps written) and the agent's memory.
//!
//! It programs the Services its targets were set for, unchanged since: IPv4 Services with one TCP
//! port and one EndpointSlice of 10 endpoints ([`ipv4_manifests`]). The datapath's dual-stack
//! Services (four frontends each) are timed as they are programmed (see `super::run`).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use xtask::testbed::{
    Testbed,
    agent::SYNCED,
    fake_api::{ENDPOINT_SLICES, FakeApi, SERVICES},
};

use super::{
    MANIFEST, percentile, step,
    workload::{BACKENDS, ipv4_api_objects, ipv4_manifests},
};

/// Endpoint changes timed.
const CHANGES: usize = 200;

/// Starts the agent on maps just reset and records, under `keys` (wall, sync, breakdown), how long
/// it took from start to programmed; returns its RSS in MiB once it has released what the sync
/// freed.
fn cold_start(
    tb: &mut Testbed,
    cp: &mut BTreeMap<&'static str, Value>,
    [wall_key, sync_key, breakdown_key]: [&'static str; 3],
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let agent = tb.start_agent()?;
    let wall = started.elapsed();
    let line = agent.wait_for(SYNCED, 0, Duration::from_secs(1))?;
    cp.insert(wall_key, json!(wall.as_millis() as u64));
    cp.insert(sync_key, json!(sync_ms(&line)));
    cp.insert(breakdown_key, breakdown(&line));
    sleep_for_trim();
    rss_mib(tb.agent().pid())
}

/// Cold programming, endpoint-change latency and memory at `scale` Services.
pub fn measure(tb: &mut Testbed, scale: usize) -> anyhow::Result<BTreeMap<&'static str, Value>> {
    let mut cp = BTreeMap::new();

    step(&format!(
        "control plane: cold start from manifests, {scale} IPv4 Services × {BACKENDS} endpoints"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    tb.write_manifest(MANIFEST, &ipv4_manifests(scale))?;
    let rss = cold_start(
        tb,
        &mut cp,
        [
            "manifests_cold_wall_ms",
            "manifests_cold_sync_ms",
            "manifests_cold_breakdown_ms",
        ],
    )?;
    cp.insert("manifests_rss_mib", json!(rss));

    step(&format!(
        "control plane: cold start from the API server, {scale} Services"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    let api = FakeApi::start()?;
    let (services, slices) = ipv4_api_objects(scale);
    for s in services {
        api.put(SERVICES, s);
    }
    for s in &slices {
        api.put(ENDPOINT_SLICES, s.clone());
    }
    tb.use_api(&api, None)?;
    let rss = cold_start(
        tb,
        &mut cp,
        [
            "api_cold_wall_ms",
            "api_cold_sync_ms",
            "api_cold_breakdown_ms",
        ],
    )?;
    cp.insert("api_rss_after_cold_mib", json!(rss));

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
    Ok(cp)
}

/// A `key=123` field of a log line.
pub fn field(line: &str, key: &str) -> anyhow::Result<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {key} in {line:?}"))
}

/// A sync's time (read + model + apply) from its log line, in milliseconds.
pub fn sync_ms(line: &str) -> f64 {
    let total: u64 = ["read_us", "model_us", "apply_us"]
        .iter()
        .filter_map(|k| field(line, k).ok())
        .sum();
    total as f64 / 1000.0
}

pub fn breakdown(line: &str) -> Value {
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
pub fn sleep_for_trim() {
    std::thread::sleep(Duration::from_millis(300));
}

pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024.0)
}
