//! The dataplane: owns lb's BPF maps and changes them only by the difference to what the model
//! wants, in the order [`plan`] documents.
//!
//! [`Dataplane`] works on any [`MapStore`]: the pinned BPF maps ([`bpf::BpfMaps`]) in the agent,
//! an in-memory store in tests.

pub mod bpf;
pub mod plan;
pub mod reconcile;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    Backend4, Backend6, BackendMember4Key, BackendMember6Key, BackendSlotKey, Frontend4Key,
    Frontend6Key, MAX_BACKENDS_PER_SERVICE, ServiceEntry, ServiceName,
};
use tracing::{debug, info, warn};

use crate::model::{Backend, DesiredFrontends, Frontend, FrontendState, Protocol, ServicePortName};
use plan::{
    BackendAddr, ChangeKind, Family, FrontendChange, FrontendKey, Programmed, ProgrammedFrontend,
    Scope, Wanted, WantedFrontend, Write,
};

/// Everything the maps hold, as read in one pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services4: Vec<(Frontend4Key, ServiceEntry)>,
    pub backends4: Vec<(BackendSlotKey, Backend4)>,
    pub services6: Vec<(Frontend6Key, ServiceEntry)>,
    pub backends6: Vec<(BackendSlotKey, Backend6)>,
    /// Member keys only: the value is always [`lb_common::BackendMember::MARKER`].
    pub members4: Vec<BackendMember4Key>,
    pub members6: Vec<BackendMember6Key>,
    pub names: Vec<(u32, ServiceName)>,
    /// The service ids that have counters (the values are for `lb-agent list`, which reads them
    /// itself).
    pub counters: Vec<u32>,
}

impl Snapshot {
    /// Every service entry, of both families.
    fn services(&self) -> impl Iterator<Item = (FrontendKey, ServiceEntry)> + '_ {
        let v4 = self
            .services4
            .iter()
            .map(|(k, e)| (FrontendKey::V4(*k), *e));
        let v6 = self
            .services6
            .iter()
            .map(|(k, e)| (FrontendKey::V6(*k), *e));
        v4.chain(v6)
    }

    /// Every backend slot's key, by family.
    fn backend_slots(&self) -> impl Iterator<Item = (Family, BackendSlotKey)> + '_ {
        let v4 = self.backends4.iter().map(|(k, _)| (Family::V4, *k));
        let v6 = self.backends6.iter().map(|(k, _)| (Family::V6, *k));
        v4.chain(v6)
    }

    /// Every member entry, as (service id, backend).
    fn members(&self) -> impl Iterator<Item = (u32, BackendAddr)> + '_ {
        let v4 = self
            .members4
            .iter()
            .map(|k| (k.service_id, BackendAddr::V4(k.backend())));
        let v6 = self
            .members6
            .iter()
            .map(|k| (k.service_id, BackendAddr::V6(k.backend())));
        v4.chain(v6)
    }

    /// Every frontend as the maps hold it: its name, and its slots `0..count` in order (`None`
    /// where the map lacks one).
    fn frontends(&self) -> Programmed {
        let v4 = self
            .backends4
            .iter()
            .map(|(k, b)| ((Family::V4, *k), BackendAddr::V4(*b)));
        let v6 = self
            .backends6
            .iter()
            .map(|(k, b)| ((Family::V6, *k), BackendAddr::V6(*b)));
        let backends: BTreeMap<(Family, BackendSlotKey), BackendAddr> = v4.chain(v6).collect();
        let names: BTreeMap<u32, ServiceName> = self.names.iter().copied().collect();
        self.services()
            .map(|(frontend, entry)| {
                let service_id = entry.service_id;
                let slots = (0..u32::from(entry.backend_count))
                    .map(|slot| {
                        let slot = BackendSlotKey { service_id, slot };
                        backends.get(&(frontend.family(), slot)).copied()
                    })
                    .collect();
                let name = names
                    .get(&service_id)
                    .copied()
                    .unwrap_or_else(|| ServiceName::new("", "", ""));
                let programmed = ProgrammedFrontend {
                    service_id,
                    name,
                    affinity_timeout_s: entry.affinity_timeout_s,
                    slots,
                };
                (frontend, programmed)
            })
            .collect()
    }
}

