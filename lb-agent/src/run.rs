//! `lb-agent run`: attach the datapath, then keep its maps in step with a source (the Kubernetes
//! API, or manifest files) until SIGTERM.

use std::{
    collections::BTreeSet,
    path::Path,
    pin::pin,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures::{FutureExt as _, StreamExt as _};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval},
};
use tracing::{debug, error, info, level_filters::LevelFilter, warn};

use crate::{
    RunArgs, cgroup,
    dataplane::{
        ApplyReport, Dataplane,
        bpf::{self, BpfMaps},
    },
    health::{self, Health},
    model::{self, NodeContext},
    source::{
        kube::{self as kube_source, KubeState},
        manifest::{Fingerprint, ManifestSource},
    },
};

/// Most watch events folded into one sync; the rest of a burst goes into the next.
const MAX_BATCH: usize = 10_000;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run_async(args))
}

enum Source {
    Manifests(ManifestSource),
    Kube(kube::Client),
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    // The source first: a wrong --manifests or kubeconfig fails before the datapath is touched.
    let source = match &args.manifests {
        Some(path) => Source::Manifests(ManifestSource::new(path)?),
        None => Source::Kube(kube_source::client(args.kubeconfig.as_deref()).await?),
    };
    let node = NodeContext {
        name: args.node_name.clone(),
        zone: None,
        service_proxy_name: args.service_proxy_name.clone(),
    };
    if node.name.is_none() {
        warn!(
            "no --node-name (NODE_NAME): Services with internalTrafficPolicy: Local refuse \
             connects, and topology hints are ignored"
        );
    }

    let cgroup = match &args.cgroup {
        Some(dir) => dir.clone(),
        None => cgroup::cgroup2_mount()?,
    };
    // The program's debug events cost a ring-buffer write per connect: only with debug logging.
    let ebpf_level = if LevelFilter::current() >= LevelFilter::DEBUG {
        aya_log::Level::Debug
    } else {
        aya_log::Level::Info
    };
    let loaded = bpf::load_and_attach(&args.pin_dir, &cgroup, ebpf_level, args.socket_map_entries)?;
    relay_ebpf_logs(loaded.logger)?;
    let mut dataplane = Dataplane::adopt(loaded.maps)?;
    info!(frontends = dataplane.len(), "adopted the pinned maps");

    let health = Health::default();
    health::serve(args.health_addr, health.clone()).await?;

    let shutdown = pin!(shutdown_signal()?);
    match source {
        Source::Manifests(source) => {
            follow_manifests(source, &mut dataplane, node, &args, &health, shutdown).await
        }
        Source::Kube(client) => follow_kube(client, &mut dataplane, node, &health, shutdown).await,
    }?;
    info!(
        pins = %args.pin_dir.display(),
        "stopping; the datapath stays attached and keeps serving the last programmed state \
         (`lb-agent reset` removes it)"
    );
    Ok(())
}

fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    })
}

