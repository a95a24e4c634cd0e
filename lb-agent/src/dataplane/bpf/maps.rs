//! lb's maps as typed aya maps, read and written as the dataplane's [`MapStore`].

use std::{io::ErrorKind, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf, Pod,
    maps::{HashMap, IterableMap as _, Map, MapData, MapError, PerCpuHashMap, PerCpuValues},
};
use lb_common::{
    Backend4, Backend6, BackendMember, BackendMember4Key, BackendMember6Key, BackendSlotKey,
    Frontend4Key, Frontend6Key, LAYOUT_VERSION, ServiceCounters, ServiceEntry, ServiceName,
};

use super::batch::{self, Stopped};
use super::pins::{layout_dir, pinned_layouts};
use super::{
    BACKENDS_MAP, BACKENDS6_MAP, COUNTERS_MAP, MEMBERS_MAP, MEMBERS6_MAP, NAMES_MAP, SERVICES_MAP,
    SERVICES6_MAP,
};
use crate::dataplane::{
    MapStore, Snapshot,
    plan::{BackendAddr, Family, FrontendKey, MapOp, Write},
    write_past_failures,
};

/// Batches at least this large, when a step has two or more, are written in parallel.
const PARALLEL_BATCH: usize = 1024;

/// The maps, with the key and value types of lb-common.
pub struct BpfMaps {
    services: HashMap<MapData, Frontend4Key, ServiceEntry>,
    backends: HashMap<MapData, BackendSlotKey, Backend4>,
    members: HashMap<MapData, BackendMember4Key, BackendMember>,
    services6: HashMap<MapData, Frontend6Key, ServiceEntry>,
    backends6: HashMap<MapData, BackendSlotKey, Backend6>,
    members6: HashMap<MapData, BackendMember6Key, BackendMember>,
    names: HashMap<MapData, u32, ServiceName>,
    counters: PerCpuHashMap<MapData, u32, ServiceCounters>,
}

