//! The control plane at the largest scale: cold programming from manifests and from the API
//! server, endpoint-change latency (event pushed → maps written) and the agent's memory.
//!
//! It programs the Services its targets were set for, unchanged since: IPv4 Services with one TCP
//! port and one EndpointSlice of 10 endpoints ([`ipv4_manifests`]). The datapath's dual-stack
//! Services (four frontends each) are timed as they are programmed (see `super::run`).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use xtask::testbed::{
    Testbed,
    fake_api::{ENDPOINT_SLICES, FakeApi, SERVICES},
    metrics::Metrics,
    probe::now_us,
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
    let started = now_us();
    let synced = tb.start_agent()?.metrics()?;
    cp.insert(wall_key, json!(wall_ms(started, &synced)?));
    cp.insert(sync_key, json!(sync_ms(&synced)?));
    cp.insert(breakdown_key, breakdown(&synced)?);
    sleep_for_trim();
    rss_mib(tb.agent().pid())
}

/// From `started` (µs since the epoch) to the end of the agent's last sync, in milliseconds.
pub fn wall_ms(started: u64, synced: &Metrics) -> anyhow::Result<u64> {
    Ok(synced.last_sync_us()?.saturating_sub(started) / 1000)
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
        let before = agent.metrics()?;
        let pushed = now_us();
        api.push_event(
            ENDPOINT_SLICES,
            &json!({"type": "MODIFIED", "object": slice}),
        );
        // Only the pushed event makes the agent sync: the next sync is the one that applied it.
        let synced = agent.wait_synced(before.syncs()?, Duration::from_secs(5))?;
        let (now, then) = (synced.frontend_writes()?, before.frontend_writes()?);
        let written: [u64; 3] = std::array::from_fn(|i| now[i] - then[i]);
        ensure!(
            written == [0, 1, 0],
            "unexpected sync for a one-endpoint change: frontends added, updated, removed: \
             {written:?}"
        );
        latencies.push(synced.last_sync_us()?.saturating_sub(pushed) * 1000);
        applies.push((synced.last_sync_ms("apply")? * 1e6).round() as u64);
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

/// The last sync's time (read + model + apply), in milliseconds.
pub fn sync_ms(synced: &Metrics) -> anyhow::Result<f64> {
    let phases = ["read", "model", "apply"].map(|p| synced.last_sync_ms(p));
    phases.into_iter().sum()
}

/// The last sync's time by phase, in milliseconds.
pub fn breakdown(synced: &Metrics) -> anyhow::Result<Value> {
    Ok(json!({
        "read": synced.last_sync_ms("read")?,
        "model": synced.last_sync_ms("model")?,
        "apply": synced.last_sync_ms("apply")?,
    }))
}

/// The agent releases freed memory just after its first sync; read RSS once it has.
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
