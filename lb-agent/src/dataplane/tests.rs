//! The dataplane against an in-memory store that, after every single write, checks what a connect
//! could see: every frontend's slots `0..count` are present, and each holds a backend of the old
//! or the new set, never anything else.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::*;
use crate::model::FrontendState;

#[derive(Default)]
struct MemStore {
    services: BTreeMap<FrontendKey, ServiceEntry>,
    backends: BTreeMap<(Family, BackendSlotKey), BackendAddr>,
    names: BTreeMap<u32, ServiceName>,
    writes: usize,
    /// Fails writes of a service entry for this port.
    fail_port: Option<u16>,
    /// Backends each frontend port may show during the current apply.
    allowed: BTreeMap<u16, BTreeSet<BackendAddr>>,
    violations: Vec<String>,
}

impl MapStore for MemStore {
    fn write(&mut self, write: &Write) -> anyhow::Result<()> {
        match write {
            Write::PutService(k, _) if Some(port(k)) == self.fail_port => {
                anyhow::bail!("map full")
            }
            Write::PutName(id, n) => drop(self.names.insert(*id, **n)),
            Write::PutBackend(k, b) => drop(self.backends.insert((family(b), *k), *b)),
            Write::PutService(k, e) => drop(self.services.insert(*k, *e)),
            Write::DeleteService(k) => drop(self.services.remove(k)),
            Write::DeleteBackend(f, k) => drop(self.backends.remove(&(*f, *k))),
            Write::DeleteName(id) => drop(self.names.remove(id)),
        }
        self.writes += 1;
        self.check_connect_view();
        Ok(())
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut snapshot = Snapshot {
            names: self.names.iter().map(|(k, v)| (*k, *v)).collect(),
            ..Default::default()
        };
        for (key, entry) in &self.services {
            match key {
                FrontendKey::V4(k) => snapshot.services4.push((*k, *entry)),
                FrontendKey::V6(k) => snapshot.services6.push((*k, *entry)),
            }
        }
        for ((_, key), backend) in &self.backends {
            match backend {
                BackendAddr::V4(b) => snapshot.backends4.push((*key, *b)),
                BackendAddr::V6(b) => snapshot.backends6.push((*key, *b)),
            }
        }
        Ok(snapshot)
    }
}

fn port(key: &FrontendKey) -> u16 {
    match key {
        FrontendKey::V4(k) => k.port,
        FrontendKey::V6(k) => k.port,
    }
}

fn family(backend: &BackendAddr) -> Family {
    match backend {
        BackendAddr::V4(_) => Family::V4,
        BackendAddr::V6(_) => Family::V6,
    }
}

impl MemStore {
    fn check_connect_view(&mut self) {
        for (frontend, entry) in &self.services {
            for slot in 0..u32::from(entry.backend_count) {
                let key = BackendSlotKey {
                    service_id: entry.service_id,
                    slot,
                };
                let port = port(frontend);
                match self.backends.get(&(frontend.family(), key)) {
                    None => self
                        .violations
                        .push(format!("port {port}: slot {slot} missing")),
                    Some(b) => {
                        if let Some(allowed) = self.allowed.get(&port)
                            && !allowed.contains(b)
                        {
                            self.violations
                                .push(format!("port {port}: slot {slot} holds {b:?}"));
                        }
                    }
                }
            }
        }
    }

    /// Backends a connect to `port` (of either family) reaches, as a set.
    fn reachable(&self, wanted: u16) -> Option<BTreeSet<BackendAddr>> {
        let (key, entry) = self.services.iter().find(|(k, _)| port(k) == wanted)?;
        Some(
            (0..u32::from(entry.backend_count))
                .map(|slot| {
                    let slot = BackendSlotKey {
                        service_id: entry.service_id,
                        slot,
                    };
                    self.backends[&(key.family(), slot)]
                })
                .collect(),
        )
    }
}

fn backend(last: u8) -> Backend {
    Backend {
        address: IpAddr::from([10, 244, 0, last]),
        port: 8080,
    }
}

fn backend4(last: u8) -> BackendAddr {
    BackendAddr::V4(Backend4 {
        address: [10, 244, 0, last],
        port: 8080,
        _pad: 0,
    })
}

fn frontend(port: u16) -> Frontend {
    let addr: SocketAddr = format!("10.96.0.10:{port}").parse().unwrap();
    Frontend {
        address: addr.ip(),
        port,
        protocol: Protocol::Tcp,
    }
}

