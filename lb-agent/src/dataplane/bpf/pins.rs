//! Loading the programs with the pinned maps of this agent's layout version, attaching them to the
//! cgroup through pinned links (swapped in without a gap) once the maps are programmed, removing
//! other layout versions' maps after that, `reset`, and the BPF filesystem.
//!
//! # Pins
//!
//! ```text
//! PIN_DIR/connect4_link …            the links: one per hook, whatever the layout
//! PIN_DIR/LB4_SERVICES …             layout version 1's maps (where lb kept them before versions)
//! PIN_DIR/v2/LB4_SERVICES …          layout version 2's maps, and so on
//! ```
//!
//! # Upgrades and rollbacks
//!
//! An agent loads its programs against the maps of its own version, creating them when they are
//! not there, while the programs an earlier agent attached keep translating with theirs. Only once
//! the agent's first sync has programmed its maps does it swap the links over ([`Attach`]), and
//! only then does it remove the maps of every other version: connects are translated all along, by
//! the old programs until the swap and by the new ones after. The same holds in both directions,
//! so a rollback is an upgrade to the older version.

use std::{
    fs,
    io::ErrorKind,
    mem::size_of,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{
        CgroupAttachMode, CgroupSockAddr, Iter,
        links::{FdLink, PinnedLink},
    },
};
use aya_obj::btf::BtfKind;
use lb_common::{
    Affinity4, Affinity6, AffinityKey, Backend4, Backend6, BackendMember, BackendMember4Key,
    BackendMember6Key, BackendSlotKey, Frontend4Key, Frontend6Key, LAYOUT_VERSION, Reverse4Key,
    Reverse6Key, ServiceAddr4, ServiceAddr6, ServiceCounters, ServiceEntry, ServiceName,
    SockBackend4, SockBackend6, SockFrontend4Key, SockFrontend6Key,
};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::{debug, info, warn};

use super::{
    AFFINITY_MAPS, BACKENDS_MAP, BACKENDS6_MAP, BpfMaps, COUNTERS_MAP, MAPS, MEMBERS_MAP,
    MEMBERS6_MAP, NAMES_MAP, PROGRAMS, Program, SERVICES_MAP, SERVICES6_MAP, SOCKET_MAPS,
    kfunc::{self, SOCK_DESTROY},
    link_pin_names,
    terminate::{ITERATORS, Terminator},
};

/// The eBPF object, built from lb-ebpf by build.rs.
pub(super) static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The loaded dataplane: its maps, the reader of its eBPF log events, and its programs, to attach
/// once the maps are programmed.
pub struct Loaded {
    pub maps: BpfMaps,
    pub logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    pub attach: Attach,
}

/// Where the maps of layout `version` are pinned under `pin_dir` (see the module documentation).
pub fn layout_dir(pin_dir: &Path, version: u32) -> PathBuf {
    match version {
        1 => pin_dir.to_owned(),
        n => pin_dir.join(format!("v{n}")),
    }
}

/// The layout versions whose maps are pinned under `pin_dir`, in order: those with a services
/// map, which every layout has (see [`version_dirs`] for what else may be there).
pub fn pinned_layouts(pin_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let mut versions: Vec<u32> = version_dirs(pin_dir)?
        .into_iter()
        .filter(|v| layout_dir(pin_dir, *v).join(SERVICES_MAP).exists())
        .collect();
    if pin_dir.join(SERVICES_MAP).exists() {
        versions.insert(0, 1);
    }
    Ok(versions)
}

