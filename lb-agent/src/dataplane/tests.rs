//! The dataplane against an in-memory store that, after every single write, checks what a connect
//! and a datagram could see: every frontend's slots `0..count` are present, each holds a backend
//! of the old or the new set, never anything else, and has its member entry; no member entry of a
//! visible frontend names a backend outside the old and new sets; and a backend in both keeps its
//! member entry throughout (so an unconnected socket that has it keeps it). After each apply, the
//! member entries are exactly the backends in the slots.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use super::*;
use crate::model::{DesiredState, FrontendState};

#[derive(Default)]
struct MemStore {
    services: BTreeMap<FrontendKey, ServiceEntry>,
    backends: BTreeMap<(Family, BackendSlotKey), BackendAddr>,
    /// (service id, backend); the backend's family says which member map.
    members: BTreeSet<(u32, BackendAddr)>,
    names: BTreeMap<u32, ServiceName>,
    /// A frontend's counters (one number stands for them all), by service id: created by the
    /// programs (here, the tests) at the frontend's first translation.
    counters: BTreeMap<u32, u64>,
    writes: usize,
    /// Every write, in order.
    log: Vec<Write>,
    /// Fails writes of a service entry for this port.
    fail_port: Option<u16>,
    /// Backends each frontend port may show during the current apply.
    allowed: BTreeMap<u16, BTreeSet<BackendAddr>>,
    /// Backends each frontend port has before and after the current apply: a socket that has one
    /// must keep it all along.
    staying: BTreeMap<u16, BTreeSet<BackendAddr>>,
    violations: Vec<String>,
    /// Calls of `write_batch`, and the ops of each.
    batches: Vec<(plan::MapOp, usize)>,
}

impl MapStore for MemStore {
    fn write_batch(&mut self, writes: &[&Write]) -> Result<(), (usize, anyhow::Error)> {
        let op = writes[0].op();
        assert!(writes.iter().all(|w| w.op() == op), "one op per batch");
        self.batches.push((op, writes.len()));
        for (i, write) in writes.iter().enumerate() {
            self.write(write).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn write(&mut self, write: &Write) -> anyhow::Result<()> {
        match write {
            Write::PutService(k, _) if Some(port(k)) == self.fail_port => {
                anyhow::bail!("map full")
            }
            Write::PutName(id, n) => drop(self.names.insert(*id, **n)),
            Write::PutBackend(k, b) => drop(self.backends.insert((b.family(), *k), *b)),
            Write::PutService(k, e) => drop(self.services.insert(*k, *e)),
            Write::DeleteService(k) => drop(self.services.remove(k)),
            Write::DeleteBackend(f, k) => drop(self.backends.remove(&(*f, *k))),
            Write::DeleteName(id) => drop(self.names.remove(id)),
            Write::PutMember(id, b) => drop(self.members.insert((*id, *b))),
            Write::DeleteMember(id, b) => drop(self.members.remove(&(*id, *b))),
            Write::DeleteCounters(id) => drop(self.counters.remove(id)),
        }
        self.writes += 1;
        self.log.push(write.clone());
        self.check_connect_view();
        Ok(())
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut snapshot = Snapshot {
            names: self.names.iter().map(|(k, v)| (*k, *v)).collect(),
            counters: self.counters.keys().copied().collect(),
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
        for (id, backend) in &self.members {
            match backend {
                BackendAddr::V4(b) => snapshot.members4.push(BackendMember4Key::new(*id, b)),
                BackendAddr::V6(b) => snapshot.members6.push(BackendMember6Key::new(*id, b)),
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
                        if !self.members.contains(&(entry.service_id, *b)) {
                            self.violations.push(format!(
                                "port {port}: slot {slot} holds {b:?}, which has no member entry"
                            ));
                        }
                    }
                }
            }
        }
        self.check_datagram_view();
    }

    /// What a datagram of a socket that already has a backend could see: it keeps the backend
    /// while the frontend's entry has the same id and the member entry exists.
    fn check_datagram_view(&mut self) {
        for (frontend, entry) in &self.services {
            let port = port(frontend);
            let id = entry.service_id;
            if entry.backend_count > 0
                && let Some(allowed) = self.allowed.get(&port)
            {
                let members = self.members.range((id, MIN_BACKEND)..);
                for (_, b) in members.take_while(|m| m.0 == id) {
                    // A datagram asks its own family's member map only.
                    if b.family() == frontend.family() && !allowed.contains(b) {
                        self.violations
                            .push(format!("port {port}: a socket may keep {b:?}"));
                    }
                }
            }
            for b in self.staying.get(&port).into_iter().flatten() {
                if !self.members.contains(&(id, *b)) {
                    self.violations.push(format!(
                        "port {port}: {b:?} stays in the set but lost its member entry"
                    ));
                }
            }
        }
    }

    /// After an apply: a member entry for each backend in a slot below a count, and no other.
    fn assert_members_match_slots(&self) {
        let mut want = BTreeSet::new();
        for (frontend, entry) in &self.services {
            for slot in 0..u32::from(entry.backend_count) {
                let key = BackendSlotKey {
                    service_id: entry.service_id,
                    slot,
                };
                if let Some(b) = self.backends.get(&(frontend.family(), key)) {
                    want.insert((entry.service_id, *b));
                }
            }
        }
        assert_eq!(
            self.members, want,
            "member entries differ from the backend sets"
        );
    }

    /// The member writes among the writes from `from` on.
    fn member_writes(&self, from: usize) -> Vec<&Write> {
        self.log[from..]
            .iter()
            .filter(|w| matches!(w, Write::PutMember(..) | Write::DeleteMember(..)))
            .collect()
    }

    /// The service id of the frontend on `port`.
    fn id(&self, port: u16) -> u32 {
        self.services
            .iter()
            .find(|(k, _)| self::port(k) == port)
            .unwrap()
            .1
            .service_id
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

/// The lowest backend address, to range over one service id's members.
const MIN_BACKEND: BackendAddr = BackendAddr::V4(Backend4 {
    address: [0; 4],
    port: 0,
    _pad: 0,
});

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
                        still_serving: BTreeSet::new(),
                        affinity_timeout_s: None,
                    },
                )
            })
            .collect(),
    }
}

