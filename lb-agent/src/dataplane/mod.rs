//! The dataplane: owns lb's BPF maps and changes them only by the difference to what the model
//! wants, in the order [`plan`] documents.
//!
//! [`Dataplane`] works on any [`MapStore`]: the pinned BPF maps ([`bpf::BpfMaps`]) in the agent,
//! an in-memory store in tests.

pub mod bpf;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    Backend4, BackendSlotKey, Frontend4Key, MAX_BACKENDS_PER_SERVICE, ServiceEntry, ServiceName,
};
use tracing::{debug, warn};

use crate::model::FrontendState;
use crate::model::{Backend, DesiredState, Frontend, Protocol, ServicePortName};
use plan::{ChangeKind, Programmed, ProgrammedFrontend, Scope, Wanted, WantedFrontend, Write};

/// Everything the maps hold, as read in one pass.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub services: Vec<(Frontend4Key, ServiceEntry)>,
    pub backends: Vec<(BackendSlotKey, Backend4)>,
    pub names: Vec<(u32, ServiceName)>,
}

/// The maps, as the dataplane needs them. Deleting a missing key is not an error.
pub trait MapStore {
    fn write(&mut self, write: &Write) -> anyhow::Result<()>;
    fn snapshot(&self) -> anyhow::Result<Snapshot>;
}

/// What one [`Dataplane::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Frontends left as they were, and why.
    pub failed: Vec<(Frontend, String)>,
    /// IPv6 frontends, which the IPv4 datapath does not program yet.
    pub skipped_ipv6: usize,
}

impl ApplyReport {
    #[cfg(test)]
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

pub struct Dataplane<S> {
    store: S,
    programmed: Programmed,
}

impl<S: MapStore> Dataplane<S> {
    /// Takes over the maps as they are (an earlier agent's work stays in place until the first
    /// [`apply`](Self::apply) changes what differs), and drops entries nothing can reach.
    pub fn adopt(store: S) -> anyhow::Result<Self> {
        let mut dataplane = Self {
            store,
            programmed: Programmed::new(),
        };
        dataplane.reload()?;
        Ok(dataplane)
    }

    /// Number of frontends programmed.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    /// Brings the maps to `desired`, changing only what differs; frontends not in `desired` are
    /// removed. A frontend that cannot be written (bad size, full map) is reported and keeps its
    /// previous programming; the others proceed.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted = self.wanted(
            desired.frontends.iter().map(|(f, s)| (f, Some(s))),
            &mut report,
        );
        self.execute(&wanted, Scope::All, report)
    }

    /// Applies changed frontends only (`None`: the frontend is gone); the rest stay as they are.
    pub fn apply_changes(
        &mut self,
        changed: &BTreeMap<Frontend, Option<FrontendState>>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted = self.wanted(changed.iter().map(|(f, s)| (f, s.as_ref())), &mut report);
        let keys: BTreeSet<Frontend4Key> = changed.keys().filter_map(frontend_key).collect();
        self.execute(&wanted, Scope::Only(&keys), report)
    }

    fn execute(&mut self, wanted: &Wanted, scope: Scope, mut report: ApplyReport) -> ApplyReport {
        let mut interrupted = false;
        for change in plan::plan(&self.programmed, wanted, scope) {
            let result = change
                .writes
                .iter()
                .try_for_each(|write| self.store.write(write));
            match result {
                Ok(()) => {
                    match change.kind {
                        ChangeKind::Added => report.added += 1,
                        ChangeKind::Updated => report.updated += 1,
                        ChangeKind::Removed => report.removed += 1,
                    }
                    match change.after {
                        Some(after) => self.programmed.insert(change.frontend, after),
                        None => self.programmed.remove(&change.frontend),
                    };
                }
                Err(error) => {
                    interrupted = true;
                    report
                        .failed
                        .push((frontend_of(&change.frontend), format!("{error:#}")));
                }
            }
        }
        // A change that stopped half-way left the maps between two valid states; read back what
        // they hold so the next plan starts from the truth.
        if interrupted && let Err(error) = self.reload() {
            warn!("could not re-read the maps after a failed write: {error:#}");
        }
        report
    }

    /// The model's frontends as map contents: IPv4 only (`None` states are left out, so the plan
    /// removes them); a frontend that cannot be programmed keeps what it has.
    fn wanted<'a>(
        &self,
        frontends: impl Iterator<Item = (&'a Frontend, Option<&'a FrontendState>)>,
        report: &mut ApplyReport,
    ) -> Wanted {
        let mut wanted = Wanted::new();
        for (frontend, state) in frontends {
            let Some(key) = frontend_key(frontend) else {
                debug!(%frontend, "IPv6 frontend not programmed: the datapath is IPv4 only");
                report.skipped_ipv6 += 1;
                continue;
            };
            let Some(state) = state else { continue };
            let backends: BTreeSet<Backend4> = state
                .backends
                .iter()
                .filter_map(|b| match b.address {
                    IpAddr::V4(a) => Some(Backend4 {
                        address: a.octets(),
                        port: b.port,
                        _pad: 0,
                    }),
                    IpAddr::V6(_) => None, // the model never pairs families; be safe anyway
                })
                .collect();
            if backends.len() > usize::from(MAX_BACKENDS_PER_SERVICE) {
                report.failed.push((
                    *frontend,
                    format!(
                        "{} has {} backends; at most {MAX_BACKENDS_PER_SERVICE} per frontend",
                        state.service,
                        backends.len()
                    ),
                ));
                if let Some(current) = self.programmed.get(&key) {
                    wanted.insert(key, keep(current));
                }
                continue;
            }
            let service = &state.service;
            wanted.insert(
                key,
                WantedFrontend {
                    name: ServiceName::new(&service.namespace, &service.name, &service.port),
                    backends,
                },
            );
        }
        wanted
    }

    /// Rebuilds the view of the maps from the maps, and deletes slots and names that no service
    /// entry reaches (left by an agent that stopped mid-change).
    fn reload(&mut self) -> anyhow::Result<()> {
        let snapshot = self.store.snapshot()?;
        let backends: BTreeMap<BackendSlotKey, Backend4> = snapshot.backends.into_iter().collect();
        let names: BTreeMap<u32, ServiceName> = snapshot.names.into_iter().collect();

        let mut programmed = Programmed::new();
        for (frontend, entry) in snapshot.services {
            let id = entry.service_id;
            let slots = (0..u32::from(entry.backend_count))
                .map(|slot| {
                    backends
                        .get(&BackendSlotKey {
                            service_id: id,
                            slot,
                        })
                        .copied()
                })
                .collect();
            let name = names
                .get(&id)
                .copied()
                .unwrap_or_else(|| ServiceName::new("", "", ""));
            programmed.insert(
                frontend,
                ProgrammedFrontend {
                    service_id: id,
                    name,
                    slots,
                },
            );
        }

        let reachable: BTreeMap<u32, usize> = programmed
            .values()
            .map(|p| (p.service_id, p.slots.len()))
            .collect();
        let orphans = backends
            .keys()
            .filter(|k| {
                reachable
                    .get(&k.service_id)
                    .is_none_or(|&count| k.slot as usize >= count)
            })
            .map(|k| Write::DeleteBackend(*k))
            .chain(
                names
                    .keys()
                    .filter(|id| !reachable.contains_key(id))
                    .map(|id| Write::DeleteName(*id)),
            );
        for write in orphans {
            debug!(?write, "removing unreachable map entry");
            self.store.write(&write)?;
        }
        self.programmed = programmed;
        Ok(())
    }
}

