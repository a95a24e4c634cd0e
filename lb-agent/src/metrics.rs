//! The agent's Prometheus metrics, served as `/metrics` on the health address in the Prometheus
//! text format (0.0.4).
//!
//! [`Metrics`] owns the registry and a handle to each metric; the reconcile loop records every
//! sync, retry and resync in it. A new metric is a field here, registered in [`Metrics::new`].
//! Names follow Prometheus conventions: the `lb_` prefix, base units in the name (`_seconds`),
//! `_total` on counters (added by the encoder).

mod programs;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use programs::{CounterSource, ProgramCounters, Reading};

use lb_common::{MAX_BACKEND_SLOTS, MAX_FRONTENDS, MAX_SERVICES};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    dataplane::{
        ApplyReport, FailureKind, MapStore, ResyncReport,
        bpf::{
            BACKENDS_MAP, BACKENDS6_MAP, MEMBERS_MAP, MEMBERS6_MAP, NAMES_MAP, SERVICES_MAP,
            SERVICES6_MAP,
        },
        reconcile::Reconciler,
    },
    model::Cluster,
};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Labels = [(&'static str, &'static str); 1];
type SecondsGauge = Gauge<f64, AtomicU64>;
type RatioGauge = Gauge<f64, AtomicU64>;

const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// Latency buckets, in seconds: 1 ms to about 65 s, doubling (kube-proxy's programming
/// latency histogram spans the same range).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 17)
}

/// What a drift repair was (`lb_drift_repairs_total`'s `what`).
const DRIFTS: [&str; 3] = ["frontend", "stray_entry", "missing_entry"];