/// The maps, as the dataplane needs them. Deleting a missing key is not an error.
pub trait MapStore {
    fn write(&mut self, write: &Write) -> anyhow::Result<()>;

    /// Makes `writes`, all of one [`MapOp`](plan::MapOp), in order, stopping at the first that
    /// fails: `Err((i, error))` when `writes[i]` failed (those before it were made, those after it
    /// were not tried). A store may make them in one system call.
    fn write_batch(&mut self, writes: &[&Write]) -> Result<(), (usize, anyhow::Error)> {
        for (i, write) in writes.iter().enumerate() {
            self.write(write).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Makes several batches (each as [`write_batch`](Self::write_batch)) that may be made in
    /// any order or at once, going on past a failed write; returns each batch's failed writes, by
    /// index, with their errors. A store may make the batches in parallel.
    fn write_batches(&mut self, batches: &[&[&Write]]) -> Vec<Vec<(usize, anyhow::Error)>> {
        batches
            .iter()
            .map(|writes| write_past_failures(writes, |rest| self.write_batch(rest)))
            .collect()
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot>;
}

/// Makes `writes` with `write_batch`, going on after each failed write; returns the failed ones,
/// by index, with their errors.
pub fn write_past_failures(
    writes: &[&Write],
    mut write_batch: impl FnMut(&[&Write]) -> Result<(), (usize, anyhow::Error)>,
) -> Vec<(usize, anyhow::Error)> {
    let mut failures = Vec::new();
    let mut start = 0;
    while start < writes.len() {
        let Err((at, error)) = write_batch(&writes[start..]) else {
            break;
        };
        // A store that names no write in range blames the first one not yet made.
        let at = if start + at < writes.len() { at } else { 0 };
        failures.push((start + at, error));
        start += at + 1;
    }
    failures
}

/// Runs of writes of one [`MapOp`](plan::MapOp), each with the index of the change it belongs to.
type Runs<'a> = Vec<(usize, &'a [Write])>;

/// What one [`Dataplane::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Frontends left as they were, and why.
    pub failed: Vec<(Frontend, String)>,
    /// Backends that left the set of a frontend that stays: the sockets lb translated to them
    /// through it are to be ended.
    pub departed: Vec<Departure>,
}

/// Why a frontend could not be written, for metrics: read from the failure's message, whose
/// wording the dataplane and its stores take from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// A map had no room left.
    MapFull,
    /// More backends than a frontend may have.
    TooManyBackends,
    /// Anything else the kernel refused.
    Error,
}

impl FailureKind {
    /// How a store says a map is full: `map <name> is full`.
    pub const MAP_FULL: &str = "is full";
    /// How the dataplane says a frontend has too many backends.
    pub const TOO_MANY_BACKENDS: &str = "backends; at most";
    pub const ALL: [FailureKind; 3] = [
        FailureKind::MapFull,
        FailureKind::TooManyBackends,
        FailureKind::Error,
    ];

    pub fn of(message: &str) -> Self {
        if message.contains(Self::MAP_FULL) {
            FailureKind::MapFull
        } else if message.contains(Self::TOO_MANY_BACKENDS) {
            FailureKind::TooManyBackends
        } else {
            FailureKind::Error
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::MapFull => "map_full",
            FailureKind::TooManyBackends => "too_many_backends",
            FailureKind::Error => "error",
        }
    }
}

/// What the maps hold, by family, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyStats {
    pub frontends: usize,
    /// Backend slots, one per backend of each frontend (and one member entry each).
    pub backends: usize,
}

/// A backend that left a frontend's set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departure {
    pub frontend: FrontendKey,
    pub service_id: u32,
    pub backend: BackendAddr,
}

