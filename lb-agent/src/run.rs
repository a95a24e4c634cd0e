//! `lb-agent run`: attach the datapath, then keep its maps in step with a source (the Kubernetes
//! API, or manifest files) until SIGTERM.
//!
//! One pipeline, after Cilium's load-balancer control plane: a source (a task of its own) turns
//! what it reads into model events; the reconcile loop owns the model ([`Cluster`]), applies the
//! events, and hands the frontends that changed to the [`Reconciler`], which writes the maps,
//! retries failed frontends and repairs drift.

use std::{
    pin::pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval_at, sleep_until},
};
use tracing::{debug, info, level_filters::LevelFilter, warn};

use crate::{
    RunArgs, cgroup,
    dataplane::{
        ApplyReport, Dataplane, MapStore,
        bpf::{self, Ended, Terminator},
        reconcile::Reconciler,
    },
    health::{self, Health},
    metrics::{Metrics, SyncPhases},
    model::{Cluster, NodeContext},
    source::{
        Batch, Origins, kube as kube_source,
        manifest::{self, ManifestSource},
    },
};

/// Most events folded into one sync; the rest of a burst goes into the next.
const MAX_BATCH: usize = 10_000;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // A few malloc arenas, not glibc's eight per core: the main thread's, inotify's, and two for
    // the short-lived threads of a large sync (parsing, the model, the plan, map writing), which
    // would otherwise contend for a lock (two arenas made parsing on two threads slower than on
    // one).
    // SAFETY: mallopt only sets an allocator parameter, before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 4) };
    // Large buffers (a file's text, a sync's lists) always in mappings of their own, returned
    // whole when freed; glibc would otherwise raise this threshold after the first such free and
    // put the next ones in the heap, among long-lived objects that keep its pages.
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
    // Setting that fixes the trim threshold too, at 128 KiB: the heap would shrink and grow back
    // at every few frees of a large sync (page faults all the way). At 4 MiB it rarely does, and
    // the arenas of a large sync's worker threads still give back their free top, which nothing
    // else trims (`malloc_trim`, after each sync in `release_freed_memory`, trims the main one).
    // SAFETY: as above.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20) };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run_async(args))
}

/// Batches a source may send ahead of the reconcile loop.
const CHANNEL: usize = 1024;

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    // The source first: a wrong --manifests or kubeconfig fails before the datapath is touched.
    let (tx, rx) = mpsc::channel(CHANNEL);
    let metrics = Arc::new(Metrics::new());
    let mut origins = None;
    let source: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match &args.manifests {
        Some(path) => {
            let source = ManifestSource::new(path, args.node_name.as_deref())?;
            origins = Some(source.origins());
            Box::pin(manifest::follow(source, args.poll_interval, tx))
        }
        None => {
            let client = kube_source::client(args.kubeconfig.as_deref()).await?;
            info!(
                "watching Services and EndpointSlices; the maps stay as they are until both are \
                 listed"
            );
            Box::pin(kube_source::follow(
                client,
                args.node_name.clone(),
                tx,
                metrics.clone(),
            ))
        }
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
    let lru = bpf::LruSizes {
        socket: args.socket_map_entries,
        affinity: args.affinity_map_entries,
    };
    let loaded = bpf::load(
        &args.pin_dir,
        &cgroup,
        ebpf_level,
        lru,
        args.destroy_sockets,
    )?;
    relay_ebpf_logs(loaded.logger)?;
    let attach = loaded.attach;
    let dataplane = Dataplane::adopt(loaded.maps)?;
    // /metrics reads the programs' counters through maps of its own.
    metrics.programs().read_from(
        Box::new(bpf::BpfMaps::open_pinned(&args.pin_dir)?),
        args.metrics_per_service,
    );
    info!(frontends = dataplane.len(), "adopted the pinned maps");

    let health = Health::default();
    health::serve(args.health_addr, health.clone(), metrics.clone()).await?;

    tokio::spawn(source);
    let shutdown = pin!(shutdown_signal()?);
    reconcile(
        Feed {
            batches: rx,
            origins,
        },
        Datapath {
            reconciler: Reconciler::new(dataplane),
            attach: || attach.attach(),
        },
        node,
        &health,
        &metrics,
        args.resync_interval,
        shutdown,
    )
    .await?;
    info!(
        pins = %args.pin_dir.display(),
        "stopping; the datapath stays attached and keeps serving the last programmed state \
         (`lb-agent reset` removes it)"
    );
    Ok(())
}

/// What the source gives the reconcile loop: its batches, and (manifests) where each object is
/// defined.
struct Feed {
    batches: mpsc::Receiver<Batch>,
    origins: Option<Origins>,
}