/// Applies `next`, allowing connects and datagrams to see old ∪ new backends meanwhile and
/// requiring the backends in both to keep their member entries, and checks that afterwards they
/// see exactly the new ones.
fn step(dp: &mut Dataplane<MemStore>, next: &[(u16, &[u8])]) -> ApplyReport {
    for (port, lasts) in next {
        let new: BTreeSet<BackendAddr> = lasts.iter().map(|&l| backend4(l)).collect();
        let old = dp.store.reachable(*port).unwrap_or_default();
        let staying = old.intersection(&new).copied().collect();
        dp.store.staying.insert(*port, staying);
        dp.store.allowed.entry(*port).or_default().extend(new);
    }
    let report = dp.apply(&desired(next));
    dp.store.staying.clear();
    assert_eq!(
        dp.store.violations,
        Vec::<String>::new(),
        "a connect or a datagram saw a bad set"
    );
    for (port, lasts) in next {
        let want: BTreeSet<BackendAddr> = lasts.iter().map(|&l| backend4(l)).collect();
        assert_eq!(dp.store.reachable(*port), Some(want.clone()));
        dp.store.allowed.insert(*port, want);
    }
    dp.store.assert_members_match_slots();
    report
}

#[test]
fn a_cold_start_is_two_steps_and_a_failing_frontend_stops_only_itself() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    let lasts: Vec<u8> = (1..=10).collect();
    let many: Vec<(u16, &[u8])> = (80..130).map(|p| (p, lasts.as_slice())).collect();
    dp.store.fail_port = Some(100);
    let r = dp.apply(&desired(&many));
    assert_eq!((r.added, r.failed.len()), (49, 1), "{r:?}");
    // Names, slots and members (unreachable until the entries: one step, a batch per map), then
    // the entries, whose batch goes on after the failing one.
    let ops: Vec<plan::MapOp> = dp.store.batches.iter().map(|(op, _)| *op).collect();
    use plan::MapOp::*;
    assert_eq!(
        ops,
        [
            PutName,
            PutBackend(Family::V4),
            PutMember(Family::V4),
            PutService(Family::V4),
            PutService(Family::V4)
        ]
    );
    assert_eq!(dp.store.batches[2].1, 500);

    assert_eq!(dp.store.services.len(), 49);
    assert_eq!(dp.store.violations, Vec::<String>::new());
}