/// The maps whose fill `lb_map_fill_ratio` shows.
const FILLED_MAPS: [&str; 7] = [
    SERVICES_MAP,
    SERVICES6_MAP,
    BACKENDS_MAP,
    BACKENDS6_MAP,
    MEMBERS_MAP,
    MEMBERS6_MAP,
    NAMES_MAP,
];

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
    sync_duration: Histogram,
    last_sync_timestamp: SecondsGauge,
    last_sync_duration: Family<Labels, SecondsGauge>,
    programming_duration: Histogram,
    services: Family<Labels, Gauge>,
    frontends: Family<Labels, Gauge>,
    backends: Family<Labels, Gauge>,
    map_fill: Family<Labels, RatioGauge>,
    frontends_failing: Gauge,
    frontend_writes: Family<Labels, Counter>,
    write_failures: Family<Labels, Counter>,
    write_retries: Counter,
    write_recoveries: Counter,
    drift_repairs: Family<Labels, Counter>,
    watch_failures: Family<Labels, Counter>,
    programs: Arc<ProgramCounters>,
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
            sync_duration: Histogram::new(latency_buckets()),
            last_sync_timestamp: SecondsGauge::default(),
            last_sync_duration: Family::default(),
            programming_duration: Histogram::new(latency_buckets()),
            services: Family::default(),
            frontends: Family::default(),
            backends: Family::default(),
            map_fill: Family::default(),
            frontends_failing: Gauge::default(),
            frontend_writes: Family::default(),
            write_failures: Family::default(),
            write_retries: Counter::default(),
            write_recoveries: Counter::default(),
            drift_repairs: Family::default(),
            watch_failures: Family::default(),
            programs: Arc::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "syncs",
            "Syncs of the maps with the model (the first, cold one included): one per burst of \
             source events once the source has a full view",
            metrics.syncs.clone(),
        );
        registry.register_with_unit(
            "sync_duration",
            "How long syncs took, from the source's read to the maps written",
            Unit::Seconds,
            metrics.sync_duration.clone(),
        );
        registry.register_with_unit(
            "network_programming_duration",
            "From a change (an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time, \
             else when the source saw the change) to the maps written: kube-proxy's \
             kubeproxy_network_programming_duration_seconds",
            Unit::Seconds,
            metrics.programming_duration.clone(),
        );
        registry.register(
            "services",
            "Services with frontends in the model, by IP family (a dual-stack Service counts in \
             both)",
            metrics.services.clone(),
        );
        registry.register(
            "backends",
            "Backend slots programmed in the maps, by IP family (one per backend of each \
             frontend)",
            metrics.backends.clone(),
        );
        registry.register(
            "map_fill_ratio",
            "How full each map the agent writes is: entries over capacity (the LRU maps the \
             programs keep never fill up, and are not listed)",
            metrics.map_fill.clone(),
        );
        registry.register(
            "watch_failures",
            "Kubernetes API watch attempts that failed, by resource: each is retried with \
             backoff (a re-list follows when the resourceVersion expired)",
            metrics.watch_failures.clone(),
        );
        // The programs' counters, read from the maps at each scrape.
        registry.register_collector(Box::new(metrics.programs.clone()));
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
            "Frontends (ClusterIP, port, protocol) programmed in the maps, by IP family",
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
            "Frontend writes that failed (every attempt, retries included), by reason: map_full, \
             too_many_backends, error",
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
            "Differences between the maps and what the agent wrote, found and repaired, by what: \
             frontend (its entry or slots changed or deleted behind the agent's back), \
             stray_entry (an entry no frontend reaches, removed), missing_entry (a member entry \
             written again)",
            metrics.drift_repairs.clone(),
        );
        // Every label value exists from the start: a series that appears late breaks rate().
        for change in ["added", "updated", "removed"] {
            let _ = metrics.frontend_writes.get_or_create(&[("change", change)]);
        }
        for kind in FailureKind::ALL {
            let _ = metrics
                .write_failures
                .get_or_create(&[("reason", kind.as_str())]);
        }
        for what in DRIFTS {
            let _ = metrics.drift_repairs.get_or_create(&[("what", what)]);
        }
        for resource in ["Services", "EndpointSlices", "Node"] {
            let _ = metrics
                .watch_failures
                .get_or_create(&[("resource", resource)]);
        }
        for family in FAMILIES {
            let _ = metrics.services.get_or_create(&[("family", family)]);
            let _ = metrics.frontends.get_or_create(&[("family", family)]);
            let _ = metrics.backends.get_or_create(&[("family", family)]);
        }
        for map in FILLED_MAPS {
            let _ = metrics.map_fill.get_or_create(&[("map", map)]);
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
        self.sync_duration
            .observe((phases.read + phases.model + phases.apply).as_secs_f64());
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
        for (_, message) in &report.failed {
            let reason = FailureKind::of(message).as_str();
            self.write_failures
                .get_or_create(&[("reason", reason)])
                .inc();
        }
    }

    /// The programs' per-frontend counters, which [`encode`](Self::encode) reads.
    pub fn programs(&self) -> &ProgramCounters {
        &self.programs
    }

    /// A change, `took` from when it happened to the maps written.
    pub fn programmed(&self, took: Duration) {
        self.programming_duration.observe(took.as_secs_f64());
    }

    /// Repairs a resync made.
    pub fn drift_repaired(&self, report: &ResyncReport) {
        let written = report.entries.len() - report.stray_entries;
        for (what, n) in [
            ("frontend", report.frontends.len()),
            ("stray_entry", report.stray_entries),
            ("missing_entry", written),
        ] {
            self.drift_repairs
                .get_or_create(&[("what", what)])
                .inc_by(n as u64);
        }
    }

    /// A watch attempt on `resource` failed.
    pub fn watch_failed(&self, resource: &'static str) {
        self.watch_failures
            .get_or_create(&[("resource", resource)])
            .inc();
    }

    /// What the model holds, after a sync.
    pub fn model(&self, cluster: &Cluster) {
        for (family, n) in FAMILIES.into_iter().zip(cluster.services_by_family()) {
            self.services
                .get_or_create(&[("family", family)])
                .set(n as i64);
        }
    }

    /// The reconciler's state and totals, after anything it did.
    pub fn reconciler<S: MapStore>(&self, reconciler: &Reconciler<S>) {
        let [v4, v6] = reconciler.dataplane().stats();
        for (family, stats) in FAMILIES.into_iter().zip([v4, v6]) {
            let gauges = (
                self.frontends.get_or_create(&[("family", family)]),
                self.backends.get_or_create(&[("family", family)]),
            );
            gauges.0.set(stats.frontends as i64);
            gauges.1.set(stats.backends as i64);
        }
        let ratio = |entries: usize, capacity: u32| entries as f64 / f64::from(capacity);
        for (map, fill) in [
            (SERVICES_MAP, ratio(v4.frontends, MAX_SERVICES)),
            (SERVICES6_MAP, ratio(v6.frontends, MAX_SERVICES)),
            (BACKENDS_MAP, ratio(v4.backends, MAX_BACKEND_SLOTS)),
            (BACKENDS6_MAP, ratio(v6.backends, MAX_BACKEND_SLOTS)),
            // A member entry per backend slot.
            (MEMBERS_MAP, ratio(v4.backends, MAX_BACKEND_SLOTS)),
            (MEMBERS6_MAP, ratio(v6.backends, MAX_BACKEND_SLOTS)),
            (NAMES_MAP, ratio(v4.frontends + v6.frontends, MAX_FRONTENDS)),
        ] {
            self.map_fill.get_or_create(&[("map", map)]).set(fill);
        }
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

    /// `text` has the sample line `sample`.
    fn assert_sample(text: &str, sample: &str) {
        assert!(
            text.lines().any(|l| l == sample),
            "no {sample:?} in\n{text}"
        );
    }

    #[test]
    fn every_series_is_exported_from_the_start_under_its_conventional_name() {
        let text = Metrics::new().encode();
        for sample in [
            "lb_syncs_total 0",
            "lb_sync_duration_seconds_count 0",
            "lb_network_programming_duration_seconds_count 0",
            "lb_last_sync_timestamp_seconds 0.0",
            "lb_services{family=\"IPv4\"} 0",
            "lb_services{family=\"IPv6\"} 0",
            "lb_frontends{family=\"IPv4\"} 0",
            "lb_frontends{family=\"IPv6\"} 0",
            "lb_backends{family=\"IPv6\"} 0",
            "lb_map_fill_ratio{map=\"LB4_BACKENDS\"} 0.0",
            "lb_map_fill_ratio{map=\"LB_SVC_NAMES\"} 0.0",
            "lb_frontends_failing 0",
            "lb_frontend_writes_total{change=\"added\"} 0",
            "lb_frontend_writes_total{change=\"updated\"} 0",
            "lb_frontend_writes_total{change=\"removed\"} 0",
            "lb_write_failures_total{reason=\"map_full\"} 0",
            "lb_write_failures_total{reason=\"too_many_backends\"} 0",
            "lb_write_failures_total{reason=\"error\"} 0",
            "lb_write_retries_total 0",
            "lb_write_recoveries_total 0",
            "lb_drift_repairs_total{what=\"frontend\"} 0",
            "lb_drift_repairs_total{what=\"stray_entry\"} 0",
            "lb_drift_repairs_total{what=\"missing_entry\"} 0",
            "lb_watch_failures_total{resource=\"EndpointSlices\"} 0",
        ] {
            assert_sample(&text, sample);
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
            failed: vec![
                (frontend, "map LB4_SERVICES is full".into()),
                (
                    frontend,
                    "demo/web:http has 20000 backends; at most 16384 per frontend".into(),
                ),
            ],
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
            "lb_write_failures_total{reason=\"map_full\"} 1",
            "lb_write_failures_total{reason=\"too_many_backends\"} 1",
            "lb_write_failures_total{reason=\"error\"} 0",
        ] {
            assert_sample(&text, sample);
        }
    }

    #[test]
    fn programming_latencies_and_drift_repairs_are_recorded_as_they_happened() {
        let metrics = Metrics::new();
        metrics.programmed(Duration::from_micros(1_500));
        metrics.programmed(Duration::from_millis(30));
        metrics.drift_repaired(&ResyncReport {
            frontends: vec![],
            entries: vec!["a".into(), "b".into(), "c".into()],
            stray_entries: 2,
            ..Default::default()
        });
        metrics.watch_failed("Services");
        let text = metrics.encode();
        for sample in [
            "lb_network_programming_duration_seconds_count 2",
            "lb_network_programming_duration_seconds_sum 0.0315",
            // 1.5 ms is above the first bucket (1 ms), within the second (2 ms).
            "lb_network_programming_duration_seconds_bucket{le=\"0.001\"} 0",
            "lb_network_programming_duration_seconds_bucket{le=\"0.002\"} 1",
            "lb_network_programming_duration_seconds_bucket{le=\"0.032\"} 2",
            "lb_drift_repairs_total{what=\"stray_entry\"} 2",
            "lb_drift_repairs_total{what=\"missing_entry\"} 1",
            "lb_drift_repairs_total{what=\"frontend\"} 0",
            "lb_watch_failures_total{resource=\"Services\"} 1",
        ] {
            assert_sample(&text, sample);
        }
    }
}
