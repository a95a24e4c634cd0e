//! The BPF objects: loading the programs, pinning maps and the cgroup links under the pin
//! directory, and reading and writing the maps.
//!
//! Pins outlive the agent: while it is stopped or restarting, the attached program keeps
//! translating sockets with the maps as last written. A new agent reuses the pinned maps (so
//! nothing is flushed, not even the per-socket state of open sockets) and swaps in its own
//! programs atomically, one hook at a time.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    mem::size_of,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, MapInfo},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use lb_common::{
    Backend4, Backend6, BackendMember, BackendMember4Key, BackendMember6Key, BackendSlotKey,
    Frontend4Key, Frontend6Key, Reverse4Key, Reverse6Key, ServiceAddr4, ServiceAddr6, ServiceEntry,
    ServiceName, SockBackend4, SockBackend6, SockFrontend4Key, SockFrontend6Key,
};
use tracing::{debug, info, warn};

use super::{
    MapStore, Snapshot,
    plan::{BackendAddr, Family, FrontendKey, Write},
};

pub const SERVICES_MAP: &str = "LB4_SERVICES";
pub const BACKENDS_MAP: &str = "LB4_BACKENDS";
pub const SERVICES6_MAP: &str = "LB6_SERVICES";
pub const BACKENDS6_MAP: &str = "LB6_BACKENDS";
pub const MEMBERS_MAP: &str = "LB4_MEMBERS";
pub const MEMBERS6_MAP: &str = "LB6_MEMBERS";
pub const NAMES_MAP: &str = "LB_SVC_NAMES";
/// The per-socket LRU maps the programs write themselves (see lb-common).
pub const SOCKET_MAPS: [&str; 4] = [
    "LB4_REVERSE",
    "LB6_REVERSE",
    "LB4_SOCK_BACKEND",
    "LB6_SOCK_BACKEND",
];

/// The programs, each attached to the cgroup through a link pinned as `<hook>_link`.
pub const PROGRAMS: [Program; 8] = [
    // TCP and connected UDP.
    Program::new("lb_connect4", "connect4"),
    Program::new("lb_connect6", "connect6"),
    // Unconnected UDP, and the source its replies show.
    Program::new("lb_sendmsg4", "sendmsg4"),
    Program::new("lb_sendmsg6", "sendmsg6"),
    Program::new("lb_recvmsg4", "recvmsg4"),
    Program::new("lb_recvmsg6", "recvmsg6"),
    // The peer a translated socket reports.
    Program::new("lb_getpeername4", "getpeername4"),
    Program::new("lb_getpeername6", "getpeername6"),
];

/// One cgroup sock_addr program of lb-ebpf.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Function name in the eBPF object.
    pub name: &'static str,
    /// The cgroup hook (`bpftool cgroup show` says `cgroup_inet4_connect` and so on).
    pub hook: &'static str,
}

impl Program {
    const fn new(name: &'static str, hook: &'static str) -> Self {
        Self { name, hook }
    }

    /// Pin of the link that keeps the program attached.
    pub fn link_pin(&self) -> String {
        format!("{}_link", self.hook)
    }

    /// Where a new link is pinned before it replaces [`link_pin`](Self::link_pin) (bpffs allows
    /// no dots in names).
    fn staging_pin(&self) -> String {
        format!("{}_link_new", self.hook)
    }
}

/// The maps the agent writes, each pinned under its own name.
const MAPS: [&str; 7] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    MEMBERS_MAP,
    SERVICES6_MAP,
    BACKENDS6_MAP,
    MEMBERS6_MAP,
    NAMES_MAP,
];

/// Every pin lb makes, in the order `reset` removes them (links first: detaching stops the
/// rewriting before the maps go away).
fn pins() -> Vec<String> {
    let links = PROGRAMS
        .iter()
        .flat_map(|p| [p.link_pin(), p.staging_pin()]);
    let maps = MAPS.iter().chain(&SOCKET_MAPS).map(|m| m.to_string());
    links.chain(maps).collect()
}