/// A wanted state equal to what is programmed, so the plan leaves it alone.
fn keep(current: &ProgrammedFrontend) -> WantedFrontend {
    WantedFrontend {
        name: current.name,
        backends: current.slots.iter().flatten().copied().collect(),
    }
}

fn frontend_key(frontend: &Frontend) -> Option<Frontend4Key> {
    match frontend.address {
        IpAddr::V4(address) => Some(Frontend4Key {
            address: address.octets(),
            port: frontend.port,
            protocol: frontend.protocol.number(),
            _pad: 0,
        }),
        IpAddr::V6(_) => None,
    }
}

fn frontend_of(key: &Frontend4Key) -> Frontend {
    Frontend {
        address: IpAddr::from(key.address),
        port: key.port,
        protocol: Protocol::from_number(key.protocol).unwrap_or(Protocol::Tcp),
    }
}

/// A frontend as read back from the maps, for `lb-agent list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendView {
    pub service: ServicePortName,
    pub frontend: Frontend,
    /// In slot order.
    pub backends: Vec<Backend>,
    /// Slots below the count that the map lacks (only after an interrupted write).
    pub missing_slots: usize,
}

/// Reads every frontend from a snapshot, sorted by Service then frontend.
pub fn view(snapshot: &Snapshot) -> Vec<FrontendView> {
    let backends: BTreeMap<BackendSlotKey, Backend4> = snapshot.backends.iter().copied().collect();
    let names: BTreeMap<u32, ServiceName> = snapshot.names.iter().copied().collect();
    let mut out: Vec<FrontendView> = snapshot
        .services
        .iter()
        .map(|(key, entry)| {
            let name = names.get(&entry.service_id);
            let slots: Vec<Option<&Backend4>> = (0..u32::from(entry.backend_count))
                .map(|slot| {
                    backends.get(&BackendSlotKey {
                        service_id: entry.service_id,
                        slot,
                    })
                })
                .collect();
            FrontendView {
                service: ServicePortName {
                    namespace: name.map(|n| n.namespace().to_owned()).unwrap_or_default(),
                    name: name.map(|n| n.name().to_owned()).unwrap_or_default(),
                    port: name.map(|n| n.port_name().to_owned()).unwrap_or_default(),
                },
                frontend: frontend_of(key),
                missing_slots: slots.iter().filter(|s| s.is_none()).count(),
                backends: slots
                    .into_iter()
                    .flatten()
                    .map(|b| Backend {
                        address: IpAddr::from(b.address),
                        port: b.port,
                    })
                    .collect(),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, a.frontend).cmp(&(&b.service, b.frontend)));
    out
}

#[cfg(test)]
mod tests;
