//! The diff between what the maps hold and what the model wants, as ordered map writes.
//!
//! # Update order
//!
//! A connect reads a frontend's entry (id, count), picks a slot below the count, then reads that
//! slot. A datagram of an unconnected UDP socket that already has a backend for the frontend
//! reads the entry, then asks the member map whether `(id, backend)` is still in the set, and
//! keeps that backend if it is. So that neither ever reads a missing or half-written backend set,
//! and so that every backend reachable through a slot below the count has its member entry, each
//! frontend's writes go:
//!
//! - **added**: name, the members of its backends and backend slots `0..n` (in any order:
//!   none is reachable yet), then the service entry (count `n`) that makes them reachable;
//! - **updated**: the members of joining backends, then the changed slots below the new count,
//!   then the entry with the new count, then the slots at or above the new count (now
//!   unreachable) are deleted, then the members of departed backends (now in no slot below the
//!   count);
//! - **removed**: the entry first (connects and datagrams stop matching), then its slots, its
//!   members, its name and its counters (in any order: none is reachable any more).
//!
//! While an update runs, a connect may still reach a backend of the old set (a slot not yet
//! rewritten, or one below the old count), and a socket that had a departed backend keeps it until
//! its member entry goes; once the plan is done neither can. Each slot, member and entry write is
//! a single map update, so it is seen whole or not at all.
//!
//! Some of these writes may go in any order: nothing of an added frontend is reachable before its
//! entry, so its name, members and slots form one step; nothing of a removed frontend is reachable
//! once its entry is gone, so its slots, members and name form one step
//! ([`FrontendChange::steps`]). Every write of an update is a step of its own.
//!
//! The dataplane makes each frontend's steps in order and batches the same step of many frontends
//! into one system call per map (`Dataplane::write_in_waves`): frontends use distinct service ids,
//! so their writes never touch the same keys.
//!
//! Backends that stay keep their slot, so an endpoint change rewrites only the slots it touches,
//! plus one member write per backend that joins or leaves. When the set shrinks, the last backends
//! move down into the freed slots; a backend that moves keeps its member entry untouched (no
//! write), so the sockets that had it keep it.

use std::collections::{BTreeMap, BTreeSet};

use crate::parallel;
use lb_common::{
    Backend4, Backend6, BackendSlotKey, Frontend4Key, Frontend6Key, ServiceEntry, ServiceName,
};

/// Which pair of service and backend maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

/// A key of `LB4_SERVICES` or `LB6_SERVICES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKey {
    V4(Frontend4Key),
    V6(Frontend6Key),
}

impl FrontendKey {
    pub fn family(&self) -> Family {
        match self {
            FrontendKey::V4(_) => Family::V4,
            FrontendKey::V6(_) => Family::V6,
        }
    }
}

/// A value of `LB4_BACKENDS` or `LB6_BACKENDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendAddr {
    V4(Backend4),
    V6(Backend6),
}

impl BackendAddr {
    pub fn family(&self) -> Family {
        match self {
            BackendAddr::V4(_) => Family::V4,
            BackendAddr::V6(_) => Family::V6,
        }
    }
}

/// What the maps hold for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub service_id: u32,
    pub name: ServiceName,
    /// Session affinity's timeout in seconds, as the entry holds it; 0: none.
    pub affinity_timeout_s: u32,
    /// Slot `i` is `slots[i]`; `None` where the map lacks a slot below the count (only after an
    /// interrupted write by an earlier agent), which the next plan rewrites.
    pub slots: Vec<Option<BackendAddr>>,
}

/// What the model wants for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedFrontend {
    pub name: ServiceName,
    /// Session affinity's timeout in seconds; 0: none.
    pub affinity_timeout_s: u32,
    pub backends: BTreeSet<BackendAddr>,
    /// Listed as serving but not among `backends` (the model's `still_serving`): when one leaves
    /// `backends`, its sockets are not ended.
    pub still_serving: BTreeSet<BackendAddr>,
}

pub type Programmed = BTreeMap<FrontendKey, ProgrammedFrontend>;
pub type Wanted = BTreeMap<FrontendKey, WantedFrontend>;