/// What one [`Dataplane::resync`] found in the maps and repaired.
#[derive(Debug, Default)]
pub struct ResyncReport {
    /// Frontends whose entry or slots differed from what the agent wrote, and how.
    pub frontends: Vec<(Frontend, String)>,
    /// Entries no frontend reaches (removed) and member entries the maps lacked (written).
    pub entries: Vec<String>,
    /// How many of `entries` were removed (the others were written).
    pub stray_entries: usize,
    /// The writes that brought the frontends back to the wanted state.
    pub apply: ApplyReport,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

pub struct Dataplane<S> {
    store: S,
    programmed: Programmed,
    /// Backends that left a frontend's set while still serving (a terminating Pod draining, one
    /// topology leaves out): their sockets are ended once they stop serving. Kept in memory
    /// only: after a restart, such a backend's sockets are left to it.
    draining: BTreeMap<FrontendKey, BTreeSet<BackendAddr>>,
}

impl<S: MapStore> Dataplane<S> {
    /// Takes over the maps as they are (an earlier agent's work stays in place until the first
    /// [`apply`](Self::apply) changes what differs), and drops entries nothing can reach.
    pub fn adopt(store: S) -> anyhow::Result<Self> {
        let mut dataplane = Self {
            store,
            programmed: Programmed::new(),
            draining: BTreeMap::new(),
        };
        dataplane.reload()?;
        Ok(dataplane)
    }

    /// Re-allocates the view of the maps after a large apply (see `Cluster::compact`).
    pub fn compact(&mut self) {
        self.programmed = self.programmed.clone();
    }

    /// Frontends and backend slots programmed, IPv4 then IPv6.
    pub fn stats(&self) -> [FamilyStats; 2] {
        let mut stats = [FamilyStats::default(); 2];
        for (key, programmed) in &self.programmed {
            let family = &mut stats[usize::from(key.family() == Family::V6)];
            family.frontends += 1;
            family.backends += programmed.slots.len();
        }
        stats
    }

    /// Number of frontends programmed.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// Brings the maps to `desired`, changing only what differs; frontends not in `desired` are
    /// removed. A frontend that cannot be written (bad size, full map) is reported and keeps its
    /// previous programming; the others proceed.
    pub fn apply(&mut self, desired: &impl DesiredFrontends) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted = self.wanted(desired.frontends().map(|(f, s)| (f, Some(s))), &mut report);
        self.execute(&wanted, Scope::All, report)
    }

    /// Applies changed frontends only (`None`: the frontend is gone); the rest stay as they are.
    pub fn apply_changes(
        &mut self,
        changed: &BTreeMap<Frontend, Option<FrontendState>>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted = self.wanted(changed.iter().map(|(f, s)| (f, s.as_ref())), &mut report);
        let keys: BTreeSet<FrontendKey> = changed.keys().map(frontend_key).collect();
        self.execute(&wanted, Scope::Only(&keys), report)
    }

    fn execute(&mut self, wanted: &Wanted, scope: Scope, mut report: ApplyReport) -> ApplyReport {
        let changes = plan::plan(&self.programmed, wanted, scope);
        let mut failed = self.write_in_waves(&changes);
        let interrupted = !failed.is_empty();
        // Into an empty view (a cold start: every change an addition, in key order), the view is
        // built in one go.
        let mut fresh = Vec::new();
        let empty = self.programmed.is_empty();
        for (index, change) in changes.into_iter().enumerate() {
            if let Some(error) = failed.remove(&index) {
                report
                    .failed
                    .push((frontend_of(&change.frontend), format!("{error:#}")));
                continue;
            }
            match change.kind {
                ChangeKind::Added => report.added += 1,
                ChangeKind::Updated => report.updated += 1,
                ChangeKind::Removed => report.removed += 1,
            }
            let draining = self.draining.remove(&change.frontend).unwrap_or_default();
            if let (Some(before), Some(after)) =
                (self.programmed.get(&change.frontend), &change.after)
            {
                let had = before.slots.iter().flatten().chain(&draining);
                note_departures(
                    &mut self.draining,
                    (change.frontend, after),
                    had,
                    wanted,
                    &mut report,
                );
            }
            match change.after {
                Some(after) if empty => fresh.push((change.frontend, after)),
                Some(after) => {
                    self.programmed.insert(change.frontend, after);
                }
                None => {
                    self.programmed.remove(&change.frontend);
                }
            };
        }
        if empty {
            self.programmed = fresh.into_iter().collect();
        }
        // Frontends left unchanged whose draining backends may have stopped serving.
        if !self.draining.is_empty() {
            let keys: Vec<FrontendKey> = self
                .draining
                .keys()
                .filter(|k| wanted.contains_key(k))
                .copied()
                .collect();
            for key in keys {
                let Some(current) = self.programmed.get(&key).cloned() else {
                    self.draining.remove(&key);
                    continue;
                };
                let draining = self.draining.remove(&key).unwrap_or_default();
                note_departures(
                    &mut self.draining,
                    (key, &current),
                    draining.iter(),
                    wanted,
                    &mut report,
                );
            }
        }
        // A change that stopped half-way left the maps between two valid states; read back what
        // they hold so the next plan starts from the truth.
        if interrupted && let Err(error) = self.reload() {
            warn!("could not re-read the maps after a failed write: {error:#}");
        }
        report
    }

