//! The programs' per-frontend counters (lb-common's `ServiceCounters`, in `LB_COUNTERS`) as
//! Prometheus counters, read from the maps at each scrape: summed over every frontend, and, with
//! `--metrics-per-service`, per Service port (`namespace`, `service`, `port` labels: a series per
//! Service port, so off by default).
//!
//! A frontend's counters go when the frontend goes (and its service id may be given to another):
//! so that the sums never go down, which Prometheus would read as a restart, the last values seen
//! of a frontend that is gone are kept in the sums. (What it counted between the last scrape and
//! its removal is lost.) A Service port's series ends when its last frontend goes.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use lb_common::ServiceCounters;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter},
};
use tracing::warn;

use crate::model::ServicePortName;

/// Where the counters are read from: the pinned maps in the agent.
pub trait CounterSource: Send {
    /// Every frontend's counters (summed over the CPUs) by service id, with its Service port when
    /// known.
    fn read(&self) -> anyhow::Result<Vec<Reading>>;
}

/// One frontend's counters: its service id, what it counted, and its Service port when known.
pub type Reading = (u32, ServiceCounters, Option<ServicePortName>);

/// A metric: its name (`lb_` prefix and `_total` suffix added), help, and which counter it is.
type Metric = (&'static str, &'static str, fn(&ServiceCounters) -> u64);

const METRICS: [Metric; 5] = [
    (
        "connects_translated",
        "Connects (TCP, connected UDP) the programs translated to a backend",
        |c| c.connects,
    ),
    (
        "datagrams_translated",
        "Datagrams of unconnected UDP sockets the programs translated to a backend",
        |c| c.datagrams,
    ),
    (
        "refused",
        "Connects and datagrams refused with ECONNREFUSED: the frontend had no backends",
        |c| c.refused,
    ),
    (
        "affinity_hits",
        "Translations that went to the backend session affinity kept for the client",
        |c| c.affinity_hits,
    ),
    (
        "sockets_destroyed",
        "Sockets ended because their backend left the frontend's set",
        |c| c.sockets_destroyed,
    ),
];

/// One frontend's counters as last read.
#[derive(Debug)]
struct Seen {
    service: Option<ServicePortName>,
    counters: ServiceCounters,
    /// What it had counted when it moved to `service` (its id given to another Service port
    /// without its counters restarting): counted for the Service port it had then.
    offset: ServiceCounters,
}

#[derive(Debug, Default)]
struct Sums {
    seen: BTreeMap<u32, Seen>,
    /// What frontends that are gone had counted.
    retired: ServiceCounters,
    retired_by_service: BTreeMap<ServicePortName, ServiceCounters>,
}

impl Sums {
    /// Keeps what `gone` counted in the sums.
    fn retire(&mut self, gone: &Seen) {
        self.retired = self.retired.add(&gone.counters);
        self.credit(gone.service.as_ref(), &gone.counters.minus(&gone.offset));
    }

    fn credit(&mut self, service: Option<&ServicePortName>, counted: &ServiceCounters) {
        if let Some(service) = service {
            let retired = self.retired_by_service.entry(service.clone()).or_default();
            *retired = retired.add(counted);
        }
    }

    /// Takes a new reading; returns the totals and, per Service port, the sums.
    fn update(
        &mut self,
        now: Vec<Reading>,
    ) -> (ServiceCounters, BTreeMap<ServicePortName, ServiceCounters>) {
        let mut seen = BTreeMap::new();
        for (id, counters, service) in now {
            let seen_now = match self.seen.remove(&id) {
                // The same counters, counting on. A name missing (read while the frontend is
                // being removed) keeps the last one.
                Some(last) if counters.covers(&last.counters) => {
                    let service = service.or_else(|| last.service.clone());
                    let offset = if service == last.service {
                        last.offset
                    } else {
                        // Its id now serves another Service port: what it counted so far stays
                        // with the one it had.
                        self.credit(last.service.as_ref(), &last.counters.minus(&last.offset));
                        last.counters
                    };
                    Seen {
                        service,
                        counters,
                        offset,
                    }
                }
                // Counters that went down: the frontend went and its id came back anew.
                last => {
                    if let Some(last) = last {
                        self.retire(&last);
                    }
                    Seen {
                        service,
                        counters,
                        offset: ServiceCounters::default(),
                    }
                }
            };
            seen.insert(id, seen_now);
        }
        for gone in std::mem::replace(&mut self.seen, seen).into_values() {
            self.retire(&gone);
        }
        let mut total = self.retired;
        let mut by_service: BTreeMap<ServicePortName, ServiceCounters> = BTreeMap::new();
        for frontend in self.seen.values() {
            total = total.add(&frontend.counters);
            if let Some(service) = &frontend.service {
                let sum = by_service.entry(service.clone()).or_default();
                *sum = sum.add(&frontend.counters.minus(&frontend.offset));
            }
        }
        // A Service port with no frontend left ends its series (and what it had retired).
        self.retired_by_service
            .retain(|service, _| by_service.contains_key(service));
        for (service, retired) in &self.retired_by_service {
            if let Some(sum) = by_service.get_mut(service) {
                *sum = sum.add(retired);
            }
        }
        (total, by_service)
    }
}

/// The [`Collector`]: reads the counters at each scrape, once a source is set.
#[derive(Default)]
pub struct ProgramCounters {
    source: Mutex<Option<Box<dyn CounterSource>>>,
    sums: Mutex<Sums>,
    per_service: AtomicBool,
}