/// What the reconcile loop drives: the reconciler, which writes the maps, and `attach`, which
/// puts the agent's programs in place once the maps are first programmed.
struct Datapath<S, A> {
    reconciler: Reconciler<S>,
    attach: A,
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

/// The one reconcile loop: the source's events go into the model; each burst is one sync, whose
/// changed frontends the reconciler writes. Nothing is programmed until the source has a full
/// view; then the maps are brought to it in one step, `attach` puts the agent's programs in place
/// (until then an earlier agent's keep translating, with its maps), and the agent is ready. Frontends whose
/// write failed are retried on their backoff timer, and every `resync_interval` the maps are
/// compared with the wanted state and repaired.
async fn reconcile<S: MapStore>(
    feed: Feed,
    datapath: Datapath<S, impl FnOnce() -> anyhow::Result<Option<Terminator>>>,
    node: NodeContext,
    health: &Health,
    metrics: &Metrics,
    resync_interval: Duration,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<()> {
    let Datapath {
        mut reconciler,
        attach,
    } = datapath;
    let mut attach = Some(attach);
    // Ends sockets to removed backends, once the programs are attached (and when that is on).
    let mut terminator: Option<Terminator> = None;
    let Feed {
        batches: mut rx,
        origins,
    } = feed;
    let mut cluster = Cluster::new(node);
    let mut synced = false;
    let mut programmed = false;
    let mut resync = interval_at(
        tokio::time::Instant::now() + resync_interval,
        resync_interval,
    );
    resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The adopted maps' frontends, before the first sync.
    metrics.reconciler(&reconciler);

    loop {
        let retry_at = reconciler.next_retry();
        let retry = async move {
            match retry_at {
                Some(at) => sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            batch = rx.recv() => {
                let Some(first) = batch else {
                    bail!("the source stopped unexpectedly");
                };
                // Coalesce a burst: batches already waiting join this sync.
                let mut batches = vec![first];
                let mut events = batches[0].events.len();
                while events < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(batch) => {
                            events += batch.events.len();
                            batches.push(batch);
                        }
                        Err(_) => break,
                    }
                }
                let mut read: Option<Duration> = None;
                // The earliest change of the burst: the programming latency is its.
                let mut changed_at: Option<SystemTime> = None;
                for batch in batches {
                    synced |= batch.synced;
                    changed_at = changed_at.into_iter().chain(batch.changed_at).min();
                    if let Some(r) = batch.read {
                        read = Some(read.unwrap_or_default() + r);
                    }
                    for event in batch.events {
                        cluster.apply(event);
                    }
                }
                if !synced {
                    continue;
                }
                let started = Instant::now();
                let sync = if programmed { cluster.sync() } else { cluster.sync_all() };
                let model = started.elapsed();
                for problem in &sync.problems {
                    match origins.as_ref().and_then(|o| o.of(&problem.object)) {
                        Some(file) => warn!("{}: {problem}", file.display()),
                        None => warn!("{problem}"),
                    }
                }
                if programmed && sync.changed.is_empty() && read.is_none() {
                    continue;
                }
                let started = Instant::now();
                let report = if programmed {
                    reconciler.apply_changes(&cluster, &sync.changed, Instant::now())
                } else {
                    // First full view: bring the adopted maps to it, removing what is gone.
                    reconciler.program_all(&cluster, Instant::now())
                };
                let timings = SyncPhases {
                    read: read.unwrap_or_default(),
                    model,
                    apply: started.elapsed(),
                };
                let now = SystemTime::now();
                metrics.sync(timings, now);
                metrics.apply(&report);
                if programmed && let Some(at) = changed_at {
                    metrics.programmed(now.duration_since(at).unwrap_or_default());
                }
                metrics.model(&cluster);
                metrics.reconciler(&reconciler);
                end_sockets(terminator.as_mut(), &report);
                let frontends = reconciler.dataplane().len();
                log_report(&report, frontends, events, sync.services, timings);
                if !programmed {
                    programmed = true;
                    if let Some(attach) = attach.take() {
                        terminator = attach().context(
                            "attaching the programs; the ones attached before keep translating",
                        )?;
                        // Backends that left while no agent ran (the first sync's departures).
                        end_sockets(terminator.as_mut(), &report);
                    }
                    health.set_ready();
                    // The sync's copy of every frontend goes first, so that compacting can
                    // return whole pages.
                    drop(sync);
                    cluster.compact();
                    reconciler.dataplane_mut().compact();
                    release_freed_memory();
                    info!(frontends, "initial sync done; ready");
                }
            }
            _ = retry, if programmed => {
                let started = Instant::now();
                if let Some(report) = reconciler.retry(&cluster, Instant::now()) {
                    metrics.apply(&report);
                    end_sockets(terminator.as_mut(), &report);
                    metrics.reconciler(&reconciler);
                    if report.changed() {
                        let timings = SyncPhases { apply: started.elapsed(), ..Default::default() };
                        log_report(&report, reconciler.dataplane().len(), 0, 0, timings);
                    }
                }
            }
            _ = resync.tick(), if programmed => {
                let started = Instant::now();
                let resynced = reconciler.resync(&cluster, Instant::now());
                // A resync reads every map into memory: hand that back before the next one.
                release_freed_memory();
                if let Ok(report) = &resynced {
                    metrics.apply(&report.apply);
                    end_sockets(terminator.as_mut(), &report.apply);
                    metrics.drift_repaired(report);
                }
                metrics.reconciler(&reconciler);
                match resynced {
                    Ok(report) if report.apply.changed() || !report.entries.is_empty() => {
                        let timings = SyncPhases { apply: started.elapsed(), ..Default::default() };
                        log_report(&report.apply, reconciler.dataplane().len(), 0, 0, timings);
                    }
                    Ok(_) => debug!(
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "maps match the wanted state"
                    ),
                    Err(e) => warn!("comparing the maps with the wanted state: {e:#}"),
                }
            }
        }
    }
}

/// Ends the sockets translated to the backends that left a frontend in `report`, if the
/// terminator is on; a failure is logged (the sockets stay connected, as without it).
fn end_sockets(terminator: Option<&mut Terminator>, report: &ApplyReport) {
    let Some(terminator) = terminator else {
        return;
    };
    if report.departed.is_empty() {
        return;
    }
    let started = Instant::now();
    match terminator.end_sockets(&report.departed) {
        Ok(Ended {
            sockets,
            namespaces,
        }) if sockets > 0 => info!(
            sockets,
            backends = report.departed.len(),
            namespaces,
            elapsed_us = started.elapsed().as_micros() as u64,
            "ended the sockets translated to backends that left their Service"
        ),
        Ok(Ended { namespaces, .. }) => debug!(
            backends = report.departed.len(),
            namespaces,
            elapsed_us = started.elapsed().as_micros() as u64,
            "no socket was translated to the backends that left their Service"
        ),
        Err(e) => warn!(
            "ending the sockets translated to backends that left their Service: {e:#}; they stay \
             connected"
        ),
    }
}

/// Hands the memory freed after a large sync (parsed lists, translations) back to the system;
/// glibc keeps it otherwise, and the agent's RSS would stay at its peak.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
}