/// The eBPF object, built from lb-ebpf by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// `statfs.f_type` of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps, with the key and value types of lb-common.
pub struct BpfMaps {
    services: HashMap<MapData, Frontend4Key, ServiceEntry>,
    backends: HashMap<MapData, BackendSlotKey, Backend4>,
    members: HashMap<MapData, BackendMember4Key, BackendMember>,
    services6: HashMap<MapData, Frontend6Key, ServiceEntry>,
    backends6: HashMap<MapData, BackendSlotKey, Backend6>,
    members6: HashMap<MapData, BackendMember6Key, BackendMember>,
    names: HashMap<MapData, u32, ServiceName>,
}

impl BpfMaps {
    /// Opens the maps pinned under `pin_dir` (by a running or stopped agent).
    pub fn open_pinned(pin_dir: &Path) -> anyhow::Result<Self> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = pin_dir.join(name);
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
            Ok(Map::HashMap(data))
        };
        Self::from_maps(open)
    }

    fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
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
        })
    }
}

fn typed<K: aya::Pod, V: aya::Pod>(map: Map, name: &str) -> anyhow::Result<HashMap<MapData, K, V>> {
    HashMap::try_from(map).with_context(|| {
        format!("map {name} does not have the layout this agent expects; run `lb-agent reset`")
    })
}

impl MapStore for BpfMaps {
    fn write(&mut self, write: &Write) -> anyhow::Result<()> {
        let (map, result) = match write {
            Write::PutName(id, name) => (NAMES_MAP, self.names.insert(id, name.as_ref(), 0)),
            Write::DeleteName(id) => (NAMES_MAP, ignore_missing(self.names.remove(id))),
            Write::PutBackend(key, BackendAddr::V4(b)) => {
                (BACKENDS_MAP, self.backends.insert(key, b, 0))
            }
            Write::PutBackend(key, BackendAddr::V6(b)) => {
                (BACKENDS6_MAP, self.backends6.insert(key, b, 0))
            }
            Write::DeleteBackend(Family::V4, key) => {
                (BACKENDS_MAP, ignore_missing(self.backends.remove(key)))
            }
            Write::DeleteBackend(Family::V6, key) => {
                (BACKENDS6_MAP, ignore_missing(self.backends6.remove(key)))
            }
            Write::PutService(FrontendKey::V4(k), e) => {
                (SERVICES_MAP, self.services.insert(k, e, 0))
            }
            Write::PutService(FrontendKey::V6(k), e) => {
                (SERVICES6_MAP, self.services6.insert(k, e, 0))
            }
            Write::DeleteService(FrontendKey::V4(k)) => {
                (SERVICES_MAP, ignore_missing(self.services.remove(k)))
            }
            Write::DeleteService(FrontendKey::V6(k)) => {
                (SERVICES6_MAP, ignore_missing(self.services6.remove(k)))
            }
            Write::PutMember(id, BackendAddr::V4(b)) => (
                MEMBERS_MAP,
                self.members
                    .insert(BackendMember4Key::new(*id, b), BackendMember::MARKER, 0),
            ),
            Write::PutMember(id, BackendAddr::V6(b)) => (
                MEMBERS6_MAP,
                self.members6
                    .insert(BackendMember6Key::new(*id, b), BackendMember::MARKER, 0),
            ),
            Write::DeleteMember(id, BackendAddr::V4(b)) => (
                MEMBERS_MAP,
                ignore_missing(self.members.remove(&BackendMember4Key::new(*id, b))),
            ),
            Write::DeleteMember(id, BackendAddr::V6(b)) => (
                MEMBERS6_MAP,
                ignore_missing(self.members6.remove(&BackendMember6Key::new(*id, b))),
            ),
        };
        result.map_err(|error| match &error {
            MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                anyhow::anyhow!("map {map} is full")
            }
            _ => anyhow::Error::new(error).context(format!("writing map {map}")),
        })
    }

    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        fn all<K: aya::Pod, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            name: &str,
        ) -> anyhow::Result<Vec<(K, V)>> {
            map.iter()
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {name}"))
        }
        fn keys<K: aya::Pod, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            name: &str,
        ) -> anyhow::Result<Vec<K>> {
            map.keys()
                .collect::<Result<_, _>>()
                .with_context(|| format!("reading {name}"))
        }
        Ok(Snapshot {
            services4: all(&self.services, SERVICES_MAP)?,
            backends4: all(&self.backends, BACKENDS_MAP)?,
            services6: all(&self.services6, SERVICES6_MAP)?,
            backends6: all(&self.backends6, BACKENDS6_MAP)?,
            members4: keys(&self.members, MEMBERS_MAP)?,
            members6: keys(&self.members6, MEMBERS6_MAP)?,
            names: all(&self.names, NAMES_MAP)?,
        })
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::SyscallError(s)) if s.io_error.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The loaded dataplane: its maps, and the reader of its eBPF log events.
pub struct Loaded {
    pub maps: BpfMaps,
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
}

