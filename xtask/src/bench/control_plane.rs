//! The control plane at the largest scale, from each source in turn (manifest files, then a
//! stand-in API server): cold programming, endpoint-change latency (a change written → maps
//! written) and the agent's memory.
//!
//! It programs the Services its targets were set for: IPv4 Services with one TCP port and one
//! EndpointSlice of 10 endpoints ([`ipv4_manifests`]). The datapath's dual-stack Services (four
//! frontends each) are timed as they are programmed (see `super::run`).
//!
//! One agent run per source, on maps just reset:
//! 1. **Cold start**: agent start → the first sync's end (wall), and that sync's phases from the
//!    agent's `lb_last_sync_duration_seconds{phase}`: read (the files; nothing from the API),
//!    model, apply (the map writes). RSS once the agent has released what the sync freed.
//! 2. **A periodic resync**, then RSS again. The agent runs with `--resync-interval` [`RESYNC`]
//!    (10 s by default), so that one comes within seconds. The bench sees it rather than guessing
//!    it from the clock: it deletes one Service's name entry (`LB_SVC_NAMES`, read only by
//!    `lb-agent list`) behind the agent's back, and waits for `lb_drift_repairs_total` to count
//!    the repair.
//! 3. **Endpoint changes** ([`CHANGES`], one at a time): one Service's last endpoint replaced, a
//!    different Service each time. From manifests, the Services are in files of [`PER_FILE`]
//!    (each Service followed by its slice, ~140 KB a file: a file per team or application rather
//!    than one per object or one for the cluster), and a change rewrites one file atomically (a
//!    dot-file renamed into place, as the README asks), timed from just before the rename. From
//!    the API, a watch event, timed from just before the push. Either ends at the sync's
//!    `lb_last_sync_timestamp_seconds`, taken after the map writes. That sync must have updated
//!    exactly one frontend, and `lb-agent list` must show every change at the end.
//!
//!    Changes start only within [`WINDOW`] of a resync seen to end, and otherwise wait for the
//!    next: the agent does everything on one thread, and a change that arrives during a resync
//!    (~150 ms at 10 000 Services) waits for it, which would measure the resync, not the change.
//!    In production that is the fate of a change in roughly (resync time / interval) of cases.
//! 4. RSS once more, after the changes.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use lb_agent::dataplane::{MapStore as _, bpf::BpfMaps, plan::Write};
use serde::Serialize;
use serde_json::json;
use xtask::testbed::{
    Testbed,
    fake_api::{ENDPOINT_SLICES, FakeApi, SERVICES},
    metrics::Metrics,
    probe::now_us,
};

use super::{
    MANIFEST, percentile, step,
    workload::{
        BACKENDS, ECHO_PORT, Replaced, SERVICE_PORT, cluster_ip, endpoint_change, ipv4_api_service,
        ipv4_api_slice, ipv4_manifests, pod_ip,
    },
};

/// Endpoint changes timed, per source.
const CHANGES: usize = 200;
/// Services per manifest file.
const PER_FILE: usize = 100;
/// The agent's `--resync-interval` in this part of the bench.
const RESYNC: Duration = Duration::from_secs(5);
/// Changes start at most this long after a resync was seen to end: the next begins [`RESYNC`]
/// after that one began, and a change takes milliseconds.
const WINDOW: Duration = Duration::from_millis(3_500);
/// A bound on one source's changes, resyncs waited for included.
const CHANGES_TIMEOUT: Duration = Duration::from_secs(180);
/// A bound on one change's sync.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// The control plane's figures (`control_plane` in the JSON).
#[derive(Debug, Serialize)]
pub struct ControlPlane {
    pub services: usize,
    pub endpoints_per_service: u8,
    /// The manifest files the Services are in, and how many Services each holds at most.
    pub manifest_files: usize,
    pub services_per_file: usize,
    /// The agent's `--resync-interval` here.
    pub resync_interval_s: u64,
    pub manifests: SourceRun,
    pub api: SourceRun,
}

/// One source's agent run.
#[derive(Debug, Serialize)]
pub struct SourceRun {
    /// Agent start → the end of its first sync.
    pub cold_wall_ms: u64,
    /// The first sync, by phase.
    pub cold_ms: Phases,
    pub changes: Changes,
    pub rss_mib: Rss,
}

/// A sync's time by phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Phases {
    pub read: f64,
    pub model: f64,
    pub apply: f64,
}

impl Phases {
    /// The last sync's phases (`lb_last_sync_duration_seconds{phase}`).
    pub fn of(synced: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            read: synced.last_sync_ms("read")?,
            model: synced.last_sync_ms("model")?,
            apply: synced.last_sync_ms("apply")?,
        })
    }

    /// Read + model + apply.
    pub fn total(&self) -> f64 {
        self.read + self.model + self.apply
    }
}