/// Desired state from `(port, backend last octets)`.
fn desired(frontends: &[(u16, &[u8])]) -> DesiredState {
    DesiredState {
        frontends: frontends
            .iter()
            .map(|(port, lasts)| {
                (
                    frontend(*port),
                    FrontendState {
                        service: ServicePortName {
                            namespace: "shop".into(),
                            name: format!("svc-{port}"),
                            port: String::new(),
                        },
                        backends: lasts.iter().map(|&l| backend(l)).collect(),
                    },
                )
            })
            .collect(),
    }
}

/// Applies `next`, allowing connects to see old ∪ new backends meanwhile, and checks that
/// afterwards they see exactly the new ones.
fn step(dp: &mut Dataplane<MemStore>, next: &[(u16, &[u8])]) -> ApplyReport {
    for (port, lasts) in next {
        let allowed = dp.store.allowed.entry(*port).or_default();
        allowed.extend(lasts.iter().map(|&l| backend4(l)));
    }
    let report = dp.apply(&desired(next));
    assert_eq!(
        dp.store.violations,
        Vec::<String>::new(),
        "a connect saw a bad set"
    );
    for (port, lasts) in next {
        let want: BTreeSet<BackendAddr> = lasts.iter().map(|&l| backend4(l)).collect();
        assert_eq!(dp.store.reachable(*port), Some(want.clone()));
        dp.store.allowed.insert(*port, want);
    }
    report
}

#[test]
fn scaling_never_exposes_a_missing_or_foreign_slot() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    let r = step(&mut dp, &[(80, &[1, 2, 3]), (81, &[])]);
    assert_eq!((r.added, r.updated, r.removed), (2, 0, 0));
    step(&mut dp, &[(80, &[1, 2, 3, 4, 5]), (81, &[9])]);
    step(&mut dp, &[(80, &[2, 5]), (81, &[9])]);
    step(&mut dp, &[(80, &[6, 7, 8]), (81, &[])]);
    step(&mut dp, &[(80, &[]), (81, &[])]);
    let r = step(&mut dp, &[(81, &[1])]);
    assert_eq!((r.added, r.updated, r.removed), (0, 1, 1));
    assert_eq!(
        dp.store.reachable(80),
        None,
        "removed frontend no longer matches"
    );
    assert_eq!(dp.store.services.len(), 1);
    assert_eq!(
        dp.store.backends.len(),
        1,
        "no slot of a removed or shrunk set is left"
    );
    assert_eq!(dp.store.names.len(), 1);
}

#[test]
fn applying_the_same_state_writes_nothing() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2, 3])]);
    let writes = dp.store.writes;
    let r = step(&mut dp, &[(80, &[1, 2, 3])]);
    assert!(!r.changed());
    assert_eq!(dp.store.writes, writes);
}

#[test]
fn one_endpoint_change_is_one_slot_write() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2, 3, 4])]);
    let writes = dp.store.writes;
    step(&mut dp, &[(80, &[1, 2, 5, 4])]);
    assert_eq!(dp.store.writes - writes, 1);
}

#[test]
fn adopting_maps_keeps_them_and_removes_only_unreachable_entries() {
    let mut first = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut first, &[(80, &[1, 2, 3]), (81, &[4])]);
    let mut store = std::mem::take(&mut first.store);
    // Leftovers of an agent that stopped mid-change: a slot above a count, an unknown id's slot
    // and name.
    let id80 = store
        .services
        .iter()
        .find(|(k, _)| port(k) == 80)
        .unwrap()
        .1
        .service_id;
    store.backends.insert(
        (
            Family::V4,
            BackendSlotKey {
                service_id: id80,
                slot: 3,
            },
        ),
        backend4(9),
    );
    store.backends.insert(
        (
            Family::V4,
            BackendSlotKey {
                service_id: 999,
                slot: 0,
            },
        ),
        backend4(9),
    );
    store.names.insert(999, ServiceName::new("x", "y", ""));
    let services_before = store.services.clone();

    let mut second = Dataplane::adopt(store).unwrap();
    assert_eq!(
        second.store.services, services_before,
        "adoption changes no service"
    );
    assert_eq!(
        second.store.backends.len(),
        4,
        "the two unreachable slots are gone"
    );
    assert!(!second.store.names.contains_key(&999));

    let writes = second.store.writes;
    let r = step(&mut second, &[(80, &[1, 2, 3]), (81, &[4])]);
    assert!(!r.changed());
    assert_eq!(second.store.writes, writes, "what matches is not rewritten");
}