    /// Makes the changes' writes in as few batches as their order allows, and returns the
    /// changes that failed (by index), each with its error; a failed change's later writes are
    /// not made.
    ///
    /// The order: the plan's groups one after the other (removals, which free map space, then
    /// updates, then additions). Within a group, the k-th step ([`FrontendChange::steps`]) of
    /// every change is made before the (k+1)-th of any, one batch per [`MapOp`](plan::MapOp), and
    /// the batches of a step go to the store together (which may make them at once): so each
    /// frontend's writes keep the order [`plan`] gives them, and writes of different frontends,
    /// which touch different keys, are made together. A cold start of 10 000 frontends is two
    /// steps: names, members and slots, then the entries.
    fn write_in_waves(&mut self, changes: &[FrontendChange]) -> BTreeMap<usize, anyhow::Error> {
        let mut failed: BTreeMap<usize, anyhow::Error> = BTreeMap::new();
        // The plan lists its changes group by group.
        let mut group_start = 0;
        for group in changes.chunk_by(|a, b| a.kind == b.kind) {
            // Each step's runs of writes, by op, with the change each run belongs to.
            let mut steps: Vec<BTreeMap<plan::MapOp, Runs>> = Vec::new();
            for (index, change) in (group_start..).zip(group) {
                for (step, run) in change.steps() {
                    if steps.len() <= step {
                        steps.resize_with(step + 1, BTreeMap::new);
                    }
                    steps[step]
                        .entry(run[0].op())
                        .or_default()
                        .push((index, run));
                }
            }
            group_start += group.len();
            for step in steps {
                // A change that failed in an earlier step makes no more writes.
                let batches: Vec<Runs> = step
                    .into_values()
                    .map(|runs| {
                        runs.into_iter()
                            .filter(|(index, _)| !failed.contains_key(index))
                            .collect()
                    })
                    .collect();
                let writes: Vec<Vec<&Write>> = batches
                    .iter()
                    .map(|runs| runs.iter().flat_map(|(_, run)| run.iter()).collect())
                    .collect();
                let slices: Vec<&[&Write]> = writes.iter().map(Vec::as_slice).collect();
                let results = self.store.write_batches(&slices);
                for (runs, failures) in batches.iter().zip(results) {
                    if failures.is_empty() {
                        continue;
                    }
                    // Where each run ends in the batch: the run a failed write is in.
                    let ends: Vec<usize> = runs
                        .iter()
                        .scan(0, |end, (_, run)| {
                            *end += run.len();
                            Some(*end)
                        })
                        .collect();
                    for (at, error) in failures {
                        let run = ends.partition_point(|&end| end <= at).min(runs.len() - 1);
                        failed.entry(runs[run].0).or_insert(error);
                    }
                }
            }
        }
        failed
    }

