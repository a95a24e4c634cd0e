//! Ending the sockets lb translated to backends that left a frontend's set (lb-ebpf's
//! `terminate.rs`): the agent lists the departures in `LB4_TERMINATE`/`LB6_TERMINATE`, runs the
//! TCP and UDP socket iterators in every network namespace that has a process in the cgroup (an
//! iterator sees the sockets of the namespace of the thread that opens it), and empties the maps.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::Read as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, IterableMap as _, MapData, MapError},
    programs::Iter,
};
use lb_common::{MAX_TERMINATIONS, ServiceAddr4, ServiceAddr6, Terminate4Key, Terminate6Key};
use nix::sched::{CloneFlags, setns};
use tracing::warn;

use super::batch;
use crate::dataplane::{
    Departure,
    plan::{BackendAddr, FrontendKey},
};

/// The socket iterator programs, and the kind of socket each walks.
pub const ITERATORS: [(&str, &str); 2] = [("lb_end_tcp", "tcp"), ("lb_end_udp", "udp")];
pub const TERMINATE_MAP: &str = "LB4_TERMINATE";
pub const TERMINATE6_MAP: &str = "LB6_TERMINATE";

/// What one [`Terminator::end_sockets`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ended {
    pub sockets: usize,
    pub namespaces: usize,
}

/// The loaded iterator programs and the maps that tell them which sockets to end.
pub struct Terminator {
    /// Holds the iterator programs (aya cannot take a program out of its object).
    ebpf: Ebpf,
    v4: HashMap<MapData, Terminate4Key, u32>,
    v6: HashMap<MapData, Terminate6Key, u32>,
    cgroup: PathBuf,
}

impl Terminator {
    /// `ebpf` with its iterator programs loaded and its terminate maps not yet taken.
    pub(super) fn new(mut ebpf: Ebpf, cgroup: &Path) -> anyhow::Result<Self> {
        let mut take = |name: &str| {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("the eBPF object has no map {name}"))?;
            anyhow::Ok(map)
        };
        let (v4, v6) = (take(TERMINATE_MAP)?, take(TERMINATE6_MAP)?);
        Ok(Self {
            v4: HashMap::try_from(v4)?,
            v6: HashMap::try_from(v6)?,
            ebpf,
            cgroup: cgroup.to_owned(),
        })
    }

    /// Ends every socket that lb translated to a departed backend through the frontend it left,
    /// in every network namespace of the cgroup's processes.
    pub fn end_sockets(&mut self, departures: &[Departure]) -> anyhow::Result<Ended> {
        let mut ended = Ended::default();
        if departures.is_empty() {
            return Ok(ended);
        }
        let namespaces = namespaces(&self.cgroup)?;
        ended.namespaces = namespaces.len();
        if namespaces.is_empty() {
            warn!(
                cgroup = %self.cgroup.display(),
                "no process of the cgroup was found (a Pod without hostPID sees only its own): \
                 the sockets to the backends that left are not ended"
            );
            return Ok(ended);
        }
        for round in departures.chunks(MAX_TERMINATIONS as usize) {
            // The maps hold exactly this round's departures while the iterators run: anything
            // an earlier, failed round left would end sockets by mistake.
            self.clear()?;
            let (v4, v6) = keys(round);
            let written = batch::update(self.v4.map(), &v4.keys, &v4.ids)
                .and_then(|()| batch::update(self.v6.map(), &v6.keys, &v6.ids))
                .map_err(|s| s.error)
                .context("writing the terminate maps");
            let run = written.map(|()| self.run_iterators(&namespaces));
            let cleared = self.clear();
            ended.sockets += run?;
            cleared?;
        }
        Ok(ended)
    }

    /// Empties both terminate maps.
    fn clear(&mut self) -> anyhow::Result<()> {
        let v4: Vec<Terminate4Key> = self.v4.keys().collect::<Result<_, _>>()?;
        for key in v4 {
            removed(self.v4.remove(&key))?;
        }
        let v6: Vec<Terminate6Key> = self.v6.keys().collect::<Result<_, _>>()?;
        for key in v6 {
            removed(self.v6.remove(&key))?;
        }
        Ok(())
    }

    /// Runs both iterators in each namespace; how many sockets they ended. A namespace where
    /// they cannot run is logged, and the others go on.
    fn run_iterators(&mut self, namespaces: &[File]) -> usize {
        let mut ended = 0;
        for (name, _) in ITERATORS {
            for namespace in namespaces {
                match self.run_iterator(name, namespace) {
                    Ok(n) => ended += n,
                    Err(e) => {
                        warn!("ending sockets with {name} in a namespace of the cgroup: {e:#}")
                    }
                }
            }
        }
        ended
    }

    /// Runs iterator `name` in `namespace`; how many sockets it ended.
    fn run_iterator(&mut self, name: &str, namespace: &File) -> anyhow::Result<usize> {
        let program: &mut Iter = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        let link = program.attach()?;
        let link = program.take_link(link)?;
        // A thread of its own enters the namespace: the iterator walks the sockets of the
        // namespace of the thread that opens it.
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> anyhow::Result<usize> {
                    setns(namespace, CloneFlags::CLONE_NEWNET)
                        .context("entering a network namespace of the cgroup")?;
                    let mut output = Vec::new();
                    link.into_file()
                        .with_context(|| format!("opening iterator {name}"))?
                        .read_to_end(&mut output)
                        .with_context(|| format!("running iterator {name}"))?;
                    // One socket cookie per socket ended.
                    Ok(output.len() / 8)
                })
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("iterator thread panicked")))
        })
    }
}