impl BpfMaps {
    /// Opens the maps of this agent's layout version pinned under `pin_dir` (by a running or
    /// stopped agent).
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let maps_dir = layout_dir(pin_dir, LAYOUT_VERSION);
        if !maps_dir.join(SERVICES_MAP).exists() {
            let others = pinned_layouts(pin_dir)?;
            if !others.is_empty() {
                anyhow::bail!(
                    "the maps under {} are of layout version {}, and this lb-agent reads version \
                     {LAYOUT_VERSION}: use the lb-agent that wrote them (the running agent's \
                     image), or wait for an upgrade in progress to finish",
                    pin_dir.display(),
                    others
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" and ")
                );
            }
        }
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = maps_dir.join(name);
            let data = MapData::from_pin(&path).map_err(|e| match e {
                MapError::SyscallError(ref s) if s.io_error.kind() == ErrorKind::NotFound => {
                    anyhow::anyhow!(
                        "no lb dataplane at {}: {} is not pinned; start `lb-agent run` (with the \
                         same --pin-dir) first",
                        pin_dir.display(),
                        name
                    )
                }
                e => anyhow::Error::new(e).context(format!("opening {}", path.display())),
            })?;
            Map::from_map_data(data).with_context(|| format!("opening {}", path.display()))
        };
        Self::from_maps(open)
    }

    pub(super) fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::from_maps(|name| {
            ebpf.take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))
        })
    }

    /// The maps, each got by name from `get` and checked against its key and value types.
    fn from_maps(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            services: typed(get(SERVICES_MAP)?, SERVICES_MAP)?,
            backends: typed(get(BACKENDS_MAP)?, BACKENDS_MAP)?,
            members: typed(get(MEMBERS_MAP)?, MEMBERS_MAP)?,
            services6: typed(get(SERVICES6_MAP)?, SERVICES6_MAP)?,
            backends6: typed(get(BACKENDS6_MAP)?, BACKENDS6_MAP)?,
            members6: typed(get(MEMBERS6_MAP)?, MEMBERS6_MAP)?,
            names: typed(get(NAMES_MAP)?, NAMES_MAP)?,
            counters: PerCpuHashMap::try_from(get(COUNTERS_MAP)?)
                .with_context(|| layout_differs(COUNTERS_MAP))?,
        })
    }

    /// A frontend's counters (by service id), summed over the CPUs: zero until the programs
    /// first translate (or refuse) for it, which creates them.
    pub fn counters(&self, service_id: u32) -> anyhow::Result<ServiceCounters> {
        match self.counters.get(&service_id, 0) {
            Ok(per_cpu) => Ok(total(&per_cpu)),
            Err(MapError::KeyNotFound) => Ok(ServiceCounters::default()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {COUNTERS_MAP}"))),
        }
    }

    /// One batch of writes of one op ([`MapStore::write_batch`]); needs only `&self`, so that
    /// batches on different maps can run at once.
    fn batch(&self, writes: &[&Write]) -> Result<(), (usize, anyhow::Error)> {
        let Some(first) = writes.first() else {
            return Ok(());
        };
        // Every write is of `first`'s op: the closures pick its key and value, and panic on
        // any other (a bug in the caller).
        fn other(write: &Write) -> ! {
            panic!("a batch mixes map ops: {write:?}")
        }
        // An op names its family, so a backend of the other one is a bug of the same kind.
        let v4 = |b: &BackendAddr| match b {
            BackendAddr::V4(b) => *b,
            BackendAddr::V6(_) => panic!("an IPv6 backend in a batch for an IPv4 map: {b:?}"),
        };
        let v6 = |b: &BackendAddr| match b {
            BackendAddr::V6(b) => *b,
            BackendAddr::V4(_) => panic!("an IPv4 backend in a batch for an IPv6 map: {b:?}"),
        };
        match first.op() {
            MapOp::PutName => put(&self.names, NAMES_MAP, writes, |w| match w {
                Write::PutName(id, name) => (*id, **name),
                w => other(w),
            }),
            MapOp::DeleteName => delete(&self.names, NAMES_MAP, writes, |w| match w {
                Write::DeleteName(id) => *id,
                w => other(w),
            }),
            MapOp::PutBackend(Family::V4) => {
                put(&self.backends, BACKENDS_MAP, writes, |w| match w {
                    Write::PutBackend(k, b) => (*k, v4(b)),
                    w => other(w),
                })
            }
            MapOp::PutBackend(Family::V6) => {
                put(&self.backends6, BACKENDS6_MAP, writes, |w| match w {
                    Write::PutBackend(k, b) => (*k, v6(b)),
                    w => other(w),
                })
            }
            MapOp::DeleteBackend(Family::V4) => {
                delete(&self.backends, BACKENDS_MAP, writes, |w| match w {
                    Write::DeleteBackend(_, k) => *k,
                    w => other(w),
                })
            }
            MapOp::DeleteBackend(Family::V6) => {
                delete(&self.backends6, BACKENDS6_MAP, writes, |w| match w {
                    Write::DeleteBackend(_, k) => *k,
                    w => other(w),
                })
            }
            MapOp::PutService(Family::V4) => {
                put(&self.services, SERVICES_MAP, writes, |w| match w {
                    Write::PutService(FrontendKey::V4(k), e) => (*k, *e),
                    w => other(w),
                })
            }
            MapOp::PutService(Family::V6) => {
                put(&self.services6, SERVICES6_MAP, writes, |w| match w {
                    Write::PutService(FrontendKey::V6(k), e) => (*k, *e),
                    w => other(w),
                })
            }
            MapOp::DeleteService(Family::V4) => {
                delete(&self.services, SERVICES_MAP, writes, |w| match w {
                    Write::DeleteService(FrontendKey::V4(k)) => *k,
                    w => other(w),
                })
            }
            MapOp::DeleteService(Family::V6) => {
                delete(&self.services6, SERVICES6_MAP, writes, |w| match w {
                    Write::DeleteService(FrontendKey::V6(k)) => *k,
                    w => other(w),
                })
            }
            MapOp::DeleteCounters => delete_keys(
                self.counters.map(),
                COUNTERS_MAP,
                writes
                    .iter()
                    .map(|w| match w {
                        Write::DeleteCounters(id) => *id,
                        w => other(w),
                    })
                    .collect(),
            ),
            MapOp::PutMember(Family::V4) => put(&self.members, MEMBERS_MAP, writes, |w| match w {
                Write::PutMember(id, b) => {
                    (BackendMember4Key::new(*id, &v4(b)), BackendMember::MARKER)
                }
                w => other(w),
            }),
            MapOp::PutMember(Family::V6) => {
                put(&self.members6, MEMBERS6_MAP, writes, |w| match w {
                    Write::PutMember(id, b) => {
                        (BackendMember6Key::new(*id, &v6(b)), BackendMember::MARKER)
                    }
                    w => other(w),
                })
            }
            MapOp::DeleteMember(Family::V4) => {
                delete(&self.members, MEMBERS_MAP, writes, |w| match w {
                    Write::DeleteMember(id, b) => BackendMember4Key::new(*id, &v4(b)),
                    w => other(w),
                })
            }
            MapOp::DeleteMember(Family::V6) => {
                delete(&self.members6, MEMBERS6_MAP, writes, |w| match w {
                    Write::DeleteMember(id, b) => BackendMember6Key::new(*id, &v6(b)),
                    w => other(w),
                })
            }
        }
    }
}

fn typed<K: aya::Pod, V: aya::Pod>(map: Map, name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    HashMap::try_from(map).with_context(|| layout_differs(name))
}

/// A frontend's counters, summed over the CPUs.
fn total(per_cpu: &PerCpuValues<ServiceCounters>) -> ServiceCounters {
    per_cpu
        .iter()
        .fold(ServiceCounters::default(), |sum, cpu| sum.add(cpu))
}

fn layout_differs(name: &str) -> String {
    format!("map {name} does not have the layout this agent expects; run `lb-agent reset`")
}