    /// The model's frontends as map contents (`None` states are left out, so the plan removes
    /// them); a frontend that cannot be programmed keeps what it has.
    fn wanted<'a>(
        &self,
        frontends: impl Iterator<Item = (&'a Frontend, Option<&'a FrontendState>)>,
        report: &mut ApplyReport,
    ) -> Wanted {
        let frontends: Vec<(&Frontend, &FrontendState)> = frontends
            .filter_map(|(frontend, state)| Some((frontend, state?)))
            .collect();
        let converted = crate::parallel::map(&frontends, |(frontend, state)| {
            (frontend_key(frontend), wanted_frontend(frontend, state))
        });
        let mut wanted = Vec::with_capacity(converted.len());
        for (key, frontend) in converted {
            match frontend {
                Ok(frontend) => wanted.push((key, frontend)),
                Err(failure) => {
                    report.failed.push(failure);
                    if let Some(current) = self.programmed.get(&key) {
                        wanted.push((key, keep(current)));
                    }
                }
            }
        }
        // Built in one go (sorted, then bulk-loaded): faster than inserting one by one.
        wanted.into_iter().collect()
    }

    /// Compares the maps with what the agent wrote and brings them back to `desired`: a frontend
    /// whose entry or slots were changed or deleted behind the agent's back is rewritten (in the
    /// order of [`plan`], as for any change), an entry the agent did not write is removed, and so
    /// are slots, members and names no entry reaches; member entries missing for a backend in use
    /// are written again.
    pub fn resync(&mut self, desired: &impl DesiredFrontends) -> anyhow::Result<ResyncReport> {
        let snapshot = self.store.snapshot()?;
        let actual = snapshot.frontends();
        let mut report = ResyncReport::default();
        let keys: BTreeSet<&FrontendKey> = actual.keys().chain(self.programmed.keys()).collect();
        for key in keys {
            if let Some(what) = drift(self.programmed.get(key), actual.get(key)) {
                report.frontends.push((frontend_of(key), what));
            }
        }
        let drifted = !report.frontends.is_empty();
        if drifted {
            self.programmed = actual;
        }
        report.apply = self.apply(desired);
        let snapshot = if drifted || report.apply.changed() || !report.apply.failed.is_empty() {
            self.store.snapshot()?
        } else {
            snapshot
        };
        for (write, what) in housekeeping(&snapshot, &self.programmed) {
            self.store.write(&write)?;
            if !matches!(write, Write::PutMember(..)) {
                report.stray_entries += 1;
            }
            report.entries.push(what);
        }
        Ok(report)
    }

    /// Rebuilds the view of the maps from the maps, and deletes slots, members and names that no
    /// service entry reaches (left by an agent that stopped mid-change). Members missing for a
    /// backend in a slot below the count (maps of a version without member maps) are written, so
    /// the sockets that have such a backend keep it.
    fn reload(&mut self) -> anyhow::Result<()> {
        let snapshot = self.store.snapshot()?;
        let programmed = snapshot.frontends();
        let writes = housekeeping(&snapshot, &programmed);
        let missing = writes
            .iter()
            .filter(|(w, _)| matches!(w, Write::PutMember(..)))
            .count();
        if missing > 0 {
            info!(
                count = missing,
                "adding the member entries of backends in use that the maps lack (maps left by an \
                 lb version without member maps)"
            );
        }
        for (write, what) in writes {
            debug!(?write, "{what}");
            self.store.write(&write)?;
        }
        self.programmed = programmed;
        Ok(())
    }
}

/// Reports as departed the backends of `had` that are neither in `now`'s slots nor serving
/// still (they left the set while serving, and stopped), and remembers those that drain.
fn note_departures<'a>(
    draining_now: &mut BTreeMap<FrontendKey, BTreeSet<BackendAddr>>,
    (frontend, now): (FrontendKey, &ProgrammedFrontend),
    had: impl Iterator<Item = &'a BackendAddr>,
    wanted: &Wanted,
    report: &mut ApplyReport,
) {
    let in_set: BTreeSet<&BackendAddr> = now.slots.iter().flatten().collect();
    let serving = wanted.get(&frontend).map(|w| &w.still_serving);
    let mut draining = BTreeSet::new();
    for backend in had.collect::<BTreeSet<_>>() {
        if in_set.contains(backend) {
            continue;
        }
        if serving.is_some_and(|s| s.contains(backend)) {
            draining.insert(*backend);
        } else {
            report.departed.push(Departure {
                frontend,
                service_id: now.service_id,
                backend: *backend,
            });
        }
    }
    if !draining.is_empty() {
        draining_now.insert(frontend, draining);
    }
}