/// Endpoint changes, one at a time.
#[derive(Debug, Serialize)]
pub struct Changes {
    pub count: usize,
    /// Change written (renamed into place, or pushed) → maps written.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The change syncs' own phases, each phase's percentile on its own.
    pub sync_p50_ms: Phases,
    pub sync_p99_ms: Phases,
    /// Times the changes paused for the next resync (see [`WINDOW`]).
    pub resyncs_awaited: usize,
}

/// The agent's resident memory, in MiB.
#[derive(Debug, Serialize)]
pub struct Rss {
    pub after_cold: f64,
    pub after_resync: f64,
    pub after_changes: f64,
}

impl Rss {
    pub fn max(&self) -> f64 {
        self.after_cold
            .max(self.after_resync)
            .max(self.after_changes)
    }
}

/// Cold programming, endpoint-change latency and memory at `scale` Services, from manifests and
/// from the API server.
pub fn measure(tb: &mut Testbed, scale: usize) -> anyhow::Result<ControlPlane> {
    let files = scale.div_ceil(PER_FILE);
    tb.agent_flags(&["--resync-interval", &format!("{}s", RESYNC.as_secs())]);

    step(&format!(
        "control plane from manifests: {scale} IPv4 Services × {BACKENDS} endpoints in {files} \
         files; cold start, a resync, {CHANGES} endpoint changes (a file renamed into place each)"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    // The datapath's Services go: this part's replace them.
    match std::fs::remove_file(tb.manifests_dir().join(MANIFEST)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let file_of = |index: usize| {
        let first = index / PER_FILE * PER_FILE;
        (
            format!("services-{:03}.yaml", index / PER_FILE),
            first..(first + PER_FILE).min(scale),
        )
    };
    for file in 0..files {
        let (name, range) = file_of(file * PER_FILE);
        tb.write_manifest(&name, &ipv4_manifests(range, &Replaced::new()))?;
    }
    let manifests = source_run(tb, scale, |tb, index, replaced| {
        let (name, range) = file_of(index);
        tb.write_manifest_timed(&name, &ipv4_manifests(range, replaced))
    })?;

    step(&format!(
        "control plane from the API server: the same Services; cold start, a resync, {CHANGES} \
         endpoint changes (a watch event each)"
    ));
    tb.stop_agent()?;
    tb.agent_command(&["reset"])?;
    let api = FakeApi::start()?;
    for index in 0..scale {
        api.put(SERVICES, ipv4_api_service(index));
        api.put(ENDPOINT_SLICES, ipv4_api_slice(index, &Replaced::new()));
    }
    tb.use_api(&api, None)?;
    let api_run = source_run(tb, scale, |_, index, replaced| {
        let event = json!({"type": "MODIFIED", "object": ipv4_api_slice(index, replaced)});
        let pushed = now_us();
        api.push_event(ENDPOINT_SLICES, &event);
        Ok(pushed)
    })?;
    tb.agent_flags(&[]);

    Ok(ControlPlane {
        services: scale,
        endpoints_per_service: BACKENDS,
        manifest_files: files,
        services_per_file: PER_FILE,
        resync_interval_s: RESYNC.as_secs(),
        manifests,
        api: api_run,
    })
}

/// One change's figures, in nanoseconds: change → maps written, and the sync's phases.
struct Sample {
    latency: u64,
    phases: [u64; 3],
}

/// Starts the agent on its source (`scale` Services, on maps just reset) and measures as the
/// module says. `change(tb, index, replaced)` makes Service `index`'s endpoints those of
/// `replaced` at the source, and returns when, in µs since the epoch.
fn source_run(
    tb: &mut Testbed,
    scale: usize,
    mut change: impl FnMut(&Testbed, usize, &Replaced) -> anyhow::Result<u64>,
) -> anyhow::Result<SourceRun> {
    let started = now_us();
    let synced = tb.start_agent()?.metrics()?;
    check_programmed(&synced, scale)?;
    let cold_wall_ms = wall_ms(started, &synced)?;
    let cold_ms = Phases::of(&synced)?;
    sleep_for_trim();
    let pid = tb.agent().pid();
    let after_cold = rss_mib(pid)?;
    let mut resynced = await_resync(tb)?;
    let after_resync = rss_mib(pid)?;

    let mut replaced = Replaced::new();
    let mut samples = Vec::with_capacity(CHANGES);
    let mut resyncs_awaited = 0;
    let deadline = Instant::now() + CHANGES_TIMEOUT;
    for n in 0..CHANGES {
        ensure!(
            Instant::now() < deadline,
            "{n} endpoint changes of {CHANGES} in {CHANGES_TIMEOUT:?}"
        );
        if resynced.elapsed() > WINDOW {
            resynced = await_resync(tb)?;
            resyncs_awaited += 1;
        }
        let (index, ip) = endpoint_change(n, scale);
        replaced.insert(index, ip);
        let before = tb.agent().metrics()?;
        let changed = change(tb, index, &replaced)?;
        // Nothing else makes the agent sync now: the next sync is the one that applied it.
        let synced = tb.agent().wait_synced(before.syncs()?, CHANGE_TIMEOUT)?;
        let (now, then) = (synced.frontend_writes()?, before.frontend_writes()?);
        let written: [u64; 3] = std::array::from_fn(|i| now[i] - then[i]);
        ensure!(
            written == [0, 1, 0],
            "unexpected sync for a one-endpoint change: frontends added, updated, removed: \
             {written:?}"
        );
        let phases = Phases::of(&synced)?;
        samples.push(Sample {
            latency: synced.last_sync_us()?.saturating_sub(changed) * 1000,
            phases: [phases.read, phases.model, phases.apply].map(|ms| (ms * 1e6).round() as u64),
        });
        if n % 20 == 19 {
            eprint!("    {}/{CHANGES}\r", n + 1);
        }
    }
    eprintln!();
    check_listed(tb, &replaced)?;
    let after_changes = rss_mib(pid)?;
    tb.stop_agent()?;

    let latencies: Vec<u64> = samples.iter().map(|s| s.latency).collect();
    let phase_ms = |p: f64| {
        let [read, model, apply] = std::array::from_fn(|i| {
            let phase: Vec<u64> = samples.iter().map(|s| s.phases[i]).collect();
            percentile(&phase, p) / 1000.0
        });
        Phases { read, model, apply }
    };
    Ok(SourceRun {
        cold_wall_ms,
        cold_ms,
        changes: Changes {
            count: samples.len(),
            latency_p50_ms: percentile(&latencies, 50.0) / 1000.0,
            latency_p99_ms: percentile(&latencies, 99.0) / 1000.0,
            latency_max_ms: percentile(&latencies, 100.0) / 1000.0,
            sync_p50_ms: phase_ms(50.0),
            sync_p99_ms: phase_ms(99.0),
            resyncs_awaited,
        },
        rss_mib: Rss {
            after_cold,
            after_resync,
            after_changes,
        },
    })
}

/// Makes the agent's next periodic resync visible and waits for it: deletes one Service's name
/// entry behind the agent's back (only `lb-agent list` reads names), which a resync repairs and
/// counts in `lb_drift_repairs_total`. Returns when the count was seen: a resync has just ended
/// (and released the memory it used), and the next begins [`RESYNC`] after this one began.
fn await_resync(tb: &mut Testbed) -> anyhow::Result<Instant> {
    let repairs = tb.agent().metrics()?.sum("lb_drift_repairs_total")?;
    let mut maps = BpfMaps::open_pinned(tb.pin_dir())?;
    let (id, _) = *maps.snapshot()?.names.first().context("no name entries")?;
    maps.write(&Write::DeleteName(id))?;
    drop(maps);
    tb.agent().wait_metrics(
        "a periodic resync's repair",
        2 * RESYNC + Duration::from_secs(5),
        |m| Ok(m.sum("lb_drift_repairs_total")? > repairs),
    )?;
    Ok(Instant::now())
}

/// Every Service in `replaced` has its changed endpoint in the maps, as `lb-agent list` shows them.
fn check_listed(tb: &Testbed, replaced: &Replaced) -> anyhow::Result<()> {
    let listing = tb.listing()?;
    let backends: BTreeMap<(String, u16), Vec<(String, u16)>> = listing
        .frontends
        .into_iter()
        .map(|row| {
            let backends = row.backends.into_iter().map(|b| (b.address, b.port));
            let frontend = (row.frontend.address, row.frontend.port);
            (frontend, backends.collect())
        })
        .collect();
    for (&index, ip) in replaced {
        let frontend = (cluster_ip(index).to_string(), SERVICE_PORT);
        let listed = backends
            .get(&frontend)
            .with_context(|| format!("{frontend:?} is not in the maps"))?;
        ensure!(
            listed.contains(&(ip.to_string(), ECHO_PORT))
                && !listed.contains(&(pod_ip(BACKENDS - 1).to_string(), ECHO_PORT)),
            "the change to {frontend:?} did not reach the maps: {listed:?}"
        );
    }
    Ok(())
}

/// Every one of `frontends` is programmed and none is failing.
pub fn check_programmed(synced: &Metrics, frontends: usize) -> anyhow::Result<()> {
    let (programmed, failing) = (
        synced.sum("lb_frontends")?,
        synced.count("lb_frontends_failing")?,
    );
    ensure!(
        programmed == frontends as u64 && failing == 0,
        "not all programmed: {programmed} frontends of {frontends}, {failing} failing"
    );
    Ok(())
}

/// From `started` (µs since the epoch) to the end of the agent's last sync, in milliseconds.
pub fn wall_ms(started: u64, synced: &Metrics) -> anyhow::Result<u64> {
    Ok(synced.last_sync_us()?.saturating_sub(started) / 1000)
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