/// The versions above 1 that have a directory under `pin_dir`, in order. One without a services
/// map holds maps an older agent did not know when it rolled back from that version (it removes
/// only the maps of its own day); they serve nothing and are swept at the next start.
fn version_dirs(pin_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pin_dir.display())),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let version = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.parse::<u32>().ok());
        if let Some(version) = version.filter(|v| *v > 1) {
            versions.push(version);
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Loads the programs with the maps of this agent's layout version ([`LAYOUT_VERSION`]) pinned
/// under `pin_dir`, reusing them when an earlier agent left them and creating them otherwise.
/// Nothing is attached yet: the programs attached now (an earlier agent's) keep translating
/// until [`Attach::attach`]. `lru` sizes the LRU maps the programs keep. With `end_sockets`, the
/// socket iterators that end sockets to removed backends are loaded too, when the kernel has
/// what they need.
pub fn load(
    pin_dir: &Path,
    cgroup: &Path,
    log_level: aya_log::Level,
    lru: LruSizes,
    end_sockets: bool,
) -> anyhow::Result<Loaded> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this lb-agent was built with AYA_BUILD_SKIP=1 and has no eBPF programs; rebuild it with `xtask/run build`"
        );
    }
    if lru.socket == 0 {
        bail!("--socket-map-entries must be at least 1");
    }
    if lru.affinity == 0 {
        bail!("--affinity-map-entries must be at least 1");
    }
    ensure_bpffs(pin_dir)?;
    let maps_dir = layout_dir(pin_dir, LAYOUT_VERSION);
    fs::create_dir_all(&maps_dir)
        .with_context(|| format!("creating pin directory {}", maps_dir.display()))?;
    let others: Vec<u32> = pinned_layouts(pin_dir)?
        .into_iter()
        .filter(|v| *v != LAYOUT_VERSION)
        .collect();
    for version in version_dirs(pin_dir)? {
        if version != LAYOUT_VERSION && !others.contains(&version) {
            let removed = remove_layout(pin_dir, version)?;
            info!(
                layout = version,
                removed = removed.len(),
                "removed maps left behind by a rollback from layout {version}"
            );
        }
    }
    let adopted = maps_dir.join(SERVICES_MAP).exists();
    match (adopted, others.as_slice()) {
        (true, _) => {
            info!(layout = LAYOUT_VERSION, maps = %maps_dir.display(), "reusing the pinned maps of this layout")
        }
        (false, []) => {
            info!(layout = LAYOUT_VERSION, maps = %maps_dir.display(), "creating the maps")
        }
        (false, others) => info!(
            layout = LAYOUT_VERSION,
            found = ?others,
            maps = %maps_dir.display(),
            "the pinned maps are of another layout: creating this layout's maps; the programs \
             attached now keep translating with theirs until this agent's first sync has \
             programmed its own, then the links are swapped and the old maps removed"
        ),
    }
    check_pinned_layouts(&maps_dir)?;
    refit_lru_maps(&maps_dir, lru)?;

    let pin = |name: &str| maps_dir.join(name);
    let map_pins: Vec<(&str, PathBuf)> = MAPS
        .iter()
        .chain(&SOCKET_MAPS)
        .chain(&AFFINITY_MAPS)
        .map(|name| (*name, pin(name)))
        .collect();
    let level = log_level as u8;
    // Without the kernel's BTF (no /sys/kernel/btf/vmlinux) everything but the socket iterators
    // still works.
    let btf = Btf::from_sys_fs().ok();
    let sock_destroy = btf
        .as_ref()
        .and_then(|btf| btf.id_by_type_name_kind(SOCK_DESTROY, BtfKind::Func).ok());
    let (object, _) = kfunc::patch_calls(EBPF_OBJECT, SOCK_DESTROY, sock_destroy)?;
    let mut loader = EbpfLoader::new();
    loader.btf(btf.as_ref());
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, entries, _) in lru.maps() {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf = loader
        .override_global(aya_log::LEVEL, &level, true)
        .load(&object)
        .context("loading the eBPF programs (is this a kernel with BTF, and are we root?)")?;
    let logger = aya_log::EbpfLogger::init(&mut ebpf).context("setting up eBPF logging")?;

    let cgroup_dir = fs::File::open(cgroup).with_context(|| {
        format!(
            "opening cgroup {}; pass --cgroup with a cgroup v2 directory",
            cgroup.display()
        )
    })?;
    // Loaded (verified) now, so that a program the kernel refuses stops the agent before it
    // changes anything.
    for program in PROGRAMS {
        let loaded: &mut CgroupSockAddr = ebpf
            .program_mut(program.name)
            .with_context(|| format!("the eBPF object has no {} program", program.name))?
            .try_into()?;
        loaded
            .load()
            .with_context(|| format!("loading {} into the kernel", program.name))?;
    }
    let ending =
        end_sockets && load_iterators(&mut ebpf, btf.as_ref().filter(|_| sock_destroy.is_some()));
    let maps = BpfMaps::take(&mut ebpf)?;
    Ok(Loaded {
        maps,
        logger,
        attach: Attach {
            ebpf,
            cgroup: cgroup.to_owned(),
            cgroup_dir,
            pin_dir: pin_dir.to_owned(),
            others,
            ending,
        },
    })
}