fn log_report(
    report: &ApplyReport,
    frontends: usize,
    events: usize,
    services: usize,
    t: SyncPhases,
) {
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;

    use super::*;
    use crate::{
        dataplane::{Snapshot, plan::Write},
        model::{Event, ServiceInput},
    };

    /// Counts writes; holds nothing.
    #[derive(Clone, Default)]
    struct CountingStore(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl MapStore for CountingStore {
        fn write(&mut self, _: &Write) -> anyhow::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }

        fn snapshot(&self) -> anyhow::Result<Snapshot> {
            Ok(Snapshot::default())
        }
    }

    fn web() -> Event {
        let svc: Service = yaml_serde::from_str(
            "metadata: {name: web, namespace: shop}\n\
             spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        )
        .unwrap();
        Event::UpsertService(ServiceInput::parse(&svc).unwrap())
    }

    #[tokio::test]
    async fn nothing_is_programmed_attached_or_ready_until_the_source_is_synced() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let store = CountingStore::default();
        let writes = store.0.clone();
        // How many writes were made when the programs were attached (usize::MAX: not yet).
        let writes_at_attach = std::sync::Arc::new(AtomicUsize::new(usize::MAX));
        let reconciler = Reconciler::new(Dataplane::adopt(store).unwrap());
        let health = Health::default();
        let (tx, rx) = mpsc::channel(16);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let looping = {
            let health = health.clone();
            let (writes, writes_at_attach) = (writes.clone(), writes_at_attach.clone());
            tokio::spawn(async move {
                let shutdown = pin!(async {
                    let _ = stopped.await;
                });
                let node = NodeContext::default();
                let attach = || {
                    let previous = writes_at_attach.swap(writes.load(Relaxed), Relaxed);
                    assert_eq!(previous, usize::MAX, "attached twice");
                    Ok(None)
                };
                reconcile(
                    Feed {
                        batches: rx,
                        origins: None,
                    },
                    Datapath { reconciler, attach },
                    node,
                    &health,
                    &Metrics::default(),
                    Duration::from_secs(3600),
                    shutdown,
                )
                .await
            })
        };
        let settle = || tokio::time::sleep(Duration::from_millis(20));

        // A partial view (a list still coming in, a file not read yet): nothing happens.
        let partial = Batch {
            events: vec![web()],
            ..Default::default()
        };
        tx.send(partial).await.unwrap();
        settle().await;
        assert!(!health.is_ready());
        assert_eq!(writes.load(Relaxed), 0);
        assert_eq!(writes_at_attach.load(Relaxed), usize::MAX, "attached early");

        // The source has its full view: the model is programmed, then the programs are attached
        // (the earlier agent's translated until then), then the agent is ready.
        let complete = Batch {
            synced: true,
            ..Default::default()
        };
        tx.send(complete).await.unwrap();
        settle().await;
        assert!(health.is_ready());
        let written = writes.load(Relaxed);
        assert!(written > 0);
        assert_eq!(
            writes_at_attach.load(Relaxed),
            written,
            "attached before the maps were written"
        );

        stop.send(()).unwrap();
        looping.await.unwrap().unwrap();
    }
}