/// Forwards the eBPF program's log events to our log, in a task of its own.
fn relay_ebpf_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> anyhow::Result<()> {
    // SAFETY: the logger owns the ring buffer's fd and lives inside the AsyncFd, so the fd stays
    // open for as long as it is registered.
    let mut logs = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the eBPF log buffer")?;
    tokio::spawn(async move {
        while let Ok(mut guard) = logs.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Follows the Kubernetes API. Nothing is programmed until Services, EndpointSlices (and this
/// node's Node) have all been listed; from then on each burst of events is one partial apply.
async fn follow_kube(
    client: kube::Client,
    dataplane: &mut Dataplane<BpfMaps>,
    node: NodeContext,
    health: &Health,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let mut updates = kube_source::watch(client, node.name.as_deref());
    let mut state = KubeState::new(node);
    let mut failing = BTreeSet::new();
    let mut programmed = false;
    info!("watching Services and EndpointSlices; the maps stay as they are until both are listed");

    loop {
        let first = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            update = updates.next() => update,
        };
        let Some(first) = first else {
            bail!("the Kubernetes watches ended unexpectedly");
        };
        let mut events = 1;
        let mut handle = |update: kube_source::Update, state: &mut KubeState| match update.change {
            Ok(change) => {
                if failing.remove(&update.kind) {
                    info!(kind = update.kind.as_str(), "watch recovered");
                }
                state.apply(change);
            }
            Err(e) => {
                if failing.insert(update.kind) {
                    warn!(
                        kind = update.kind.as_str(),
                        "watch failed: {e}; retrying with backoff; the datapath keeps the last \
                         programmed state"
                    );
                } else {
                    debug!(kind = update.kind.as_str(), "watch still failing: {e}");
                }
            }
        };
        handle(first, &mut state);
        // Coalesce a burst: events already waiting join this sync.
        while events < MAX_BATCH {
            match updates.next().now_or_never() {
                Some(Some(update)) => {
                    handle(update, &mut state);
                    events += 1;
                }
                _ => break,
            }
        }
        if !state.synced() {
            continue;
        }

        let started = Instant::now();
        let sync = state.cluster.sync();
        let model = started.elapsed();
        for problem in &sync.problems {
            warn!("{problem}");
        }
        if programmed && sync.changed.is_empty() {
            continue;
        }
        let started = Instant::now();
        let report = if programmed {
            dataplane.apply_changes(&sync.changed)
        } else {
            // First full view: bring the adopted maps to it, removing what is gone.
            dataplane.apply(&state.cluster.state())
        };
        let timings = Timings {
            model,
            apply: started.elapsed(),
            ..Default::default()
        };
        log_report(&report, dataplane.len(), events, sync.services, timings);
        if !programmed {
            programmed = true;
            health.set_ready();
            state.cluster.compact();
            dataplane.compact();
            release_freed_memory();
            info!(frontends = dataplane.len(), "initial sync done; ready");
        }
    }
}

/// Follows manifest files: re-read once their fingerprint has held still for one tick, so a file
/// being written in place is not read half-way.
async fn follow_manifests(
    mut source: ManifestSource,
    dataplane: &mut Dataplane<BpfMaps>,
    node: NodeContext,
    args: &RunArgs,
    health: &Health,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let root = args.manifests.as_deref().unwrap_or(Path::new("."));
    let mut ticker = interval(args.poll_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut applied: Option<Fingerprint> = None;
    let mut pending: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = ticker.tick() => {}
        }
        let fingerprint = match source.fingerprint() {
            Ok(f) => f,
            Err(e) => {
                warn!("checking the manifests: {e:#}");
                continue;
            }
        };
        if applied.as_ref() == Some(&fingerprint) {
            pending = None;
            continue;
        }
        if applied.is_some() && pending.as_ref() != Some(&fingerprint) {
            pending = Some(fingerprint);
            continue;
        }
        sync_manifests(&mut source, dataplane, &node, root);
        applied = Some(fingerprint);
        pending = None;
        health.set_ready();
    }
}

/// Reads the manifests, translates them and applies the difference, reporting every problem with
/// the file it came from.
fn sync_manifests(
    source: &mut ManifestSource,
    dataplane: &mut Dataplane<BpfMaps>,
    node: &NodeContext,
    root: &Path,
) {
    let started = Instant::now();
    let snapshot = match source.load() {
        Ok(s) => s,
        Err(e) => {
            error!("reading manifests: {e:#}; keeping the current state");
            return;
        }
    };
    let read = started.elapsed();
    for problem in &snapshot.errors {
        warn!("{problem}");
    }
    // This node's zone, when the manifests hold its Node.
    let mut node = node.clone();
    node.zone = node
        .name
        .as_ref()
        .and_then(|name| snapshot.zones.get(name).cloned().flatten());
    let started = Instant::now();
    let services = snapshot.services.len();
    let translation = model::translate_inputs(snapshot.services, snapshot.slices, &node);
    let model = started.elapsed();
    for problem in &translation.problems {
        let file = snapshot
            .origins
            .get(&problem.object)
            .map(|p| p.as_path())
            .unwrap_or(root);
        warn!("{}: {problem}", file.display());
    }
    let started = Instant::now();
    let report = dataplane.apply(&translation.state);
    let timings = Timings {
        read,
        model,
        apply: started.elapsed(),
    };
    log_report(&report, dataplane.len(), 1, services, timings);
    source.compact();
    dataplane.compact();
    release_freed_memory();
}

/// Hands the memory freed after a large sync (parsed lists, translations) back to the system;
/// glibc keeps it otherwise, and the agent's RSS would stay at its peak.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
}

/// Where a sync's time went: reading the source, the model, writing the maps.
#[derive(Default)]
struct Timings {
    read: Duration,
    model: Duration,
    apply: Duration,
}

fn log_report(report: &ApplyReport, frontends: usize, events: usize, services: usize, t: Timings) {
    for (frontend, reason) in &report.failed {
        error!(%frontend, "not programmed, kept as it was: {reason}");
    }
    info!(
        frontends,
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        failed = report.failed.len(),
        events,
        services,
        read_us = t.read.as_micros() as u64,
        model_us = t.model.as_micros() as u64,
        apply_us = t.apply.as_micros() as u64,
        "dataplane synced"
    );
}