/// Loads the socket iterators (given the kernel's BTF, when it has `bpf_sock_destroy`), or says
/// once why sockets to removed backends stay connected.
fn load_iterators(ebpf: &mut Ebpf, btf: Option<&Btf>) -> bool {
    let Some(btf) = btf else {
        warn!(
            "this kernel has no bpf_sock_destroy (Linux >= 6.5): sockets connected to a backend \
             that leaves a Service stay connected until the application closes them"
        );
        return false;
    };
    let loaded = ITERATORS.iter().try_for_each(|(name, kind)| {
        let program: &mut Iter = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no {name} program"))?
            .try_into()?;
        program
            .load(kind, btf)
            .with_context(|| format!("loading {name} into the kernel"))
    });
    match loaded {
        Ok(()) => true,
        Err(e) => {
            warn!(
                "sockets connected to a backend that leaves a Service stay connected: the socket \
                 iterators that end them could not be loaded: {e:#}"
            );
            false
        }
    }
}

/// The loaded programs, waiting to replace the attached ones once the maps are programmed.
pub struct Attach {
    ebpf: Ebpf,
    cgroup: PathBuf,
    cgroup_dir: fs::File,
    pin_dir: PathBuf,
    /// Layout versions whose maps were pinned when the agent started: removed after the swap.
    others: Vec<u32>,
    /// Whether the socket iterators are loaded (sockets to removed backends are ended).
    ending: bool,
}

impl Attach {
    /// Attaches every program of [`PROGRAMS`] to the cgroup, replacing the programs an earlier
    /// agent left there without a moment in which sockets go untranslated; then removes the maps
    /// of other layout versions, which no attached program uses any more. Returns what ends
    /// sockets to removed backends, when that is on.
    pub fn attach(mut self) -> anyhow::Result<Option<Terminator>> {
        for program in PROGRAMS {
            attach(&mut self.ebpf, &program, &self.cgroup_dir, &self.pin_dir).with_context(
                || {
                    format!(
                        "attaching {} ({}, needs Linux >= 5.19) to cgroup {}",
                        program.name,
                        program.hook,
                        self.cgroup.display()
                    )
                },
            )?;
        }
        info!(
            cgroup = %self.cgroup.display(),
            pins = %self.pin_dir.display(),
            layout = LAYOUT_VERSION,
            programs = PROGRAMS.len(),
            "programs attached: connect, sendmsg, recvmsg and getpeername, IPv4 and IPv6"
        );
        for version in &self.others {
            let removed = remove_layout(&self.pin_dir, *version)?;
            info!(
                from = version,
                to = LAYOUT_VERSION,
                removed = removed.len(),
                "{} layout {version}'s maps: the programs now use layout {LAYOUT_VERSION}'s",
                if *version < LAYOUT_VERSION {
                    "upgraded from"
                } else {
                    "rolled back from"
                }
            );
        }
        if !self.ending {
            return Ok(None);
        }
        let terminator = Terminator::new(self.ebpf, &self.cgroup)?;
        info!("sockets lb translated to a backend that leaves its Service will be ended");
        Ok(Some(terminator))
    }
}