/// The writes that remove slots, members, names and counters no service entry of `programmed`
/// reaches, then add the member entries missing for backends in a slot below a count; each with
/// what it repairs.
fn housekeeping(snapshot: &Snapshot, programmed: &Programmed) -> Vec<(Write, String)> {
    let reachable: BTreeMap<(Family, u32), usize> = programmed
        .iter()
        .map(|(k, p)| ((k.family(), p.service_id), p.slots.len()))
        .collect();
    let ids: BTreeSet<u32> = programmed.values().map(|p| p.service_id).collect();
    // The member entries the maps should hold: one per backend in a slot below a count. A
    // backend's family is its frontend's, so (id, backend) also says which map.
    let members: BTreeSet<(u32, BackendAddr)> = programmed
        .values()
        .flat_map(|p| p.slots.iter().flatten().map(|b| (p.service_id, *b)))
        .collect();
    let present: BTreeSet<(u32, BackendAddr)> = snapshot.members().collect();
    let mut writes = Vec::new();
    for (family, k) in snapshot.backend_slots() {
        let reached = reachable
            .get(&(family, k.service_id))
            .is_some_and(|&count| (k.slot as usize) < count);
        if !reached {
            writes.push((
                Write::DeleteBackend(family, k),
                format!(
                    "removed backend slot {} of service id {}, which no entry reaches",
                    k.slot, k.service_id
                ),
            ));
        }
    }
    for (id, b) in present.difference(&members) {
        writes.push((
            Write::DeleteMember(*id, *b),
            format!(
                "removed member entry {} of service id {id}, in no slot",
                backend_of(b)
            ),
        ));
    }
    for (id, _) in snapshot.names.iter().filter(|(id, _)| !ids.contains(id)) {
        writes.push((
            Write::DeleteName(*id),
            format!("removed the name of service id {id}, which no entry has"),
        ));
    }
    for id in snapshot.counters.iter().filter(|id| !ids.contains(id)) {
        writes.push((
            Write::DeleteCounters(*id),
            format!("removed the counters of service id {id}, which no entry has"),
        ));
    }
    for (id, b) in members.difference(&present) {
        writes.push((
            Write::PutMember(*id, *b),
            format!(
                "wrote the missing member entry {} of service id {id}",
                backend_of(b)
            ),
        ));
    }
    writes
}

/// How the maps' version of a frontend differs from what the agent wrote, if it does.
fn drift(wrote: Option<&ProgrammedFrontend>, found: Option<&ProgrammedFrontend>) -> Option<String> {
    let show =
        |b: Option<BackendAddr>| b.map_or("nothing".to_owned(), |b| backend_of(&b).to_string());
    match (wrote, found) {
        (None, None) => None,
        (Some(_), None) => Some("its service entry was deleted".into()),
        (None, Some(f)) => Some(format!(
            "a service entry the agent did not write (service id {}, {} backends)",
            f.service_id,
            f.slots.len()
        )),
        (Some(w), Some(f)) if w == f => None,
        (Some(w), Some(f)) => {
            let mut what = Vec::new();
            if w.service_id != f.service_id {
                what.push(format!(
                    "service id {} instead of {}",
                    f.service_id, w.service_id
                ));
            }
            if w.slots.len() != f.slots.len() {
                what.push(format!(
                    "backend count {} instead of {}",
                    f.slots.len(),
                    w.slots.len()
                ));
            }
            for (slot, found) in f.slots.iter().enumerate() {
                let wrote = w.slots.get(slot).copied().flatten();
                match found {
                    None => what.push(format!("slot {slot} missing")),
                    Some(b) if Some(*b) != wrote => what.push(format!(
                        "slot {slot} holds {} instead of {}",
                        show(Some(*b)),
                        show(wrote)
                    )),
                    Some(_) => {}
                }
            }
            if w.name != f.name {
                what.push("its name entry was changed or deleted".into());
            }
            if what.is_empty() {
                what.push("changed".into());
            }
            Some(what.join(", "))
        }
    }
}