/// Loads the programs with the maps pinned under `pin_dir` (reusing them when an earlier agent
/// left them) and attaches every program of [`PROGRAMS`] to `cgroup`, replacing the programs an
/// earlier agent left attached there without a moment in which sockets go untranslated.
/// `socket_map_entries` sizes each per-socket LRU map.
pub fn load_and_attach(
    pin_dir: &Path,
    cgroup: &Path,
    log_level: aya_log::Level,
    socket_map_entries: u32,
) -> anyhow::Result<Loaded> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this lb-agent was built with AYA_BUILD_SKIP=1 and has no eBPF programs; rebuild it with `xtask/run build`"
        );
    }
    if socket_map_entries == 0 {
        bail!("--socket-map-entries must be at least 1");
    }
    ensure_bpffs(pin_dir)?;
    fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
    check_pinned_layouts(pin_dir)?;
    refit_socket_maps(pin_dir, socket_map_entries)?;

    let pin = |name: &str| pin_dir.join(name);
    let map_pins: Vec<(&str, PathBuf)> = MAPS
        .iter()
        .chain(&SOCKET_MAPS)
        .map(|name| (*name, pin(name)))
        .collect();
    let level = log_level as u8;
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    for name in SOCKET_MAPS {
        loader.map_max_entries(name, socket_map_entries);
    }
    let mut ebpf = loader
        .override_global(aya_log::LEVEL, &level, true)
        .load(EBPF_OBJECT)
        .context("loading the eBPF programs (is this a kernel with BTF, and are we root?)")?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;

    let cgroup_dir = fs::File::open(cgroup).with_context(|| {
        format!(
            "opening cgroup {}; pass --cgroup with a cgroup v2 directory",
            cgroup.display()
        )
    })?;
    for program in PROGRAMS {
        attach(&mut ebpf, &program, &cgroup_dir, pin_dir).with_context(|| {
            format!(
                "attaching {} ({}, needs Linux >= 5.19) to cgroup {}",
                program.name,
                program.hook,
                cgroup.display()
            )
        })?;
    }
    info!(
        cgroup = %cgroup.display(),
        pins = %pin_dir.display(),
        programs = PROGRAMS.len(),
        "programs attached: connect, sendmsg, recvmsg and getpeername, IPv4 and IPv6"
    );

    let maps = BpfMaps::take(&mut ebpf)?;
    Ok(Loaded { maps, logger })
}

/// Loads `program` and attaches it to the cgroup, swapping out the link an earlier agent pinned.
fn attach(
    ebpf: &mut Ebpf,
    program: &Program,
    cgroup_dir: &fs::File,
    pin_dir: &Path,
) -> anyhow::Result<()> {
    let loaded: &mut CgroupSockAddr = ebpf
        .program_mut(program.name)
        .with_context(|| format!("the eBPF object has no {} program", program.name))?
        .try_into()?;
    loaded.load().context("loading it into the kernel")?;
    // A cgroup BPF link takes no attach flags and always runs alongside other programs (including
    // our previous one, until it is replaced below).
    let link_id = loaded.attach(cgroup_dir, CgroupAttachMode::Single)?;
    let link = FdLink::try_from(loaded.take_link(link_id)?)
        .context("the kernel attached it without a BPF link (needs Linux >= 5.7)")?;

    // Pin under a temporary name, then rename over the old pin: the old link's last reference
    // goes and it detaches only after ours is attached. Two identical programs in a row are
    // harmless: the second sees an already translated address, which is no frontend.
    let link_pin = pin_dir.join(program.link_pin());
    let staging = pin_dir.join(program.staging_pin());
    let _ = fs::remove_file(&staging);
    let pinned = link
        .pin(&staging)
        .with_context(|| format!("pinning the cgroup link at {}", staging.display()))?;
    fs::rename(&staging, &link_pin)
        .with_context(|| format!("replacing the pinned link {}", link_pin.display()))?;
    drop(pinned); // the pin keeps the link, and so the program, alive
    Ok(())
}