#[test]
fn counters_live_as_long_as_their_frontend_and_a_new_frontend_starts_at_zero() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2]), (81, &[3])]);
    let id = dp.store.id(80);
    // What the programs counted so far.
    dp.store.counters.insert(id, 7);
    step(&mut dp, &[(80, &[2, 4, 5]), (81, &[3])]);
    assert_eq!(dp.store.counters[&id], 7, "an update keeps the counters");
    step(&mut dp, &[(81, &[3])]);
    assert!(
        !dp.store.counters.contains_key(&id),
        "removed with the frontend"
    );
    step(&mut dp, &[(80, &[1]), (81, &[3])]);
    assert_eq!(dp.store.id(80), id, "the id is used again");
    assert!(dp.store.counters.is_empty(), "none until a translation");
}

#[test]
fn backends_that_leave_a_frontend_that_stays_are_reported_as_departed() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    let r = step(&mut dp, &[(80, &[1, 2, 3]), (81, &[4])]);
    assert_eq!(r.departed, [], "additions depart nothing");
    let id = dp.store.id(80);
    let r = step(&mut dp, &[(80, &[2, 5]), (81, &[4])]);
    let departed: Vec<(FrontendKey, u32, BackendAddr)> = r
        .departed
        .iter()
        .map(|d| (d.frontend, d.service_id, d.backend))
        .collect();
    let key = frontend_key(&frontend(80));
    assert_eq!(departed, [(key, id, backend4(1)), (key, id, backend4(3))]);
    let r = step(&mut dp, &[(80, &[2, 5])]);
    assert_eq!(
        r.departed,
        [],
        "a removed frontend's sockets stay: its Pods still serve them"
    );
}

#[test]
fn a_backend_that_leaves_while_serving_departs_only_when_it_stops_serving() {
    // Port 80 with `lasts` in the set and `serving` still serving outside it.
    let desired = |lasts: &[u8], serving: &[u8]| {
        let mut d = desired(&[(80, lasts)]);
        let state = d.frontends.get_mut(&frontend(80)).unwrap();
        state.still_serving = serving.iter().map(|&l| backend(l)).collect();
        d
    };
    let departed =
        |r: &ApplyReport| -> Vec<BackendAddr> { r.departed.iter().map(|d| d.backend).collect() };
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    dp.apply(&desired(&[1, 2, 3], &[]));
    // 1 terminates and drains; 3 is not ready any more.
    let r = dp.apply(&desired(&[2], &[1]));
    assert_eq!(
        departed(&r),
        [backend4(3)],
        "only the one that stopped serving"
    );
    // Nothing changes in the maps, but 1 has stopped serving now: its sockets go.
    let r = dp.apply(&desired(&[2], &[]));
    assert_eq!((r.updated, departed(&r)), (0, vec![backend4(1)]));
    let r = dp.apply(&desired(&[2], &[]));
    assert_eq!(departed(&r), [], "departed once");
    // A draining backend that comes back to the set has not departed, and does not later.
    dp.apply(&desired(&[2, 5], &[]));
    assert_eq!(departed(&dp.apply(&desired(&[2], &[5]))), []);
    assert_eq!(departed(&dp.apply(&desired(&[2, 5], &[]))), []);
    assert_eq!(departed(&dp.apply(&desired(&[2, 5], &[]))), []);
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
    assert_eq!(
        dp.store.members.len(),
        1,
        "no member of a removed or shrunk set is left"
    );
    assert_eq!(dp.store.names.len(), 1);
}

#[test]
fn a_backend_that_moves_slot_keeps_its_member_entry_untouched() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2, 3, 4, 5])]);
    let id = dp.store.id(80);
    let slot_of = |dp: &Dataplane<MemStore>, b: BackendAddr| {
        dp.store
            .backends
            .iter()
            .find(|(_, v)| **v == b)
            .map(|((_, k), _)| k.slot)
    };
    assert_eq!(slot_of(&dp, backend4(5)), Some(4));

    let from = dp.store.log.len();
    // step() also checks, after every write, that 1, 3 and 5 keep their member entries.
    step(&mut dp, &[(80, &[1, 3, 5])]);
    assert_eq!(slot_of(&dp, backend4(5)), Some(1), "5 moved into 2's slot");
    assert_eq!(
        dp.store.member_writes(from),
        [
            &Write::DeleteMember(id, backend4(2)),
            &Write::DeleteMember(id, backend4(4)),
        ],
        "only the departed backends' members are written"
    );
}