/// A frontend's map contents, or why it cannot be programmed.
fn wanted_frontend(
    frontend: &Frontend,
    state: &FrontendState,
) -> Result<WantedFrontend, (Frontend, String)> {
    // The model pairs a frontend only with backends of its family.
    let addrs = |backends: &BTreeSet<Backend>| -> BTreeSet<BackendAddr> {
        backends
            .iter()
            .filter_map(|b| backend_addr(b, frontend))
            .collect()
    };
    let backends = addrs(&state.backends);
    if backends.len() > usize::from(MAX_BACKENDS_PER_SERVICE) {
        return Err((
            *frontend,
            format!(
                "{} has {} {} {MAX_BACKENDS_PER_SERVICE} per frontend",
                state.service,
                backends.len(),
                FailureKind::TOO_MANY_BACKENDS
            ),
        ));
    }
    let service = &state.service;
    Ok(WantedFrontend {
        name: ServiceName::new(&service.namespace, &service.name, &service.port),
        affinity_timeout_s: state.affinity_timeout_s.unwrap_or(0),
        backends,
        still_serving: addrs(&state.still_serving),
    })
}

/// `backend` as the backend maps hold it, when it is of `frontend`'s family.
fn backend_addr(backend: &Backend, frontend: &Frontend) -> Option<BackendAddr> {
    match (backend.address, frontend.address) {
        (IpAddr::V4(a), IpAddr::V4(_)) => Some(BackendAddr::V4(Backend4 {
            address: a.octets(),
            port: backend.port,
            _pad: 0,
        })),
        (IpAddr::V6(a), IpAddr::V6(_)) => Some(BackendAddr::V6(Backend6 {
            address: a.octets(),
            port: backend.port,
            _pad: 0,
        })),
        _ => None,
    }
}

/// A wanted state equal to what is programmed, so the plan leaves it alone.
fn keep(current: &ProgrammedFrontend) -> WantedFrontend {
    WantedFrontend {
        name: current.name,
        affinity_timeout_s: current.affinity_timeout_s,
        backends: current.slots.iter().flatten().copied().collect(),
        still_serving: BTreeSet::new(),
    }
}

fn frontend_key(frontend: &Frontend) -> FrontendKey {
    let (port, protocol) = (frontend.port, frontend.protocol.number());
    match frontend.address {
        IpAddr::V4(a) => FrontendKey::V4(Frontend4Key {
            address: a.octets(),
            port,
            protocol,
            _pad: 0,
        }),
        IpAddr::V6(a) => FrontendKey::V6(Frontend6Key {
            address: a.octets(),
            port,
            protocol,
            _pad: 0,
        }),
    }
}

fn frontend_of(key: &FrontendKey) -> Frontend {
    let (address, port, protocol) = match key {
        FrontendKey::V4(k) => (IpAddr::from(k.address), k.port, k.protocol),
        FrontendKey::V6(k) => (IpAddr::from(k.address), k.port, k.protocol),
    };
    Frontend {
        address,
        port,
        protocol: Protocol::from_number(protocol).unwrap_or(Protocol::Tcp),
    }
}

fn backend_of(b: &BackendAddr) -> Backend {
    match b {
        BackendAddr::V4(b) => Backend {
            address: IpAddr::from(b.address),
            port: b.port,
        },
        BackendAddr::V6(b) => Backend {
            address: IpAddr::from(b.address),
            port: b.port,
        },
    }
}

/// A frontend as read back from the maps, for `lb-agent list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendView {
    pub service: ServicePortName,
    pub frontend: Frontend,
    /// The id its slots, name and counters are keyed by.
    pub service_id: u32,
    /// In slot order.
    pub backends: Vec<Backend>,
    /// Slots below the count that the map lacks (only after an interrupted write).
    pub missing_slots: usize,
}

/// Reads every frontend from a snapshot, sorted by Service then frontend.
pub fn view(snapshot: &Snapshot) -> Vec<FrontendView> {
    let mut out: Vec<FrontendView> = snapshot
        .frontends()
        .into_iter()
        .map(|(key, programmed)| {
            let name = &programmed.name;
            FrontendView {
                service: ServicePortName {
                    namespace: name.namespace().to_owned(),
                    name: name.name().to_owned(),
                    port: name.port_name().to_owned(),
                },
                frontend: frontend_of(&key),
                service_id: programmed.service_id,
                missing_slots: programmed.slots.iter().filter(|s| s.is_none()).count(),
                backends: programmed.slots.iter().flatten().map(backend_of).collect(),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, a.frontend).cmp(&(&b.service, b.frontend)));
    out
}

#[cfg(test)]
mod tests;