/// Refuses maps the agent writes that were pinned by an agent with another map layout: reusing
/// them would misread every entry. (The per-socket maps are replaced instead, by
/// [`refit_socket_maps`].)
fn check_pinned_layouts(pin_dir: &Path) -> anyhow::Result<()> {
    let expected = [
        (SERVICES_MAP, sizes::<Frontend4Key, ServiceEntry>()),
        (BACKENDS_MAP, sizes::<BackendSlotKey, Backend4>()),
        (MEMBERS_MAP, sizes::<BackendMember4Key, BackendMember>()),
        (SERVICES6_MAP, sizes::<Frontend6Key, ServiceEntry>()),
        (BACKENDS6_MAP, sizes::<BackendSlotKey, Backend6>()),
        (MEMBERS6_MAP, sizes::<BackendMember6Key, BackendMember>()),
        (NAMES_MAP, sizes::<u32, ServiceName>()),
    ];
    for (name, (key_size, value_size)) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        if (info.key_size() as usize, info.value_size() as usize) != (key_size, value_size) {
            bail!(
                "pinned map {} has key/value sizes {}/{}, this agent needs {key_size}/{value_size}: \
                 an incompatible lb version left it. Run `lb-agent reset --pin-dir {}` and start \
                 again (Services are not load-balanced until the agent has programmed them)",
                path.display(),
                info.key_size(),
                info.value_size(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// A map's key and value sizes.
fn sizes<K, V>() -> (usize, usize) {
    (size_of::<K>(), size_of::<V>())
}

/// A pinned per-socket map of another size than asked, or with the key and value layout of
/// another lb version, is unpinned, so the load creates a new one. The programs still attached
/// keep the old map until their links are swapped; what is lost is only the per-socket state of
/// sockets open across the restart (a reply in flight shows its Pod IP, a UDP socket may pick
/// another backend).
fn refit_socket_maps(pin_dir: &Path, entries: u32) -> anyhow::Result<()> {
    let layouts = [
        sizes::<Reverse4Key, ServiceAddr4>(),
        sizes::<Reverse6Key, ServiceAddr6>(),
        sizes::<SockFrontend4Key, SockBackend4>(),
        sizes::<SockFrontend6Key, SockBackend6>(),
    ];
    for (name, (key_size, value_size)) in SOCKET_MAPS.into_iter().zip(layouts) {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let pinned = (info.key_size() as usize, info.value_size() as usize);
        if info.max_entries() != entries {
            warn!(
                map = name,
                pinned = info.max_entries(),
                wanted = entries,
                "--socket-map-entries changed: replacing the map (per-socket state of open \
                 sockets is lost once)"
            );
        } else if pinned != (key_size, value_size) {
            warn!(
                map = name,
                pinned = ?pinned,
                wanted = ?(key_size, value_size),
                "its key/value sizes changed with this lb version: replacing the map \
                 (per-socket state of open sockets is lost once)"
            );
        } else {
            continue;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Removes every pin lb made under `pin_dir`: detaches the programs and frees the maps. Returns
/// what was removed.
pub fn reset(pin_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in pins() {
        let path = pin_dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => debug!("left {}: {e}", pin_dir.display()),
    }
    Ok(removed)
}

/// Makes sure `pin_dir` is on a BPF filesystem, mounting one at `/sys/fs/bpf` when that is where
/// it belongs and nothing is mounted (as other BPF agents do).
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    // The closest existing ancestor tells which filesystem the directory will be on.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && existing.starts_with(default) {
        info!("no BPF filesystem at /sys/fs/bpf; mounting one");
        mount_bpffs(default)?;
        if fs_type(default)? == BPF_FS_MAGIC {
            return Ok(());
        }
    }
    bail!(
        "{} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass \
         --pin-dir under a mounted one",
        pin_dir.display()
    )
}

fn fs_type(path: &Path) -> anyhow::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(stat.f_type as i64)
}

fn mount_bpffs(target: &Path) -> anyhow::Result<()> {
    let target_c = CString::new(target.as_os_str().as_bytes())?;
    let bpf = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            bpf.as_ptr(),
            target_c.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a BPF filesystem at {}", target.display()));
    }
    Ok(())
}