#[test]
fn departed_backends_lose_their_members_and_new_ones_gain_them() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2, 3])]);
    let id = dp.store.id(80);
    step(&mut dp, &[(80, &[1])]);
    assert_eq!(dp.store.members, [(id, backend4(1))].into());
    step(&mut dp, &[(80, &[4, 5])]);
    assert_eq!(
        dp.store.members,
        [(id, backend4(4)), (id, backend4(5))].into()
    );
    step(&mut dp, &[(80, &[])]);
    assert!(dp.store.members.is_empty(), "an empty set has no members");
    step(&mut dp, &[]);
    assert!(dp.store.services.is_empty() && dp.store.members.is_empty());
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
fn one_endpoint_change_is_one_slot_write_and_two_member_writes() {
    let mut dp = Dataplane::adopt(MemStore::default()).unwrap();
    step(&mut dp, &[(80, &[1, 2, 3, 4])]);
    let writes = dp.store.writes;
    step(&mut dp, &[(80, &[1, 2, 5, 4])]);
    let id = dp.store.id(80);
    assert_eq!(
        dp.store.log[writes..],
        [
            Write::PutMember(id, backend4(5)),
            Write::PutBackend(
                BackendSlotKey {
                    service_id: id,
                    slot: 2
                },
                backend4(5)
            ),
            Write::DeleteMember(id, backend4(3)),
        ]
    );
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
    // Member leftovers: of an unknown id, of a backend in no slot (only above the count), and
    // in the other family's map; and a member the maps lack (maps of a version without them).
    let id81 = store.id(81);
    let v6 = BackendAddr::V6(Backend6 {
        address: [0xfd; 16],
        port: 8080,
        _pad: 0,
    });
    store
        .members
        .extend([(999, backend4(9)), (id80, backend4(9)), (id80, v6)]);
    assert!(store.members.remove(&(id81, backend4(4))));
    let services_before = store.services.clone();

    let mut second = Dataplane::adopt(store).unwrap();
    // The store checked the broken maps while adoption repaired them; from here on it must hold.
    second.store.violations.clear();
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
    second.store.assert_members_match_slots();
    assert_eq!(second.store.members.len(), 4);

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
    // 80: member, slot, member; 81: entry, slot, member, name, counters; 83: name, member, slot,
    // entry.
    assert_eq!(dp.store.writes - writes, 12);
    dp.store.assert_members_match_slots();
}

mod reconciler {
    use std::time::Instant;

    use super::*;
    use crate::dataplane::reconcile::{FIRST_BACKOFF, Reconciler};

    fn reconciler(frontends: &[(u16, &[u8])], now: Instant) -> Reconciler<MemStore> {
        let mut r = Reconciler::new(Dataplane::adopt(MemStore::default()).unwrap());
        let report = r.program_all(&desired(frontends), now);
        assert!(report.failed.is_empty(), "{report:?}");
        r
    }

    fn store(r: &mut Reconciler<MemStore>) -> &mut MemStore {
        &mut r.dataplane_mut().store
    }

    fn slot(id: u32, slot: u32) -> (Family, BackendSlotKey) {
        (
            Family::V4,
            BackendSlotKey {
                service_id: id,
                slot,
            },
        )
    }

    /// Resyncs, and checks that the maps then hold exactly `frontends` and nothing else.
    fn resync_to(
        r: &mut Reconciler<MemStore>,
        frontends: &[(u16, &[u8])],
    ) -> crate::dataplane::ResyncReport {
        let report = r.resync(&desired(frontends), Instant::now()).unwrap();
        let s = store(r);
        for (port, lasts) in frontends {
            let want: BTreeSet<BackendAddr> = lasts.iter().map(|&l| backend4(l)).collect();
            assert_eq!(s.reachable(*port), Some(want), "port {port}");
        }
        assert_eq!(s.services.len(), frontends.len());
        let slots: usize = frontends.iter().map(|(_, l)| l.len()).sum();
        assert_eq!(s.backends.len(), slots, "no stray slot");
        assert_eq!(s.names.len(), frontends.len(), "no stray name");
        let ids: BTreeSet<u32> = s.services.values().map(|e| e.service_id).collect();
        assert!(
            s.counters.keys().all(|id| ids.contains(id)),
            "no counters of a frontend that is gone"
        );
        s.assert_members_match_slots();
        report
    }

