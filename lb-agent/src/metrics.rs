//! The agent's Prometheus metrics, served as `/metrics` on the health address in the Prometheus
//! text format (0.0.4).
//!
//! [`Metrics`] owns the registry and a handle to each metric; the reconcile loop records every
//! sync, retry and resync in it. A new metric is a field here, registered in [`Metrics::new`].
//! Names follow Prometheus conventions: the `lb_` prefix, base units in the name (`_seconds`),
//! `_total` on counters (added by the encoder).

use std::{
    sync::atomic::AtomicU64,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::dataplane::{ApplyReport, MapStore, reconcile::Reconciler};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = [(&'static str, &'static str); 1];
type SecondsGauge = Gauge<f64, AtomicU64>;

/// Where a sync's time went: reading the source, the model, writing the maps.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncPhases {
    pub read: Duration,
    pub model: Duration,
    pub apply: Duration,
}

pub struct Metrics {
    registry: Registry,
    syncs: Counter,
    last_sync_timestamp: SecondsGauge,
    last_sync_duration: Family<Labels, SecondsGauge>,
    frontends: Gauge,
    frontends_failing: Gauge,
    frontend_writes: Family<Labels, Counter>,
    write_failures: Counter,
    write_retries: Counter,
    write_recoveries: Counter,
    drift_repairs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("lb"),
            syncs: Counter::default(),
            last_sync_timestamp: SecondsGauge::default(),
            last_sync_duration: Family::default(),
            frontends: Gauge::default(),
            frontends_failing: Gauge::default(),
            frontend_writes: Family::default(),
            write_failures: Counter::default(),
            write_retries: Counter::default(),
            write_recoveries: Counter::default(),
            drift_repairs: Counter::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "syncs",
            "Syncs of the maps with the model (the first, cold one included): one per burst of \
             source events once the source has a full view",
            metrics.syncs.clone(),
        );
        registry.register_with_unit(
            "last_sync_timestamp",
            "When the last sync finished writing the maps, in seconds since the Unix epoch",
            Unit::Seconds,
            metrics.last_sync_timestamp.clone(),
        );
        registry.register_with_unit(
            "last_sync_duration",
            "How long the last sync took, by phase: reading the source, the model, writing the \
             maps",
            Unit::Seconds,
            metrics.last_sync_duration.clone(),
        );
        registry.register(
            "frontends",
            "Frontends (ClusterIP, port, protocol) programmed in the maps",
            metrics.frontends.clone(),
        );
        registry.register(
            "frontends_failing",
            "Frontends whose last write failed: they keep their previous programming and are \
             retried with backoff",
            metrics.frontends_failing.clone(),
        );
        registry.register(
            "frontend_writes",
            "Frontends written to the maps, by change: added, updated, removed",
            metrics.frontend_writes.clone(),
        );
        registry.register(
            "write_failures",
            "Frontend writes that failed (every attempt, retries included)",
            metrics.write_failures.clone(),
        );
        registry.register(
            "write_retries",
            "Failing frontends written again when their backoff expired",
            metrics.write_retries.clone(),
        );
        registry.register(
            "write_recoveries",
            "Failing frontends that were programmed after all",
            metrics.write_recoveries.clone(),
        );
        registry.register(
            "drift_repairs",
            "Map entries found changed or deleted behind the agent's back and repaired (per \
             frontend, and per entry no frontend reaches)",
            metrics.drift_repairs.clone(),
        );
        // Every label value exists from the start: a series that appears late breaks rate().
        for change in ["added", "updated", "removed"] {
            let _ = metrics.frontend_writes.get_or_create(&[("change", change)]);
        }
        metrics
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }

    /// A sync of the maps with the model, finished `at`.
    pub fn sync(&self, phases: SyncPhases, at: SystemTime) {
        self.syncs.inc();
        let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
        self.last_sync_timestamp.set(since_epoch.as_secs_f64());
        for (phase, took) in [
            ("read", phases.read),
            ("model", phases.model),
            ("apply", phases.apply),
        ] {
            self.last_sync_duration
                .get_or_create(&[("phase", phase)])
                .set(took.as_secs_f64());
        }
    }

    /// What one apply (of a sync, a retry or a resync) wrote and failed to write.
    pub fn apply(&self, report: &ApplyReport) {
        for (change, n) in [
            ("added", report.added),
            ("updated", report.updated),
            ("removed", report.removed),
        ] {
            self.frontend_writes
                .get_or_create(&[("change", change)])
                .inc_by(n as u64);
        }
        self.write_failures.inc_by(report.failed.len() as u64);
    }

    /// Repairs a resync made.
    pub fn drift_repaired(&self, repairs: usize) {
        self.drift_repairs.inc_by(repairs as u64);
    }

    /// The reconciler's state and totals, after anything it did.
    pub fn reconciler<S: MapStore>(&self, reconciler: &Reconciler<S>) {
        self.frontends.set(reconciler.dataplane().len() as i64);
        self.frontends_failing.set(reconciler.failing() as i64);
        let counts = reconciler.counts();
        // Totals kept by the reconciler; the loop is the one writer, so get-then-add is exact.
        self.write_retries
            .inc_by(counts.retries.saturating_sub(self.write_retries.get()));
        self.write_recoveries.inc_by(
            counts
                .recoveries
                .saturating_sub(self.write_recoveries.get()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of `text` whose name starts with `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(name))
            .collect()
    }

    #[test]
    fn every_series_is_exported_from_the_start_under_its_conventional_name() {
        let text = Metrics::new().encode();
        for sample in [
            "lb_syncs_total 0",
            "lb_last_sync_timestamp_seconds 0.0",
            "lb_frontends 0",
            "lb_frontends_failing 0",
            "lb_frontend_writes_total{change=\"added\"} 0",
            "lb_frontend_writes_total{change=\"updated\"} 0",
            "lb_frontend_writes_total{change=\"removed\"} 0",
            "lb_write_failures_total 0",
            "lb_write_retries_total 0",
            "lb_write_recoveries_total 0",
            "lb_drift_repairs_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "no {sample:?} in\n{text}"
            );
        }
        assert!(text.contains("# TYPE lb_syncs_total counter\n"), "{text}");
        assert!(text.contains("# TYPE lb_frontends gauge\n"), "{text}");
    }

    #[test]
    fn a_sync_records_its_time_with_microsecond_precision_and_its_phases() {
        let metrics = Metrics::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_764_151_234_567_891);
        let phases = SyncPhases {
            read: Duration::from_millis(250),
            model: Duration::from_micros(1_500),
            apply: Duration::from_millis(40),
        };
        metrics.sync(phases, at);
        metrics.sync(phases, at);
        let text = metrics.encode();
        assert_eq!(samples(&text, "lb_syncs_total"), ["lb_syncs_total 2"]);
        let stamp: f64 = samples(&text, "lb_last_sync_timestamp_seconds")[0]
            .split_once(' ')
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert_eq!((stamp * 1e6).round() as u64, 1_764_151_234_567_891);
        let mut durations = samples(&text, "lb_last_sync_duration_seconds");
        durations.sort();
        assert_eq!(
            durations,
            [
                "lb_last_sync_duration_seconds{phase=\"apply\"} 0.04",
                "lb_last_sync_duration_seconds{phase=\"model\"} 0.0015",
                "lb_last_sync_duration_seconds{phase=\"read\"} 0.25",
            ]
        );
    }

    #[test]
    fn applies_count_frontend_writes_by_change_and_failed_writes() {
        let metrics = Metrics::new();
        let frontend = crate::model::Frontend {
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: crate::model::Protocol::Tcp,
        };
        metrics.apply(&ApplyReport {
            added: 3,
            updated: 1,
            removed: 0,
            failed: vec![(frontend, "map LB4_SERVICES is full".into())],
            departed: vec![],
        });
        metrics.apply(&ApplyReport {
            added: 1,
            ..Default::default()
        });
        let text = metrics.encode();
        for sample in [
            "lb_frontend_writes_total{change=\"added\"} 4",
            "lb_frontend_writes_total{change=\"updated\"} 1",
            "lb_frontend_writes_total{change=\"removed\"} 0",
            "lb_write_failures_total 1",
        ] {
            assert!(
                text.lines().any(|l| l == sample),
                "no {sample:?} in\n{text}"
            );
        }
    }
}