impl std::fmt::Debug for ProgramCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramCounters")
            .field("per_service", &self.per_service.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ProgramCounters {
    /// Reads from `source` from now on (the maps exist once the agent has loaded them); with
    /// `per_service`, the per-Service-port series are exported too.
    pub fn read_from(&self, source: Box<dyn CounterSource>, per_service: bool) {
        self.per_service.store(per_service, Ordering::Relaxed);
        *self.source.lock().unwrap_or_else(PoisonError::into_inner) = Some(source);
    }

    fn read(&self) -> (ServiceCounters, BTreeMap<ServicePortName, ServiceCounters>) {
        let source = self.source.lock().unwrap_or_else(PoisonError::into_inner);
        let now = match source.as_ref().map(|s| s.read()) {
            Some(Ok(now)) => now,
            // Until the maps exist: nothing counted. A failed read: the last sums stand.
            None => Vec::new(),
            Some(Err(e)) => {
                warn!("reading the programs' counters for /metrics: {e:#}");
                let sums = self.sums.lock().unwrap_or_else(PoisonError::into_inner);
                sums.seen
                    .iter()
                    .map(|(id, seen)| (*id, seen.counters, seen.service.clone()))
                    .collect()
            }
        };
        drop(source);
        self.sums
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(now)
    }
}

impl Collector for ProgramCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (total, by_service) = self.read();
        for (name, help, value) in METRICS {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value(&total)).encode(metric)?;
        }
        if !self.per_service.load(Ordering::Relaxed) {
            return Ok(());
        }
        for (name, help, value) in METRICS {
            let name = format!("service_{name}");
            let help = format!("{help}, by Service port");
            let mut metric = encoder.encode_descriptor(&name, &help, None, MetricType::Counter)?;
            for (service, counters) in &by_service {
                let labels = [
                    ("namespace", service.namespace.as_str()),
                    ("service", service.name.as_str()),
                    ("port", service.port.as_str()),
                ];
                ConstCounter::new(value(counters)).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web(port: &str) -> Option<ServicePortName> {
        Some(ServicePortName {
            namespace: "demo".into(),
            name: "web".into(),
            port: port.into(),
        })
    }

    fn connects(n: u64) -> ServiceCounters {
        ServiceCounters {
            connects: n,
            ..Default::default()
        }
    }

    #[test]
    fn sums_never_go_down_when_frontends_go_and_a_service_s_series_ends_with_it() {
        let mut sums = Sums::default();
        let (total, by) = sums.update(vec![
            (1, connects(5), web("http")),
            (2, connects(3), web("http")),
        ]);
        assert_eq!((total.connects, by[&web("http").unwrap()].connects), (8, 8));
        // Frontend 2 (the Service's IPv6 one, say) goes; 1 counts on.
        let (total, by) = sums.update(vec![(1, connects(6), web("http"))]);
        assert_eq!((total.connects, by[&web("http").unwrap()].connects), (9, 9));
        // Id 1 is given to another Service port, whose counters start again.
        let (total, by) = sums.update(vec![(1, connects(1), web("admin"))]);
        assert_eq!(total.connects, 10, "6 + 3 gone, 1 new");
        assert!(!by.contains_key(&web("http").unwrap()), "its series ended");
        assert_eq!(by[&web("admin").unwrap()].connects, 1);
    }

    #[test]
    fn a_frontend_whose_counters_go_on_under_another_name_is_counted_once() {
        let mut sums = Sums::default();
        sums.update(vec![
            (1, connects(5), web("http")),
            (2, connects(1), web("admin")),
        ]);
        // Read while its name is being deleted: still http's.
        let (total, by) = sums.update(vec![(1, connects(6), None), (2, connects(1), web("admin"))]);
        assert_eq!((total.connects, by[&web("http").unwrap()].connects), (7, 6));
        // The frontend now belongs to admin (another Service took the ClusterIP over), and its
        // counters go on: 6 stay http's, what comes after is admin's.
        let (total, by) = sums.update(vec![
            (1, connects(9), web("admin")),
            (2, connects(1), web("admin")),
        ]);
        assert_eq!(total.connects, 10, "counted once");
        assert_eq!(by[&web("admin").unwrap()].connects, 3 + 1);
        assert!(
            !by.contains_key(&web("http").unwrap()),
            "http has no frontend left"
        );
    }

    struct Fixed(Vec<Reading>);

    impl CounterSource for Fixed {
        fn read(&self) -> anyhow::Result<Vec<Reading>> {
            Ok(self.0.clone())
        }
    }

    fn encode(counters: ProgramCounters) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("lb");
        registry.register_collector(Box::new(counters));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn exported_as_counters_summed_and_per_service_only_when_asked() {
        let reading = vec![(
            7,
            ServiceCounters {
                connects: 12,
                refused: 2,
                ..Default::default()
            },
            web("http"),
        )];
        let summed = ProgramCounters::default();
        summed.read_from(Box::new(Fixed(reading.clone())), false);
        let text = encode(summed);
        assert!(
            text.contains("# TYPE lb_connects_translated counter\n"),
            "{text}"
        );
        assert!(
            text.contains("\nlb_connects_translated_total 12\n"),
            "{text}"
        );
        assert!(text.contains("\nlb_refused_total 2\n"), "{text}");
        assert!(text.contains("\nlb_sockets_destroyed_total 0\n"), "{text}");
        assert!(!text.contains("service_"), "{text}");

        let per_service = ProgramCounters::default();
        per_service.read_from(Box::new(Fixed(reading)), true);
        let text = encode(per_service);
        assert!(
            text.contains(
                "\nlb_service_connects_translated_total{namespace=\"demo\",service=\"web\",port=\"http\"} 12\n"
            ),
            "{text}"
        );
    }
}