    #[test]
    fn a_failed_write_is_retried_with_backoff_until_it_succeeds() {
        let t0 = Instant::now();
        let mut r = reconciler(&[(80, &[1])], t0);
        store(&mut r).fail_port = Some(81);
        let next = desired(&[(80, &[1]), (81, &[2, 3])]);
        let changed = [(frontend(81), Some(next.frontends[&frontend(81)].clone()))].into();
        let report = r.apply_changes(&next, &changed, t0);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(r.next_retry(), Some(t0 + FIRST_BACKOFF));
        assert!(
            r.retry(&next, t0 + FIRST_BACKOFF / 2).is_none(),
            "not due yet"
        );

        // Still failing: the wait doubles.
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(r.retry(&next, t1).unwrap().failed.len(), 1);
        assert_eq!(r.next_retry(), Some(t1 + 2 * FIRST_BACKOFF));

        // The map takes writes again: the next retry programs it, and nothing is left to retry.
        store(&mut r).fail_port = None;
        let t2 = t1 + 2 * FIRST_BACKOFF;
        let report = r.retry(&next, t2).unwrap();
        assert_eq!((report.added, report.failed.len()), (1, 0));
        assert_eq!(r.next_retry(), None);
        assert_eq!(
            store(&mut r).reachable(81),
            Some([backend4(2), backend4(3)].into())
        );
        assert_eq!(store(&mut r).violations, Vec::<String>::new());
    }

    #[test]
    fn a_failing_frontend_that_is_deleted_is_no_longer_retried() {
        let t0 = Instant::now();
        let mut r = reconciler(&[], t0);
        store(&mut r).fail_port = Some(81);
        let next = desired(&[(81, &[2])]);
        let report = r.apply_changes(
            &next,
            &[(frontend(81), Some(next.frontends[&frontend(81)].clone()))].into(),
            t0,
        );
        assert_eq!(report.failed.len(), 1);
        r.apply_changes(&desired(&[]), &[(frontend(81), None)].into(), t0);
        assert_eq!(r.next_retry(), None);
    }

    #[test]
    fn a_resync_with_no_drift_writes_nothing() {
        let mut r = reconciler(&[(80, &[1, 2]), (81, &[])], Instant::now());
        let writes = store(&mut r).writes;
        let report = resync_to(&mut r, &[(80, &[1, 2]), (81, &[])]);
        assert!(report.frontends.is_empty() && report.entries.is_empty());
        assert_eq!(store(&mut r).writes, writes);
    }

    #[test]
    fn a_deleted_slot_is_written_again() {
        let mut r = reconciler(&[(80, &[1, 2, 3])], Instant::now());
        let id = store(&mut r).id(80);
        store(&mut r).backends.remove(&slot(id, 1));
        let from = store(&mut r).log.len();
        let report = resync_to(&mut r, &[(80, &[1, 2, 3])]);
        assert_eq!(
            report.frontends,
            [(frontend(80), "slot 1 missing".to_owned())]
        );
        assert_eq!(
            store(&mut r).log[from..],
            [
                Write::PutMember(id, backend4(2)),
                Write::PutBackend(slot(id, 1).1, backend4(2)),
            ],
            "the member before the slot, as for any added backend"
        );
    }

    #[test]
    fn a_changed_slot_gets_its_backend_back_member_first_then_slot_then_the_strays_member() {
        let mut r = reconciler(&[(80, &[1, 2])], Instant::now());
        let id = store(&mut r).id(80);
        store(&mut r).backends.insert(slot(id, 0), backend4(9));
        let from = store(&mut r).log.len();
        let report = resync_to(&mut r, &[(80, &[1, 2])]);
        assert_eq!(report.frontends.len(), 1);
        assert!(
            report.frontends[0]
                .1
                .starts_with("slot 0 holds 10.244.0.9:8080 instead of 10.244.0.1:8080"),
            "{:?}",
            report.frontends
        );
        assert_eq!(
            store(&mut r).log[from..],
            [
                Write::PutMember(id, backend4(1)),
                Write::PutBackend(slot(id, 0).1, backend4(1)),
                Write::DeleteMember(id, backend4(9)),
            ]
        );
    }

