//! The BPF objects: the names of lb's maps, programs and pins; loading, attaching and pinning
//! them ([`pins`]); and reading and writing the maps ([`maps`]).
//!
//! Pins outlive the agent: while it is stopped or restarting, the attached program keeps
//! translating sockets with the maps as last written. A new agent reuses the pinned maps of its
//! layout version (so nothing is flushed, not even the per-socket state of open sockets), or
//! fills maps of its own beside another version's, and swaps in its own programs atomically, one
//! hook at a time, once its maps are programmed (see [`pins`]).

mod batch;
mod kfunc;
mod maps;
mod pins;
mod terminate;

pub use maps::BpfMaps;
pub use pins::{Attach, Loaded, LruSizes, layout_dir, load, mount_bpffs, pinned_layouts, reset};
pub use terminate::{Ended, Terminator};

pub const SERVICES_MAP: &str = "LB4_SERVICES";
pub const BACKENDS_MAP: &str = "LB4_BACKENDS";
pub const SERVICES6_MAP: &str = "LB6_SERVICES";
pub const BACKENDS6_MAP: &str = "LB6_BACKENDS";
pub const MEMBERS_MAP: &str = "LB4_MEMBERS";
pub const MEMBERS6_MAP: &str = "LB6_MEMBERS";
pub const NAMES_MAP: &str = "LB_SVC_NAMES";
/// Per frontend, per CPU: what the programs did (see lb-common's `ServiceCounters`).
pub const COUNTERS_MAP: &str = "LB_COUNTERS";
/// The per-socket LRU maps the programs write themselves (see lb-common).
pub const SOCKET_MAPS: [&str; 4] = [
    "LB4_REVERSE",
    "LB6_REVERSE",
    "LB4_SOCK_BACKEND",
    "LB6_SOCK_BACKEND",
];

/// The session affinity LRU maps the programs keep (see lb-common).
pub const AFFINITY_MAPS: [&str; 2] = ["LB4_AFFINITY", "LB6_AFFINITY"];

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
const MAPS: [&str; 8] = [
    SERVICES_MAP,
    BACKENDS_MAP,
    MEMBERS_MAP,
    SERVICES6_MAP,
    BACKENDS6_MAP,
    MEMBERS6_MAP,
    NAMES_MAP,
    COUNTERS_MAP,
];

/// The links' pins (and their staging names), which `reset` removes first: detaching stops the
/// rewriting before the maps go away.
fn link_pin_names() -> Vec<String> {
    PROGRAMS
        .iter()
        .flat_map(|p| [p.link_pin(), p.staging_pin()])
        .collect()
}