/// A removal's result, where a key already gone is fine.
fn removed(result: Result<(), MapError>) -> anyhow::Result<()> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(anyhow::Error::new(e).context("emptying the terminate maps")),
    }
}

/// The departures as keys and values of the two terminate maps.
struct Keys<K> {
    keys: Vec<K>,
    ids: Vec<u32>,
}

fn keys(departures: &[Departure]) -> (Keys<Terminate4Key>, Keys<Terminate6Key>) {
    let mut v4 = Keys {
        keys: Vec::new(),
        ids: Vec::new(),
    };
    let mut v6 = Keys {
        keys: Vec::new(),
        ids: Vec::new(),
    };
    for d in departures {
        match (d.frontend, d.backend) {
            (FrontendKey::V4(f), BackendAddr::V4(backend)) => {
                v4.keys.push(Terminate4Key {
                    backend,
                    frontend: ServiceAddr4 {
                        address: f.address,
                        port: f.port,
                        _pad: 0,
                    },
                    protocol: f.protocol,
                    _pad: 0,
                });
                v4.ids.push(d.service_id);
            }
            (FrontendKey::V6(f), BackendAddr::V6(backend)) => {
                v6.keys.push(Terminate6Key {
                    backend,
                    frontend: ServiceAddr6 {
                        address: f.address,
                        port: f.port,
                        _pad: 0,
                    },
                    protocol: f.protocol,
                    _pad: 0,
                });
                v6.ids.push(d.service_id);
            }
            // A frontend's backends are of its family.
            _ => {}
        }
    }
    (v4, v6)
}

/// One open handle on each network namespace that has a process in `cgroup` or below it.
/// Processes and cgroups that go away meanwhile are skipped.
fn namespaces(cgroup: &Path) -> anyhow::Result<Vec<File>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut dirs = vec![cgroup.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines() {
            let path = format!("/proc/{pid}/ns/net");
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if seen.insert((meta.dev(), meta.ino()))
                && let Ok(file) = File::open(&path)
            {
                out.push(file);
            }
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push(entry.path());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::{Backend4, Backend6, Frontend4Key, Frontend6Key, protocol};

    #[test]
    fn departures_become_keys_of_their_family_with_the_frontend_and_protocol() {
        let b4 = Backend4 {
            address: [10, 244, 0, 1],
            port: 8080,
            _pad: 0,
        };
        let b6 = Backend6 {
            address: [0xfd; 16],
            port: 53,
            _pad: 0,
        };
        let departures = [
            Departure {
                frontend: FrontendKey::V4(Frontend4Key {
                    address: [10, 96, 0, 10],
                    port: 80,
                    protocol: protocol::TCP,
                    _pad: 0,
                }),
                service_id: 7,
                backend: BackendAddr::V4(b4),
            },
            Departure {
                frontend: FrontendKey::V6(Frontend6Key {
                    address: [0xfe; 16],
                    port: 53,
                    protocol: protocol::UDP,
                    _pad: 0,
                }),
                service_id: 9,
                backend: BackendAddr::V6(b6),
            },
        ];
        let (v4, v6) = keys(&departures);
        assert_eq!(
            (v4.keys.as_slice(), v4.ids.as_slice()),
            (
                [Terminate4Key {
                    backend: b4,
                    frontend: ServiceAddr4 {
                        address: [10, 96, 0, 10],
                        port: 80,
                        _pad: 0
                    },
                    protocol: protocol::TCP,
                    _pad: 0
                }]
                .as_slice(),
                [7].as_slice()
            )
        );
        assert_eq!(v6.ids, [9]);
        assert_eq!(v6.keys[0].protocol, protocol::UDP);
        assert_eq!(v6.keys[0].frontend.address, [0xfe; 16]);
    }

    #[test]
    fn namespaces_are_found_once_each_in_the_cgroup_and_below() {
        // This process's own cgroup: it is in it, so its namespace is found, once.
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
            return; // no cgroup v2 here
        };
        let Ok(root) = crate::cgroup::cgroup2_mount() else {
            return;
        };
        let dir = root.join(path.trim_start_matches('/'));
        let found = namespaces(&dir).unwrap();
        let mine = fs::metadata("/proc/self/ns/net").unwrap();
        let matching = found
            .iter()
            .filter(|f| {
                let m = f.metadata().unwrap();
                (m.dev(), m.ino()) == (mine.dev(), mine.ino())
            })
            .count();
        assert_eq!(matching, 1, "{dir:?}");
    }
}