    #[test]
    fn a_deleted_service_entry_is_added_again_in_the_documented_order() {
        let mut r = reconciler(&[(80, &[1]), (81, &[2, 3])], Instant::now());
        let key = *store(&mut r)
            .services
            .keys()
            .find(|k| port(k) == 81)
            .unwrap();
        store(&mut r).services.remove(&key);
        let from = store(&mut r).log.len();
        let report = resync_to(&mut r, &[(80, &[1]), (81, &[2, 3])]);
        assert_eq!(
            report.frontends,
            [(frontend(81), "its service entry was deleted".to_owned())]
        );
        let kinds: Vec<&str> = store(&mut r).log[from..]
            .iter()
            .map(|w| match w {
                Write::PutName(..) => "name",
                Write::PutMember(..) => "member",
                Write::PutBackend(..) => "slot",
                Write::PutService(..) => "entry",
                _ => "delete",
            })
            .collect();
        let (before, last) = kinds.split_at(kinds.len() - 1);
        let mut before = before.to_vec();
        before.sort();
        assert_eq!(
            (before.as_slice(), last),
            (
                ["member", "member", "name", "slot", "slot"].as_slice(),
                ["entry"].as_slice()
            ),
            "name, members and slots (in any order), then the entry that makes them reachable"
        );
        store(&mut r).violations.clear();
    }

    #[test]
    fn stray_entries_are_removed_and_a_deleted_member_is_written_again() {
        let mut r = reconciler(&[(80, &[1, 2])], Instant::now());
        let id = store(&mut r).id(80);
        let s = store(&mut r);
        // A service entry the agent never wrote, with a slot; a slot above the count; a member of
        // no slot; a name of no entry; and a member entry deleted.
        let stray = frontend_key(&frontend(99));
        s.services.insert(stray, ServiceEntry::new(50, 1, 0, 0));
        s.backends.insert(slot(50, 0), backend4(7));
        s.backends.insert(slot(id, 5), backend4(8));
        s.members.insert((77, backend4(8)));
        s.names.insert(60, ServiceName::new("x", "y", ""));
        assert!(s.members.remove(&(id, backend4(2))));
        // Counters of no entry (left by a connect that raced a removal), and the frontend's own.
        s.counters.insert(70, 3);
        s.counters.insert(id, 5);
        let report = resync_to(&mut r, &[(80, &[1, 2])]);
        assert_eq!(report.frontends.len(), 1, "{:?}", report.frontends);
        assert_eq!(report.frontends[0].0, frontend(99));
        assert_eq!(report.apply.removed, 1, "the stray entry goes first");
        assert_eq!(report.entries.len(), 5, "{:?}", report.entries);
        assert_eq!(report.stray_entries, 4, "all but the member written again");
        assert!(
            report
                .entries
                .contains(&"removed the counters of service id 70, which no entry has".to_owned()),
            "{:?}",
            report.entries
        );
        assert_eq!(store(&mut r).counters[&id], 5, "a frontend's own are kept");
        assert!(
            report
                .entries
                .iter()
                .any(|e| e.starts_with("wrote the missing member entry 10.244.0.2:8080")),
            "{:?}",
            report.entries
        );
    }
}

#[test]
fn a_batch_error_that_names_no_write_blames_the_first_and_the_rest_go_on() {
    let write = Write::DeleteName(1);
    let writes = [&write, &write, &write];
    let mut calls = 0;
    // The first call fails before any entry (a kernel that leaves the count as given); the
    // second makes the rest.
    let failures = write_past_failures(&writes, |rest| {
        calls += 1;
        match calls {
            1 => Err((rest.len(), anyhow::anyhow!("not permitted"))),
            _ => Ok(()),
        }
    });
    let blamed: Vec<usize> = failures.iter().map(|(at, _)| *at).collect();
    assert_eq!((blamed, calls), (vec![0], 2));
}