/// One map update. A backend's family says which backend map it goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Boxed: names are large and rare among writes, which a full sync holds by the 100 000.
    PutName(u32, Box<ServiceName>),
    PutBackend(BackendSlotKey, BackendAddr),
    PutService(FrontendKey, ServiceEntry),
    /// `(service id, backend)` is in the service's set; the backend's family says which member
    /// map.
    PutMember(u32, BackendAddr),
    DeleteService(FrontendKey),
    DeleteBackend(Family, BackendSlotKey),
    DeleteMember(u32, BackendAddr),
    DeleteName(u32),
    /// Deletes a frontend's counters (by service id), which the programs created at its first
    /// translation.
    DeleteCounters(u32),
}

/// Which map a [`Write`] goes to and whether it puts or deletes: writes of one op can be made
/// in one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapOp {
    PutName,
    DeleteName,
    PutBackend(Family),
    DeleteBackend(Family),
    PutService(Family),
    DeleteService(Family),
    PutMember(Family),
    DeleteMember(Family),
    DeleteCounters,
}

impl Write {
    pub fn op(&self) -> MapOp {
        match self {
            Write::PutName(..) => MapOp::PutName,
            Write::DeleteName(_) => MapOp::DeleteName,
            Write::PutBackend(_, b) => MapOp::PutBackend(b.family()),
            Write::DeleteBackend(family, _) => MapOp::DeleteBackend(*family),
            Write::PutService(k, _) => MapOp::PutService(k.family()),
            Write::DeleteService(k) => MapOp::DeleteService(k.family()),
            Write::PutMember(_, b) => MapOp::PutMember(b.family()),
            Write::DeleteMember(_, b) => MapOp::DeleteMember(b.family()),
            Write::DeleteCounters(_) => MapOp::DeleteCounters,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Updated,
    Removed,
}

/// The writes for one frontend, in the order they must be made, and what the maps then hold.
#[derive(Clone, Debug)]
pub struct FrontendChange {
    pub frontend: FrontendKey,
    pub kind: ChangeKind,
    pub writes: Vec<Write>,
    /// The frontend once `writes` are done; `None` when removed.
    pub after: Option<ProgrammedFrontend>,
}

impl FrontendChange {
    /// The writes as runs of one [`MapOp`](MapOp) each, with the step each belongs to: steps are
    /// made one after the other, and the runs of one step in any order, or at once.
    pub fn steps(&self) -> impl Iterator<Item = (usize, &[Write])> {
        let same_op = |a: &Write, b: &Write| a.op() == b.op();
        let runs = self.writes.chunk_by(same_op).count();
        self.writes
            .chunk_by(same_op)
            .enumerate()
            .map(move |(i, run)| {
                let step = match self.kind {
                    // Name, members and slots, then the entry that makes them reachable.
                    ChangeKind::Added => usize::from(i + 1 == runs),
                    // The entry, then what it no longer makes reachable.
                    ChangeKind::Removed => usize::from(i > 0),
                    ChangeKind::Updated => i,
                };
                (step, run)
            })
    }
}

/// Which frontends a plan covers.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// All: a programmed frontend that is not wanted is removed.
    All,
    /// Only these: other programmed frontends are left alone.
    Only(&'a BTreeSet<FrontendKey>),
}

/// Plans the changes that turn `programmed` into `wanted` within `scope`: removals first (they
/// free map space), then updates, then additions. Frontends that already match produce nothing.
pub fn plan(programmed: &Programmed, wanted: &Wanted, scope: Scope) -> Vec<FrontendChange> {
    let in_scope = |frontend: &FrontendKey| match scope {
        Scope::All => true,
        Scope::Only(keys) => keys.contains(frontend),
    };
    let removed: Vec<(&FrontendKey, &ProgrammedFrontend)> = programmed
        .iter()
        .filter(|(frontend, _)| in_scope(frontend) && !wanted.contains_key(frontend))
        .collect();
    let mut updated = Vec::new();
    let mut added = Vec::new();
    let mut ids = IdAllocator::new(programmed.values().map(|p| p.service_id));
    for (frontend, want) in wanted {
        match programmed.get(frontend) {
            Some(current) => updated.push((frontend, current, want)),
            None => added.push((frontend, want, ids.next())),
        }
    }
    // Building the writes is the work (a cold start has 10 000 frontends to add): spread it.
    let removed = parallel::map(&removed, |(frontend, current)| remove(**frontend, current));
    let updated = parallel::map(&updated, |(frontend, current, want)| {
        update(**frontend, current, want)
    });
    let added = parallel::map(&added, |(frontend, want, id)| add(**frontend, want, *id));
    removed
        .into_iter()
        .chain(updated.into_iter().flatten())
        .chain(added)
        .collect()
}

fn add(frontend: FrontendKey, want: &WantedFrontend, service_id: u32) -> FrontendChange {
    let slots: Vec<BackendAddr> = want.backends.iter().copied().collect();
    let mut writes = vec![Write::PutName(service_id, Box::new(want.name))];
    writes.extend(slots.iter().map(|b| Write::PutMember(service_id, *b)));
    writes.extend(
        slots
            .iter()
            .enumerate()
            .map(|(slot, b)| Write::PutBackend(slot_key(service_id, slot), *b)),
    );
    writes.push(Write::PutService(
        frontend,
        entry(service_id, slots.len(), want.affinity_timeout_s),
    ));
    FrontendChange {
        frontend,
        kind: ChangeKind::Added,
        writes,
        after: Some(ProgrammedFrontend {
            service_id,
            name: want.name,
            affinity_timeout_s: want.affinity_timeout_s,
            slots: slots.into_iter().map(Some).collect(),
        }),
    }
}

fn update(
    frontend: FrontendKey,
    current: &ProgrammedFrontend,
    want: &WantedFrontend,
) -> Option<FrontendChange> {
    let id = current.service_id;
    let slots = relayout(&current.slots, &want.backends);
    let mut writes = Vec::new();
    if current.name != want.name {
        writes.push(Write::PutName(id, Box::new(want.name)));
    }
    // A backend that stays, in whichever slot, keeps its member entry.
    let before: BTreeSet<BackendAddr> = current.slots.iter().flatten().copied().collect();
    writes.extend(
        want.backends
            .difference(&before)
            .map(|b| Write::PutMember(id, *b)),
    );
    for (slot, backend) in slots.iter().enumerate() {
        if current.slots.get(slot).copied().flatten() != Some(*backend) {
            writes.push(Write::PutBackend(slot_key(id, slot), *backend));
        }
    }
    // The entry holds the count and the affinity: rewritten when either changes (a changed
    // affinity alone is one write, seen whole by the next connect).
    if slots.len() != current.slots.len() || want.affinity_timeout_s != current.affinity_timeout_s {
        let entry = entry(id, slots.len(), want.affinity_timeout_s);
        writes.push(Write::PutService(frontend, entry));
    }
    let family = frontend.family();
    writes.extend(
        (slots.len()..current.slots.len())
            .map(|slot| Write::DeleteBackend(family, slot_key(id, slot))),
    );
    writes.extend(
        before
            .difference(&want.backends)
            .map(|b| Write::DeleteMember(id, *b)),
    );
    if writes.is_empty() {
        return None;
    }
    Some(FrontendChange {
        frontend,
        kind: ChangeKind::Updated,
        writes,
        after: Some(ProgrammedFrontend {
            service_id: id,
            name: want.name,
            affinity_timeout_s: want.affinity_timeout_s,
            slots: slots.into_iter().map(Some).collect(),
        }),
    })
}

fn remove(frontend: FrontendKey, current: &ProgrammedFrontend) -> FrontendChange {
    let id = current.service_id;
    let mut writes = vec![Write::DeleteService(frontend)];
    let family = frontend.family();
    writes.extend(
        (0..current.slots.len()).map(|slot| Write::DeleteBackend(family, slot_key(id, slot))),
    );
    let members: BTreeSet<BackendAddr> = current.slots.iter().flatten().copied().collect();
    writes.extend(members.into_iter().map(|b| Write::DeleteMember(id, b)));
    writes.push(Write::DeleteName(id));
    writes.push(Write::DeleteCounters(id));
    FrontendChange {
        frontend,
        kind: ChangeKind::Removed,
        writes,
        after: None,
    }
}

/// New slot order for `wanted`: backends that stay keep their slot, new ones fill the freed slots
/// (lowest first) and then the end; if the set shrank, the last backends move down into the holes
/// so that slots stay dense.
fn relayout(current: &[Option<BackendAddr>], wanted: &BTreeSet<BackendAddr>) -> Vec<BackendAddr> {
    let mut slots: Vec<Option<BackendAddr>> = current
        .iter()
        .map(|b| b.filter(|b| wanted.contains(b)))
        .collect();
    let kept: BTreeSet<BackendAddr> = slots.iter().flatten().copied().collect();
    let mut new = wanted.iter().filter(|b| !kept.contains(b)).copied();

    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match new.next() {
            Some(b) => *slot = Some(b),
            None => break,
        }
    }
    slots.extend(new.map(Some));

    // Compact: move the last backend into the lowest hole until none is left.
    while let Some(hole) = slots.iter().position(Option::is_none) {
        match slots.pop() {
            Some(Some(last)) if hole < slots.len() => slots[hole] = Some(last),
            _ => {} // popped a trailing hole, or the hole was the last slot
        }
    }
    slots.into_iter().flatten().collect()
}

fn slot_key(service_id: u32, slot: usize) -> BackendSlotKey {
    BackendSlotKey {
        service_id,
        slot: slot as u32,
    }
}

fn entry(service_id: u32, count: usize, affinity_timeout_s: u32) -> ServiceEntry {
    ServiceEntry::new(service_id, count as u16, 0, affinity_timeout_s)
}

/// Hands out the lowest service ids not in use. Ids of frontends removed in the same plan stay
/// taken, so an addition never shares an id with slots that are still being deleted.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            used: used.into_iter().collect(),
            next: 1,
        }
    }

    fn next(&mut self) -> u32 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(last: u8) -> BackendAddr {
        BackendAddr::V4(Backend4 {
            address: [10, 244, 0, last],
            port: 8080,
            _pad: 0,
        })
    }

    fn set(lasts: &[u8]) -> BTreeSet<BackendAddr> {
        lasts.iter().map(|&l| b(l)).collect()
    }

    fn lasts(slots: &[BackendAddr]) -> Vec<u8> {
        slots
            .iter()
            .map(|b| match b {
                BackendAddr::V4(b) => b.address[3],
                BackendAddr::V6(b) => b.address[15],
            })
            .collect()
    }

    fn current(lasts: &[u8]) -> Vec<Option<BackendAddr>> {
        lasts.iter().map(|&l| Some(b(l))).collect()
    }

    #[test]
    fn relayout_keeps_survivors_in_place() {
        // 2 replaced by 4: 1 and 3 stay where they were.
        assert_eq!(
            lasts(&relayout(&current(&[1, 2, 3]), &set(&[1, 3, 4]))),
            [1, 4, 3]
        );
        // growth appends
        assert_eq!(
            lasts(&relayout(&current(&[3, 1]), &set(&[1, 2, 3]))),
            [3, 1, 2]
        );
        // shrink moves the last survivor into the hole
        assert_eq!(
            lasts(&relayout(&current(&[1, 2, 3, 4, 5]), &set(&[3, 5]))),
            [5, 3]
        );
        assert_eq!(lasts(&relayout(&current(&[1, 2, 3]), &set(&[1]))), [1]);
        assert_eq!(
            lasts(&relayout(&current(&[1, 2]), &set(&[]))),
            Vec::<u8>::new()
        );
        // a slot the maps lacked is refilled
        assert_eq!(lasts(&relayout(&[Some(b(1)), None], &set(&[1, 2]))), [1, 2]);
    }

    fn fe() -> FrontendKey {
        FrontendKey::V4(Frontend4Key {
            address: [10, 96, 0, 10],
            port: 80,
            protocol: 6,
            _pad: 0,
        })
    }

    fn name() -> ServiceName {
        ServiceName::new("shop", "web", "http")
    }

    /// Frontend [`fe`] programmed with id 7 and these backends in slot order.
    fn programmed(lasts: &[u8]) -> Programmed {
        [(
            fe(),
            ProgrammedFrontend {
                service_id: 7,
                name: name(),
                affinity_timeout_s: 0,
                slots: current(lasts),
            },
        )]
        .into()
    }

    fn wanted(lasts: &[u8]) -> Wanted {
        [(
            fe(),
            WantedFrontend {
                name: name(),
                affinity_timeout_s: 0,
                backends: set(lasts),
                still_serving: BTreeSet::new(),
            },
        )]
        .into()
    }

    fn slot(slot: u32) -> BackendSlotKey {
        BackendSlotKey {
            service_id: 7,
            slot,
        }
    }

    fn only_writes(changes: &[FrontendChange]) -> &[Write] {
        assert_eq!(changes.len(), 1);
        &changes[0].writes
    }

    #[test]
    fn a_changed_session_affinity_rewrites_only_the_entry() {
        let mut with_affinity = wanted(&[1, 2, 3]);
        with_affinity.get_mut(&fe()).unwrap().affinity_timeout_s = 60;
        let changes = plan(&programmed(&[1, 2, 3]), &with_affinity, Scope::All);
        assert_eq!(
            only_writes(&changes),
            [Write::PutService(fe(), entry(7, 3, 60))]
        );
        let after = changes[0].after.as_ref().unwrap();
        assert_eq!(after.affinity_timeout_s, 60);
        assert_eq!(after.slots, current(&[1, 2, 3]));
    }

    #[test]
    fn unchanged_frontend_plans_nothing_and_one_endpoint_change_one_slot_write() {
        assert!(plan(&programmed(&[1, 2, 3]), &wanted(&[1, 2, 3]), Scope::All).is_empty());

        let changes = plan(&programmed(&[1, 2, 3]), &wanted(&[1, 2, 4]), Scope::All);
        assert_eq!(
            only_writes(&changes),
            [
                Write::PutMember(7, b(4)),
                Write::PutBackend(slot(2), b(4)),
                Write::DeleteMember(7, b(3)),
            ]
        );
    }

    #[test]
    fn added_frontend_writes_members_and_slots_before_its_entry() {
        let changes = plan(&Programmed::new(), &wanted(&[1, 2]), Scope::All);
        assert_eq!(
            only_writes(&changes),
            [
                Write::PutName(1, Box::new(name())),
                Write::PutMember(1, b(1)),
                Write::PutMember(1, b(2)),
                Write::PutBackend(
                    BackendSlotKey {
                        service_id: 1,
                        slot: 0
                    },
                    b(1)
                ),
                Write::PutBackend(
                    BackendSlotKey {
                        service_id: 1,
                        slot: 1
                    },
                    b(2)
                ),
                Write::PutService(fe(), entry(1, 2, 0)),
            ]
        );
    }

    #[test]
    fn a_backend_that_moves_slot_keeps_its_member_entry() {
        // 2 and 4 leave; 5, the last, moves from slot 4 into the hole at slot 1.
        let changes = plan(
            &programmed(&[1, 2, 3, 4, 5]),
            &wanted(&[1, 3, 5]),
            Scope::All,
        );
        assert_eq!(
            only_writes(&changes),
            [
                Write::PutBackend(slot(1), b(5)),
                Write::PutService(fe(), entry(7, 3, 0)),
                Write::DeleteBackend(Family::V4, slot(3)),
                Write::DeleteBackend(Family::V4, slot(4)),
                Write::DeleteMember(7, b(2)),
                Write::DeleteMember(7, b(4)),
            ]
        );
    }

    #[test]
    fn growing_writes_members_of_new_backends_before_their_slots() {
        let changes = plan(&programmed(&[1]), &wanted(&[1, 2]), Scope::All);
        assert_eq!(
            only_writes(&changes),
            [
                Write::PutMember(7, b(2)),
                Write::PutBackend(slot(1), b(2)),
                Write::PutService(fe(), entry(7, 2, 0)),
            ]
        );
    }

    #[test]
    fn removed_frontend_deletes_its_members_after_its_entry() {
        let changes = plan(&programmed(&[1, 2]), &Wanted::new(), Scope::All);
        assert_eq!(
            only_writes(&changes),
            [
                Write::DeleteService(fe()),
                Write::DeleteBackend(Family::V4, slot(0)),
                Write::DeleteBackend(Family::V4, slot(1)),
                Write::DeleteMember(7, b(1)),
                Write::DeleteMember(7, b(2)),
                Write::DeleteName(7),
                Write::DeleteCounters(7),
            ]
        );
    }
}