/// The counters for `/metrics`, from maps of their own (opened from the pins).
impl crate::metrics::CounterSource for BpfMaps {
    fn read(&self) -> anyhow::Result<Vec<crate::metrics::Reading>> {
        let mut out = Vec::new();
        for entry in self.counters.iter() {
            let (id, per_cpu) = entry.with_context(|| format!("reading {COUNTERS_MAP}"))?;
            let counters = total(&per_cpu);
            let service = self
                .names
                .get(&id, 0)
                .ok()
                .map(|name| crate::model::ServicePortName {
                    namespace: name.namespace().to_owned(),
                    name: name.name().to_owned(),
                    port: name.port_name().to_owned(),
                });
            out.push((id, counters, service));
        }
        Ok(out)
    }
}

impl MapStore for BpfMaps {
    /// One write is a batch of one: the same map and key choice, and the same errors.
    fn write(&mut self, write: &Write) -> anyhow::Result<()> {
        self.batch(&[write]).map_err(|(_, error)| error)
    }

    fn write_batch(&mut self, writes: &[&Write]) -> Result<(), (usize, anyhow::Error)> {
        self.batch(writes)
    }

    /// Large batches each get a thread: the kernel's per-entry work is most of a cold start's
    /// map writing, and a map's locks are per bucket.
    fn write_batches(&mut self, batches: &[&[&Write]]) -> Vec<Vec<(usize, anyhow::Error)>> {
        let this = &*self;
        let large = batches.iter().filter(|b| b.len() >= PARALLEL_BATCH).count();
        if large < 2 {
            return batches
                .iter()
                .map(|writes| write_past_failures(writes, |rest| this.batch(rest)))
                .collect();
        }
        std::thread::scope(|scope| {
            let running: Vec<_> = batches
                .iter()
                .map(|writes| {
                    scope.spawn(move || write_past_failures(writes, |rest| this.batch(rest)))
                })
                .collect();
            running
                .into_iter()
                .map(|thread| thread.join().expect("a map-writing thread panicked"))
                .collect()
        })
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        fn all<K: Pod, V: Pod>(
            map: &HashMap<MapData, K, V>,
            name: &str,
        ) -> anyhow::Result<Vec<(K, V)>> {
            batch::lookup_all(map.map()).with_context(|| format!("reading {name}"))
        }
        fn keys<K: Pod, V: Pod>(
            map: &HashMap<MapData, K, V>,
            name: &str,
        ) -> anyhow::Result<Vec<K>> {
            Ok(all(map, name)?.into_iter().map(|(k, _)| k).collect())
        }
        Ok(Snapshot {
            services4: all(&self.services, SERVICES_MAP)?,
            backends4: all(&self.backends, BACKENDS_MAP)?,
            services6: all(&self.services6, SERVICES6_MAP)?,
            backends6: all(&self.backends6, BACKENDS6_MAP)?,
            members4: keys(&self.members, MEMBERS_MAP)?,
            members6: keys(&self.members6, MEMBERS6_MAP)?,
            names: all(&self.names, NAMES_MAP)?,
            counters: self
                .counters
                .keys()
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {COUNTERS_MAP}"))?,
        })
    }
}

fn full(map: &str) -> anyhow::Error {
    anyhow::anyhow!("map {map} {}", crate::dataplane::FailureKind::MAP_FULL)
}

/// Puts the entries `entry` makes of `writes` in one batch.
fn put<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
    writes: &[&Write],
    entry: impl Fn(&Write) -> (K, V),
) -> Result<(), (usize, anyhow::Error)> {
    let (keys, values): (Vec<K>, Vec<V>) = writes.iter().map(|w| entry(w)).unzip();
    batch::update(map.map(), &keys, &values).map_err(|Stopped { done, error }| {
        let error = match error.raw_os_error() {
            Some(libc::E2BIG) => full(name),
            _ => anyhow::Error::new(error).context(format!("writing map {name}")),
        };
        (done, error)
    })
}

/// Deletes the keys `key` makes of `writes` in batches; a key that is not there is not an error.
fn delete<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &str,
    writes: &[&Write],
    key: impl Fn(&Write) -> K,
) -> Result<(), (usize, anyhow::Error)> {
    delete_keys(map.map(), name, writes.iter().map(|w| key(w)).collect())
}

/// Deletes `keys` from `map` in batches; a key that is not there is not an error.
fn delete_keys<K: Pod>(
    map: &MapData,
    name: &str,
    keys: Vec<K>,
) -> Result<(), (usize, anyhow::Error)> {
    let mut start = 0;
    while start < keys.len() {
        match batch::delete(map, &keys[start..]) {
            Ok(()) => break,
            Err(Stopped { done, error }) if error.kind() == ErrorKind::NotFound => {
                start += done + 1;
            }
            Err(Stopped { done, error }) => {
                let error = anyhow::Error::new(error).context(format!("deleting from map {name}"));
                return Err((start + done, error));
            }
        }
    }
    Ok(())
}
