//! The reconciler: keeps the wanted state of every frontend and brings the maps to it. A frontend
//! whose write failed (a full map, too many backends, a transient error) is retried with backoff
//! until it is programmed, and [`Reconciler::resync`] compares the maps with the wanted state and
//! repairs what was changed behind the agent's back. Time is passed in, so tests drive it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use super::{ApplyReport, Dataplane, MapStore, ResyncReport};
use crate::model::{DesiredFrontends, Frontend, FrontendState};

/// First retry of a failed frontend; each further one waits twice as long, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Repairs of one resync logged one by one (of frontends, and of other entries); the rest are
/// counted.
const MAX_REPAIRS_LOGGED: usize = 20;

/// A frontend whose wanted state is not in the maps.
#[derive(Clone, Debug)]
struct Failure {
    reason: String,
    attempts: u32,
    retry_at: Instant,
}

pub struct Reconciler<S> {
    dataplane: Dataplane<S>,
    failing: BTreeMap<Frontend, Failure>,
    counts: Counts,
}

/// What the reconciler did since it started (for the metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Failing frontends written again when their backoff expired.
    pub retries: u64,
    /// Failing frontends that were programmed after all.
    pub recoveries: u64,
}

impl<S: MapStore> Reconciler<S> {
    pub fn new(dataplane: Dataplane<S>) -> Self {
        Self {
            dataplane,
            failing: BTreeMap::new(),
            counts: Counts::default(),
        }
    }

    /// Frontends whose wanted state is not in the maps because their last write failed.
    pub fn failing(&self) -> usize {
        self.failing.len()
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    pub fn dataplane(&self) -> &Dataplane<S> {
        &self.dataplane
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane<S> {
        &mut self.dataplane
    }

    /// The first full view: the maps are brought to it, and what it lacks is removed.
    pub fn program_all(&mut self, wanted: &impl DesiredFrontends, now: Instant) -> ApplyReport {
        let report = self.dataplane.apply(wanted);
        self.note(wanted, &report, |_| true, now);
        report
    }

    /// Changed frontends (`None`: gone), as `wanted` now has them; the others stay as they are.
    pub fn apply_changes(
        &mut self,
        wanted: &impl DesiredFrontends,
        changed: &BTreeMap<Frontend, Option<FrontendState>>,
        now: Instant,
    ) -> ApplyReport {
        let report = self.dataplane.apply_changes(changed);
        self.note(wanted, &report, |f| changed.contains_key(f), now);
        report
    }

    /// When the next retry is due, if any frontend is failing.
    pub fn next_retry(&self) -> Option<Instant> {
        self.failing.values().map(|f| f.retry_at).min()
    }

    /// Retries the failing frontends whose backoff has passed; `None` when none was due.
    pub fn retry(&mut self, wanted: &impl DesiredFrontends, now: Instant) -> Option<ApplyReport> {
        let due: BTreeMap<Frontend, Option<FrontendState>> = self
            .failing
            .iter()
            .filter(|(_, f)| f.retry_at <= now)
            .map(|(frontend, _)| (*frontend, wanted.frontend(frontend).cloned()))
            .collect();
        if due.is_empty() {
            return None;
        }
        self.counts.retries += due.len() as u64;
        let report = self.dataplane.apply_changes(&due);
        self.note(wanted, &report, |f| due.contains_key(f), now);
        Some(report)
    }

    /// Compares the maps with the wanted state and repairs any difference (failing frontends are
    /// retried too). Every repair is logged.
    pub fn resync(
        &mut self,
        wanted: &impl DesiredFrontends,
        now: Instant,
    ) -> anyhow::Result<ResyncReport> {
        let report = self.dataplane.resync(wanted)?;
        for (frontend, what) in report.frontends.iter().take(MAX_REPAIRS_LOGGED) {
            let service = wanted
                .frontend(frontend)
                .map(|s| s.service.to_string())
                .unwrap_or_else(|| "no Service".into());
            warn!(%frontend, %service, "repaired drift in the maps: {what}");
        }
        for what in report.entries.iter().take(MAX_REPAIRS_LOGGED) {
            warn!("repaired drift in the maps: {what}");
        }
        let unlogged = report.frontends.len().saturating_sub(MAX_REPAIRS_LOGGED)
            + report.entries.len().saturating_sub(MAX_REPAIRS_LOGGED);
        if unlogged > 0 {
            warn!(
                frontends = report.frontends.len(),
                entries = report.entries.len(),
                "repaired drift in the maps: {unlogged} more repairs not logged one by one"
            );
        }
        // A resync applies every frontend, wanted or failing.
        self.note(wanted, &report.apply, |_| true, now);
        Ok(report)
    }

    /// Records what an apply did: failures (logged when new) get a retry time; failing
    /// frontends that were `attempted` and did not fail again are logged as recovered.
    fn note(
        &mut self,
        wanted: &impl DesiredFrontends,
        report: &ApplyReport,
        attempted: impl Fn(&Frontend) -> bool,
        now: Instant,
    ) {
        let failed: BTreeMap<&Frontend, &String> =
            report.failed.iter().map(|(f, r)| (f, r)).collect();
        let recovered: Vec<Frontend> = self
            .failing
            .keys()
            .filter(|f| attempted(f) && !failed.contains_key(f))
            .copied()
            .collect();
        for frontend in recovered {
            let failure = self.failing.remove(&frontend).expect("listed");
            if wanted.frontend(&frontend).is_some() {
                self.counts.recoveries += 1;
                info!(
                    %frontend,
                    attempts = failure.attempts,
                    "recovered: programmed after failing ({})",
                    failure.reason
                );
            } else {
                debug!(%frontend, "failing frontend is no longer wanted");
            }
        }
        for (frontend, reason) in failed {
            let failure = self.failing.entry(*frontend).or_insert_with(|| {
                error!(%frontend, "not programmed, kept as it was: {reason}; retrying with backoff");
                Failure {
                    reason: reason.clone(),
                    attempts: 0,
                    retry_at: now,
                }
            });
            failure.attempts += 1;
            if failure.attempts > 1 {
                debug!(%frontend, attempts = failure.attempts, "still failing: {reason}");
            }
            failure.reason = reason.clone();
            failure.retry_at = now + backoff(failure.attempts);
        }
    }
}

/// The wait after the `attempts`-th failure.
fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}