#[test]
fn a_failing_frontend_is_reported_and_the_others_still_change() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1]), (81, &[2])]);
    dp.store.fail_port = Some(81);
    dp.store
        .allowed
        .get_mut(&81)
        .unwrap()
        .extend([backend4(3), backend4(4)]);
    dp.store.allowed.get_mut(&80).unwrap().insert(backend4(5));
    let r = dp.apply(&desired(&[(80, &[5]), (81, &[3, 4])]));
    assert_eq!(r.failed.len(), 1);
    assert_eq!(r.failed[0].0, frontend(81));
    assert_eq!(r.updated, 1);
    assert_eq!(dp.store.reachable(80), Some([backend4(5)].into()));
    assert_eq!(dp.store.violations, Vec::<String>::new());

    // Once the map takes writes again, the next apply finishes the job.
    dp.store.fail_port = None;
    let r = step(&mut dp, &[(80, &[5]), (81, &[3, 4])]);
    assert_eq!(r.updated, 1);
}

#[test]
fn too_many_backends_keeps_the_previous_set() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1])]);
    let mut state = desired(&[(80, &[])]);
    let fe = state.frontends.get_mut(&frontend(80)).unwrap();
    fe.backends = (0..=u32::from(MAX_BACKENDS_PER_SERVICE))
        .map(|i| Backend {
            address: IpAddr::from((0x0af4_0000u32 + i).to_be_bytes()),
            port: 80,
        })
        .collect();
    let r = dp.apply(&state);
    assert_eq!(r.failed.len(), 1);
    assert!(r.failed[0].1.contains("at most"), "{}", r.failed[0].1);
    assert_eq!(dp.store.reachable(80), Some([backend4(1)].into()));
}

#[test]
fn ipv6_frontends_go_to_the_ipv6_maps_with_their_own_ids() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    let mut state = desired(&[(80, &[1])]);
    let v6 = Frontend {
        address: "fd00::10".parse().unwrap(),
        port: 443,
        protocol: Protocol::Tcp,
    };
    let v6_backend = Backend {
        address: "fd00:244::1".parse().unwrap(),
        port: 8443,
    };
    let mut v6_state = state.frontends[&frontend(80)].clone();
    v6_state.backends = [v6_backend].into();
    state.frontends.insert(v6, v6_state);

    let r = dp.apply(&state);
    assert_eq!(r.added, 2);
    let keys: Vec<Family> = dp.store.services.keys().map(FrontendKey::family).collect();
    assert_eq!(keys, [Family::V4, Family::V6]);
    let ids: BTreeSet<u32> = dp.store.services.values().map(|e| e.service_id).collect();
    assert_eq!(ids.len(), 2, "one id space for both families");
    assert!(matches!(
        dp.store.reachable(443).unwrap().first(),
        Some(BackendAddr::V6(_))
    ));

    let rows = view(&dp.store.snapshot().unwrap());
    let row = rows
        .iter()
        .find(|r| r.frontend == v6)
        .expect("the IPv6 frontend is listed");
    assert_eq!(row.backends, [v6_backend]);
}

#[test]
fn view_lists_frontends_with_names_and_backends_in_slot_order() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2]), (81, &[])]);
    let rows = view(&dp.store.snapshot().unwrap());
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].service.to_string(), "shop/svc-80");
    assert_eq!(rows[0].frontend.to_string(), "10.96.0.10:80/TCP");
    assert_eq!(rows[0].backends, [backend(1), backend(2)]);
    assert!(rows[1].backends.is_empty());
}

#[test]
fn applying_changes_touches_only_those_frontends_and_never_reuses_an_id() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1]), (81, &[2]), (82, &[3])]);
    let writes = dp.store.writes;

    // 80 loses its backend, 81 goes away, 83 is new; 82 is not mentioned and stays.
    let next = desired(&[(80, &[4]), (83, &[5])]);
    let changed: BTreeMap<Frontend, Option<FrontendState>> = [
        (frontend(80), Some(next.frontends[&frontend(80)].clone())),
        (frontend(81), None),
        (frontend(83), Some(next.frontends[&frontend(83)].clone())),
    ]
    .into();
    dp.store.allowed.get_mut(&80).unwrap().insert(backend4(4));
    dp.store.allowed.insert(83, [backend4(5)].into());
    let r = dp.apply_changes(&changed);
    assert_eq!((r.added, r.updated, r.removed), (1, 1, 1));
    assert_eq!(dp.store.violations, Vec::<String>::new());
    assert_eq!(dp.store.reachable(80), Some([backend4(4)].into()));
    assert_eq!(dp.store.reachable(81), None);
    assert_eq!(
        dp.store.reachable(82),
        Some([backend4(3)].into()),
        "not in the change: kept"
    );
    let ids: Vec<u32> = dp.store.services.values().map(|e| e.service_id).collect();
    let unique: BTreeSet<u32> = ids.iter().copied().collect();
    assert_eq!(
        ids.len(),
        unique.len(),
        "two frontends share a service id: {ids:?}"
    );
    // 80: one slot; 81: entry, slot, name; 83: name, slot, entry.
    assert_eq!(dp.store.writes - writes, 7);
}