/// Removes the pins of layout `version`'s maps: version 1's by name (they share the pin
/// directory with the links), a later version's whole directory, whatever maps it holds (a newer
/// layout's may have maps this agent does not know).
fn remove_layout(pin_dir: &Path, version: u32) -> anyhow::Result<Vec<PathBuf>> {
    let dir = layout_dir(pin_dir, version);
    let pins: Vec<PathBuf> = if version == 1 {
        MAPS.iter()
            .chain(&SOCKET_MAPS)
            .chain(&AFFINITY_MAPS)
            .map(|name| dir.join(name))
            .collect()
    } else {
        match fs::read_dir(&dir) {
            Ok(entries) => entries
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        }
    };
    let mut removed = Vec::new();
    for path in pins {
        match fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if version > 1
        && let Err(e) = fs::remove_dir(&dir)
        && e.kind() != ErrorKind::NotFound
    {
        return Err(e).with_context(|| format!("removing {}", dir.display()));
    }
    Ok(removed)
}

/// Attaches an already loaded `program` to the cgroup, swapping out the link an earlier agent
/// pinned.
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

/// Refuses maps of this layout version whose key or value sizes differ from this agent's (a
/// build that changed a map without raising [`LAYOUT_VERSION`]): reusing them would misread every
/// entry. (The LRU maps the programs keep are replaced instead, by [`refit_lru_maps`].)
fn check_pinned_layouts(pin_dir: &Path) -> anyhow::Result<()> {
    let expected = [
        (SERVICES_MAP, sizes::<Frontend4Key, ServiceEntry>()),
        (BACKENDS_MAP, sizes::<BackendSlotKey, Backend4>()),
        (MEMBERS_MAP, sizes::<BackendMember4Key, BackendMember>()),
        (SERVICES6_MAP, sizes::<Frontend6Key, ServiceEntry>()),
        (BACKENDS6_MAP, sizes::<BackendSlotKey, Backend6>()),
        (MEMBERS6_MAP, sizes::<BackendMember6Key, BackendMember>()),
        (NAMES_MAP, sizes::<u32, ServiceName>()),
        (COUNTERS_MAP, sizes::<u32, ServiceCounters>()),
    ];
    for (name, (key_size, value_size)) in expected {
        let path = pin_dir.join(name);
        let Some(info) = pinned_info(&path)? else {
            continue;
        };
        if (info.key_size() as usize, info.value_size() as usize) != (key_size, value_size) {
            bail!(
                "pinned map {} of layout version {LAYOUT_VERSION} has key/value sizes {}/{}, this \
                 agent needs {key_size}/{value_size}: a build that changed the map without raising \
                 LAYOUT_VERSION left it. Run `lb-agent reset --pin-dir {}` and start again \
                 (Services are not load-balanced until the agent has programmed them)",
                path.display(),
                info.key_size(),
                info.value_size(),
                pin_dir.display()
            );
        }
    }
    Ok(())
}

/// What the kernel says of the map pinned at `path`; `None` when nothing is pinned there.
fn pinned_info(path: &Path) -> anyhow::Result<Option<MapInfo>> {
    if !path.exists() {
        return Ok(None);
    }
    MapInfo::from_pin(path)
        .map(Some)
        .with_context(|| format!("reading pinned map {}", path.display()))
}

/// A map's key and value sizes.
fn sizes<K, V>() -> (usize, usize) {
    (size_of::<K>(), size_of::<V>())
}

/// How many entries the LRU maps the programs keep get (`--socket-map-entries`,
/// `--affinity-map-entries`).
#[derive(Clone, Copy, Debug)]
pub struct LruSizes {
    /// Each per-socket map ([`SOCKET_MAPS`]).
    pub socket: u32,
    /// Each session affinity map ([`AFFINITY_MAPS`]).
    pub affinity: u32,
}

impl LruSizes {
    /// Each LRU map, its size, and its key and value sizes.
    fn maps(&self) -> [(&'static str, u32, (usize, usize)); 6] {
        let [reverse4, reverse6, sock4, sock6] = SOCKET_MAPS;
        let [affinity4, affinity6] = AFFINITY_MAPS;
        [
            (reverse4, self.socket, sizes::<Reverse4Key, ServiceAddr4>()),
            (reverse6, self.socket, sizes::<Reverse6Key, ServiceAddr6>()),
            (
                sock4,
                self.socket,
                sizes::<SockFrontend4Key, SockBackend4>(),
            ),
            (
                sock6,
                self.socket,
                sizes::<SockFrontend6Key, SockBackend6>(),
            ),
            (affinity4, self.affinity, sizes::<AffinityKey, Affinity4>()),
            (affinity6, self.affinity, sizes::<AffinityKey, Affinity6>()),
        ]
    }
}

/// A pinned LRU map (per-socket or session affinity) of another size than asked, or with the key
/// and value layout of another build, is unpinned, so the load creates a new one. The programs
/// still attached keep the old map until their links are swapped; what is lost is only the state
/// of sockets open across the restart (a reply in flight shows its Pod IP, a UDP socket may pick
/// another backend) and the clients' affinities, once.
fn refit_lru_maps(pin_dir: &Path, sizes: LruSizes) -> anyhow::Result<()> {
    for (name, entries, (key_size, value_size)) in sizes.maps() {
        let path = pin_dir.join(name);
        let Some(info) = pinned_info(&path)? else {
            continue;
        };
        let pinned = (info.key_size() as usize, info.value_size() as usize);
        if info.max_entries() != entries {
            warn!(
                map = name,
                pinned = info.max_entries(),
                wanted = entries,
                "its size flag changed: replacing the map (the state it held is lost once)"
            );
        } else if pinned != (key_size, value_size) {
            warn!(
                map = name,
                pinned = ?pinned,
                wanted = ?(key_size, value_size),
                "its key/value sizes changed with this build: replacing the map (the state it \
                 held is lost once)"
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
    let mut links = Vec::new();
    for name in link_pin_names() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let link = FdLink::from(
            PinnedLink::from_pin(&path)
                .with_context(|| format!("opening the pinned link {}", path.display()))?,
        );
        links.push(link.info()?.id());
        drop(link); // our fd would keep the link, and so the program, attached
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    wait_detached(&links)?;
    // Every layout's maps, this agent's and any other, and any left behind.
    let mut layouts = pinned_layouts(pin_dir)?;
    layouts.extend(version_dirs(pin_dir)?);
    layouts.push(LAYOUT_VERSION);
    layouts.sort_unstable();
    layouts.dedup();
    for version in layouts {
        removed.extend(remove_layout(pin_dir, version)?);
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => debug!("left {}: {e}", pin_dir.display()),
    }
    Ok(removed)
}

/// Waits until the links `ids` are gone: the kernel detaches a link whose last reference went in
/// a work item of its own, an instant later, and `reset` promises that nothing is translated once
/// it returns.
fn wait_detached(ids: &[u32]) -> anyhow::Result<()> {
    const WAIT: std::time::Duration = std::time::Duration::from_secs(2);
    let started = std::time::Instant::now();
    loop {
        let attached = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|link| ids.contains(&link.id()))
            .count();
        if attached == 0 {
            return Ok(());
        }
        if started.elapsed() > WAIT {
            bail!(
                "{attached} of lb's links are still attached {WAIT:?} after their pins were \
                 removed: another process holds them (`bpftool link show` tells which)"
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Makes sure `pin_dir` is on a BPF filesystem, mounting one at `/sys/fs/bpf` when that is where
/// it belongs and nothing is mounted (as other BPF agents do).
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    // The closest existing ancestor tells which filesystem the directory will be on.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing)? {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && existing.starts_with(default) {
        info!("no BPF filesystem at /sys/fs/bpf; mounting one");
        mount_bpffs(default)?;
        if is_bpffs(default)? {
            return Ok(());
        }
    }
    bail!(
        "{} is not on a BPF filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass \
         --pin-dir under a mounted one",
        pin_dir.display()
    )
}

/// Whether `path` is on a BPF filesystem.
fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let stat = statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}

/// Mounts a BPF filesystem at `target` (an existing directory).
pub fn mount_bpffs(target: &Path) -> anyhow::Result<()> {
    mount(
        Some("bpf"),
        target,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting a BPF filesystem at {}", target.display()))
}
