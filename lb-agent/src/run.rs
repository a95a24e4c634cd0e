//! `lb-agent run`: attach the datapath, then follow the manifests until SIGTERM.

use std::path::Path;

use anyhow::Context as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval},
};
use tracing::{error, info, level_filters::LevelFilter, warn};

use crate::{
    RunArgs, cgroup,
    dataplane::{Dataplane, MapStore, bpf},
    model,
    source::manifest::{Fingerprint, ManifestSource, ObjectKey},
};

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let mut source = ManifestSource::new(&args.manifests)?;
    let cgroup = match args.cgroup {
        Some(dir) => dir,
        None => cgroup::cgroup2_mount()?,
    };
    // The program's debug events cost a ring-buffer write per connect: only with debug logging.
    let ebpf_level = if LevelFilter::current() >= LevelFilter::DEBUG {
        aya_log::Level::Debug
    } else {
        aya_log::Level::Info
    };
    let loaded = bpf::load_and_attach(&args.pin_dir, &cgroup, ebpf_level)?;
    // SAFETY: the logger owns the ring buffer's fd and lives inside the AsyncFd, so the fd stays
    // open for as long as it is registered.
    let mut ebpf_logs =
        unsafe { AsyncFd::register_with_interest(loaded.logger, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("watching the eBPF log buffer")?;
    let mut dataplane = Dataplane::adopt(loaded.maps)?;
    info!(frontends = dataplane.len(), "adopted the pinned maps");

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut ticker = interval(args.poll_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // Files are read once their fingerprint has held still for one tick, so a file being written
    // in place is not read half-way.
    let mut applied: Option<Fingerprint> = None;
    let mut pending: Option<Fingerprint> = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            guard = ebpf_logs.readable_mut() => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = ticker.tick() => {
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
                sync(&mut source, &mut dataplane, &args.manifests);
                applied = Some(fingerprint);
                pending = None;
            }
        }
    }
    info!(
        pins = %args.pin_dir.display(),
        "stopping; the datapath stays attached and keeps serving the last programmed state \
         (`lb-agent reset` removes it)"
    );
    Ok(())
}

/// Reads the manifests, translates them and applies the difference, reporting every problem with
/// the file it came from.
fn sync<S: MapStore>(source: &mut ManifestSource, dataplane: &mut Dataplane<S>, root: &Path) {
    let snapshot = match source.load() {
        Ok(s) => s,
        Err(e) => {
            error!("reading manifests: {e:#}; keeping the current state");
            return;
        }
    };
    for problem in &snapshot.errors {
        warn!("{problem}");
    }
    let translation = model::translate(
        &snapshot.services,
        &snapshot.slices,
        &model::NodeContext::default(),
    );
    for problem in &translation.problems {
        let file = snapshot
            .origins
            .get(&ObjectKey::from(&problem.object))
            .map(|p| p.as_path())
            .unwrap_or(root);
        warn!("{}: {problem}", file.display());
    }
    let report = dataplane.apply(&translation.state);
    for (frontend, reason) in &report.failed {
        error!(%frontend, "not programmed, kept as it was: {reason}");
    }
    info!(
        frontends = dataplane.len(),
        added = report.added,
        updated = report.updated,
        removed = report.removed,
        failed = report.failed.len(),
        ipv6_skipped = report.skipped_ipv6,
        "dataplane synced"
    );
}
