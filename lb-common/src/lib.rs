//! Map keys and values shared by the eBPF programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the kernel, the eBPF object and the
//! agent agree byte for byte and `bpftool map dump` shows every field by name (the maps carry BTF).
//!
//! Conventions, chosen so a dump is readable by a person:
//! - addresses are byte arrays in network order (`[10, 96, 0, 10]`);
//! - ports are `u16` in host order (`80`); the program converts once per connect.
//!
//! The maps the agent writes (one set per IP family, sharing one space of service ids, the entries
//! and the slot scheme):
//!
//! | map            | key                   | value             | read by |
//! |----------------|-----------------------|-------------------|---------|
//! | `LB4_SERVICES` | [`Frontend4Key`]      | [`ServiceEntry`]  | connect4/6, sendmsg4/6 |
//! | `LB4_BACKENDS` | [`BackendSlotKey`]    | [`Backend4`]      | connect4/6, sendmsg4/6 |
//! | `LB4_MEMBERS`  | [`BackendMember4Key`] | [`BackendMember`] | sendmsg4/6 |
//! | `LB6_SERVICES` | [`Frontend6Key`]      | [`ServiceEntry`]  | connect6, sendmsg6 |
//! | `LB6_BACKENDS` | [`BackendSlotKey`]    | [`Backend6`]      | connect6, sendmsg6 |
//! | `LB6_MEMBERS`  | [`BackendMember6Key`] | [`BackendMember`] | sendmsg6 |
//! | `LB_SVC_NAMES` | `u32` service id      | [`ServiceName`]   | `lb-agent list` |
//! | `LB_COUNTERS`  | `u32` service id      | [`ServiceCounters`] per CPU | every program; `list` |
//! | `LB4_TERMINATE`| [`Terminate4Key`]     | `u32` service id  | `lb_end_tcp`/`lb_end_udp` |
//! | `LB6_TERMINATE`| [`Terminate6Key`]     | `u32` service id  | `lb_end_tcp`/`lb_end_udp` |
//!
//! `*_SERVICES` and `*_BACKENDS` say where a new choice may go: a frontend's service entry and its
//! slots. `*_MEMBERS` answers, in one lookup, whether a backend is still in a service's set,
//! whichever slot it is in: it holds one entry per (service id, backend) of every slot below the
//! count, so a backend that moves to another slot keeps its entry untouched.
//!
//! The programs themselves keep two per-socket maps per family, both LRU (sized by the agent's
//! `--socket-map-entries`, so they can never fill up):
//!
//! | map                 | key                | value             | written by | read by |
//! |---------------------|--------------------|-------------------|------------|---------|
//! | `LB4_REVERSE`       | [`Reverse4Key`]    | [`ServiceAddr4`]  | connect4/6, sendmsg4/6 | recvmsg4/6, getpeername4/6 |
//! | `LB6_REVERSE`       | [`Reverse6Key`]    | [`ServiceAddr6`]  | connect6, sendmsg6 | recvmsg6, getpeername6 |
//! | `LB4_SOCK_BACKEND`  | [`SockFrontend4Key`] | [`SockBackend4`] | sendmsg4/6 | sendmsg4/6 |
//! | `LB6_SOCK_BACKEND`  | [`SockFrontend6Key`] | [`SockBackend6`] | sendmsg6 | sendmsg6 |
//! | `LB4_AFFINITY`      | [`AffinityKey`]    | [`Affinity4`]     | connect4/6, sendmsg4/6 | the same |
//! | `LB6_AFFINITY`      | [`AffinityKey`]    | [`Affinity6`]     | connect6, sendmsg6 | the same |
//!
//! `*_AFFINITY` (sized by `--affinity-map-entries`) keeps, for a frontend with session affinity,
//! the backend each client (network namespace) got, while it is in the set and the frontend's
//! timeout has not passed since the client's last connect.
//!
//! `*_REVERSE` turns a translated socket's backend back into the frontend it addressed, so replies
//! (recvmsg) and the socket's peer (getpeername) show the ClusterIP. `*_SOCK_BACKEND` keeps the
//! datagrams one unconnected UDP socket sends to one frontend on one backend for as long as that
//! backend is in the frontend's set (the frontend's service id is unchanged and `*_MEMBERS` has
//! the backend), and lets them move once it leaves. Both are keyed by the kernel's socket cookie,
//! unique per socket per boot. IPv4 Services reached through IPv4-mapped addresses
//! (`::ffff:a.b.c.d`) on AF_INET6 sockets use the IPv4 maps.
//!
//! The agent keeps these invariants while it changes the maps:
//! - a frontend (ClusterIP, port, protocol) maps to a service entry whose `backend_count` slots
//!   `0..backend_count` in its family's `*_BACKENDS` are all present: slots are written before the
//!   count is raised and deleted after it is lowered;
//! - every backend in one of those slots has its member entry: members are written before their
//!   backend enters a slot, and deleted only once it is in no slot below the count.
//!
//! # Layout versions
//!
//! [`LAYOUT_VERSION`] names the layout of all these maps together: it goes up whenever a key or a
//! value changes (a field added, a map added or changed in meaning), and each version's maps are
//! pinned apart (version 1 directly in the pin directory, as before versions existed; version N
//! in its `vN` subdirectory). An agent that finds another version's maps fills maps of its own
//! version, swaps the programs over to them, and only then removes the others: an upgrade or a
//! rollback never leaves sockets untranslated.
#![no_std]

/// The version of the maps' layout (see the module documentation). The `layout-test` feature
/// builds a layout made different on purpose, for the tests of upgrades and rollbacks.
///
/// - 1: the maps as they were before versions existed.
/// - 2: [`ServiceEntry::affinity_timeout_s`] (session affinity) and the `*_AFFINITY` maps.
/// - 3: the per-frontend counters, `LB_COUNTERS` ([`ServiceCounters`]), the `*_TERMINATE` maps
///   (ending sockets to removed backends), and room in `LB_SVC_NAMES` for the frontends of both
///   families (it had room for `MAX_SERVICES`: more than that many frontends over IPv4 and IPv6
///   together could not be named, and failed).
pub const LAYOUT_VERSION: u32 = if cfg!(feature = "layout-test") { 4 } else { 3 };

/// Capacity of the service (frontend) maps. A frontend is one ClusterIP × port × protocol.
pub const MAX_SERVICES: u32 = 65_536;
/// Capacity of each backend slot map, shared by all frontends, and of each member map (one entry
/// per slot).
pub const MAX_BACKEND_SLOTS: u32 = 524_288;
/// Capacity of `LB_COUNTERS` and `LB_SVC_NAMES`: one entry per frontend, of either family
/// (service ids are shared by both).
pub const MAX_FRONTENDS: u32 = 2 * MAX_SERVICES;
/// Largest backend set one frontend may have (the count is a `u16`; kube caps a slice at 1000
/// endpoints, so this leaves room for many slices).
pub const MAX_BACKENDS_PER_SERVICE: u16 = 16_384;

/// IANA protocol numbers, as found in `bpf_sock_addr.protocol`.
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// Bits of [`ServiceEntry::flags`]. None are defined yet.
pub mod service_flags {}

/// Key of `LB4_SERVICES`: a Service frontend (ClusterIP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend4Key {
    /// ClusterIP, network byte order.
    pub address: [u8; 4],
    /// Service port, host byte order.
    pub port: u16,
    /// [`protocol`] number.
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of `LB6_SERVICES`: an IPv6 Service frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend6Key {
    /// ClusterIP, network byte order.
    pub address: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    /// [`protocol`] number.
    pub protocol: u8,
    pub _pad: u8,
}

/// Value of `LB4_SERVICES` and `LB6_SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    /// Stable id of this frontend; keys its backend slots and its name.
    pub service_id: u32,
    /// Number of backend slots `0..backend_count` in use. Zero: connects are refused.
    pub backend_count: u16,
    /// [`service_flags`] bits.
    pub flags: u16,
    /// `sessionAffinity: ClientIP`: how long, in seconds since its last connect, a client keeps
    /// the backend it got (its entry in `*_AFFINITY`); 0: no affinity, every connect picks.
    pub affinity_timeout_s: u32,
    /// The field the `layout-test` layout adds: a value that grew, as a future version's will.
    #[cfg(feature = "layout-test")]
    pub layout_test: u32,
}

impl ServiceEntry {
    pub const fn new(
        service_id: u32,
        backend_count: u16,
        flags: u16,
        affinity_timeout_s: u32,
    ) -> Self {
        Self {
            service_id,
            backend_count,
            flags,
            affinity_timeout_s,
            #[cfg(feature = "layout-test")]
            layout_test: 0x5eed,
        }
    }
}

/// Key of `LB4_BACKENDS` and `LB6_BACKENDS`: one slot of a frontend's backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// Value of `LB4_BACKENDS`: where a connect to the frontend goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend4 {
    /// Pod IP, network byte order.
    pub address: [u8; 4],
    /// Target port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `LB6_BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend6 {
    /// Pod IP, network byte order.
    pub address: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Length of [`ServiceName::namespace`] and [`ServiceName::name`]: Kubernetes caps both at 63
/// characters, plus a terminating NUL.
pub const NAME_LEN: usize = 64;
/// Length of [`ServiceName::port_name`]: an IANA service name is at most 15 characters.
pub const PORT_NAME_LEN: usize = 16;

/// Value of `LB_SVC_NAMES`: which Service port a frontend belongs to. Only `lb-agent list` and
/// operators read it; the datapath never does. Strings are UTF-8, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub namespace: [u8; NAME_LEN],
    pub name: [u8; NAME_LEN],
    pub port_name: [u8; PORT_NAME_LEN],
}

impl ServiceName {
    /// Builds a name, truncating each part to fit (Kubernetes validation keeps real names within
    /// the limits).
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Self {
        let mut out = Self {
            namespace: [0; NAME_LEN],
            name: [0; NAME_LEN],
            port_name: [0; PORT_NAME_LEN],
        };
        copy_str(&mut out.namespace, namespace);
        copy_str(&mut out.name, name);
        copy_str(&mut out.port_name, port_name);
        out
    }

    pub fn namespace(&self) -> &str {
        read_str(&self.namespace)
    }

    pub fn name(&self) -> &str {
        read_str(&self.name)
    }

    pub fn port_name(&self) -> &str {
        read_str(&self.port_name)
    }
}

/// Copies `src` into `dst`, leaving at least one trailing NUL and never splitting a UTF-8 char.
fn copy_str(dst: &mut [u8], src: &str) {
    let mut len = src.len().min(dst.len() - 1);
    while !src.is_char_boundary(len) {
        len -= 1;
    }
    dst[..len].copy_from_slice(&src.as_bytes()[..len]);
}

fn read_str(bytes: &[u8]) -> &str {
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..len]).unwrap_or("")
}

/// Key of `LB4_REVERSE`: a socket whose destination was translated, and the backend it got.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reverse4Key {
    /// `bpf_get_socket_cookie` of the socket.
    pub cookie: u64,
    /// Backend Pod IP, network byte order.
    pub address: [u8; 4],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `LB6_REVERSE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Reverse6Key {
    pub cookie: u64,
    /// Backend Pod IP, network byte order.
    pub address: [u8; 16],
    /// Backend port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Value of `LB4_REVERSE`: the frontend (ClusterIP, port) the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr4 {
    /// ClusterIP, network byte order.
    pub address: [u8; 4],
    /// Service port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Value of `LB6_REVERSE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr6 {
    /// ClusterIP, network byte order.
    pub address: [u8; 16],
    /// Service port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// Key of `LB4_TERMINATE`: a backend that left a frontend's set, and that frontend. The agent
/// fills the map just before it runs the socket iterator programs, which end each socket
/// connected to `backend` with `protocol` that lb translated from `frontend` (its `LB4_REVERSE`
/// entry says so), and empties it after. The value is the frontend's service id, whose
/// `sockets_destroyed` counter goes up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Terminate4Key {
    pub backend: Backend4,
    pub frontend: ServiceAddr4,
    /// IANA protocol number ([`protocol`]).
    pub protocol: u8,
    pub _pad: u8,
}

/// Key of `LB6_TERMINATE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Terminate6Key {
    pub backend: Backend6,
    pub frontend: ServiceAddr6,
    pub protocol: u8,
    pub _pad: u8,
}

/// Capacity of each `*_TERMINATE` map: the departures of one sync; more are ended in rounds.
pub const MAX_TERMINATIONS: u32 = 65_536;

/// Key of `LB4_SOCK_BACKEND`: an unconnected socket sending to a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockFrontend4Key {
    pub cookie: u64,
    pub frontend: Frontend4Key,
}

/// Key of `LB6_SOCK_BACKEND`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockFrontend6Key {
    pub cookie: u64,
    pub frontend: Frontend6Key,
    pub _pad: u32,
}

/// Value of `LB4_SOCK_BACKEND`: the backend the socket's datagrams to that frontend go to, and
/// the service id the frontend had when it was picked. The choice holds while the frontend keeps
/// that id and `LB4_MEMBERS` has `(service_id, backend)`, whichever slot the backend is in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockBackend4 {
    pub service_id: u32,
    pub backend: Backend4,
}

/// Value of `LB6_SOCK_BACKEND`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockBackend6 {
    pub service_id: u32,
    pub backend: Backend6,
}

/// Key of `LB4_AFFINITY` and `LB6_AFFINITY`: one client of one frontend with session affinity.
/// At the socket layer the client is its network namespace (`bpf_get_netns_cookie`): its source
/// address is not chosen yet when it connects, and a Pod is one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// Value of `LB4_AFFINITY`: the backend the client got, and when it last connected (monotonic
/// nanoseconds, `bpf_ktime_get_ns`). It holds while the frontend's timeout has not passed since
/// then and `LB4_MEMBERS` has the backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Affinity4 {
    pub backend: Backend4,
    pub last_used_ns: u64,
}

/// Value of `LB6_AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Affinity6 {
    pub backend: Backend6,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of `LB4_MEMBERS`: a backend of a service's current set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendMember4Key {
    pub service_id: u32,
    /// Pod IP, network byte order.
    pub address: [u8; 4],
    /// Target port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl BackendMember4Key {
    #[inline(always)]
    pub const fn new(service_id: u32, backend: &Backend4) -> Self {
        Self {
            service_id,
            address: backend.address,
            port: backend.port,
            _pad: 0,
        }
    }

    pub const fn backend(&self) -> Backend4 {
        Backend4 {
            address: self.address,
            port: self.port,
            _pad: 0,
        }
    }
}

/// Key of `LB6_MEMBERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendMember6Key {
    pub service_id: u32,
    /// Pod IP, network byte order.
    pub address: [u8; 16],
    /// Target port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl BackendMember6Key {
    #[inline(always)]
    pub const fn new(service_id: u32, backend: &Backend6) -> Self {
        Self {
            service_id,
            address: backend.address,
            port: backend.port,
            _pad: 0,
        }
    }

    pub const fn backend(&self) -> Backend6 {
        Backend6 {
            address: self.address,
            port: self.port,
            _pad: 0,
        }
    }
}

/// Value of `LB4_MEMBERS` and `LB6_MEMBERS`. Only the key's presence means something: the agent
/// always writes [`BackendMember::MARKER`] and the programs never read the value. (Not the slot:
/// a backend that moves slot would then need its member entry rewritten.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendMember {
    pub marker: u32,
}

impl BackendMember {
    /// The one value member entries hold.
    pub const MARKER: Self = Self { marker: 1 };
}

/// Value of `LB_COUNTERS`, a per-CPU hash keyed by service id: what the programs did for one
/// frontend (the sum over CPUs is the total). A frontend's first count creates its entry; the
/// agent deletes it with the frontend. `lb-agent list` and `/metrics` show the sums.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceCounters {
    /// Connects (TCP, connected UDP) translated to a backend.
    pub connects: u64,
    /// Connects and datagrams refused because the frontend had no backends (ECONNREFUSED).
    pub refused: u64,
    /// Datagrams of unconnected UDP sockets (`sendto`, `sendmsg`) translated to a backend.
    pub datagrams: u64,
    /// Translations that went to the backend session affinity kept for the client.
    pub affinity_hits: u64,
    /// Sockets ended because their backend left the frontend's set.
    pub sockets_destroyed: u64,
}

impl ServiceCounters {
    /// `self + other`, field by field (wrapping, as the programs' counters do).
    pub fn add(&self, other: &Self) -> Self {
        Self {
            connects: self.connects.wrapping_add(other.connects),
            refused: self.refused.wrapping_add(other.refused),
            datagrams: self.datagrams.wrapping_add(other.datagrams),
            affinity_hits: self.affinity_hits.wrapping_add(other.affinity_hits),
            sockets_destroyed: self.sockets_destroyed.wrapping_add(other.sockets_destroyed),
        }
    }

    /// `self - other`, field by field (wrapping, as [`add`](Self::add)).
    pub fn minus(&self, other: &Self) -> Self {
        Self {
            connects: self.connects.wrapping_sub(other.connects),
            refused: self.refused.wrapping_sub(other.refused),
            datagrams: self.datagrams.wrapping_sub(other.datagrams),
            affinity_hits: self.affinity_hits.wrapping_sub(other.affinity_hits),
            sockets_destroyed: self.sockets_destroyed.wrapping_sub(other.sockets_destroyed),
        }
    }

    /// Whether every counter of `self` is at least `other`'s: `self` may be a later reading of
    /// the same counters.
    pub fn covers(&self, other: &Self) -> bool {
        self.connects >= other.connects
            && self.refused >= other.refused
            && self.datagrams >= other.datagrams
            && self.affinity_hits >= other.affinity_hits
            && self.sockets_destroyed >= other.sockets_destroyed
    }
}

/// Default capacity of each per-socket LRU map (`--socket-map-entries`).
pub const DEFAULT_SOCKET_MAP_ENTRIES: u32 = 65_536;

/// Default capacity of each session affinity LRU map (`--affinity-map-entries`): clients ×
/// frontends with affinity.
pub const DEFAULT_AFFINITY_MAP_ENTRIES: u32 = 65_536;

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all are #[repr(C)], Copy, made only of integers and byte arrays, and have no
    // implicit padding (checked by the layout tests below).
    unsafe impl aya::Pod for Frontend4Key {}
    unsafe impl aya::Pod for ServiceEntry {}
    unsafe impl aya::Pod for BackendSlotKey {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for Frontend6Key {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for Reverse4Key {}
    unsafe impl aya::Pod for Reverse6Key {}
    unsafe impl aya::Pod for ServiceAddr4 {}
    unsafe impl aya::Pod for ServiceAddr6 {}
    unsafe impl aya::Pod for SockFrontend4Key {}
    unsafe impl aya::Pod for SockFrontend6Key {}
    unsafe impl aya::Pod for SockBackend4 {}
    unsafe impl aya::Pod for SockBackend6 {}
    unsafe impl aya::Pod for BackendMember4Key {}
    unsafe impl aya::Pod for BackendMember6Key {}
    unsafe impl aya::Pod for BackendMember {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity4 {}
    unsafe impl aya::Pod for Affinity6 {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for Terminate4Key {}
    unsafe impl aya::Pod for Terminate6Key {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    // The eBPF object and the agent are built separately; these pin the layout both sides use, and
    // that the pinned maps of an earlier version must match.
    #[test]
    fn frontend_key_layout() {
        assert_eq!(size_of::<Frontend4Key>(), 8);
        assert_eq!(align_of::<Frontend4Key>(), 2);
        assert_eq!(offset_of!(Frontend4Key, address), 0);
        assert_eq!(offset_of!(Frontend4Key, port), 4);
        assert_eq!(offset_of!(Frontend4Key, protocol), 6);
        assert_eq!(offset_of!(Frontend4Key, _pad), 7);
    }

    #[test]
    fn service_entry_layout() {
        let size = if cfg!(feature = "layout-test") {
            16
        } else {
            12
        };
        assert_eq!(size_of::<ServiceEntry>(), size);
        assert_eq!(offset_of!(ServiceEntry, affinity_timeout_s), 8);
        assert_eq!(offset_of!(ServiceEntry, service_id), 0);
        assert_eq!(offset_of!(ServiceEntry, backend_count), 4);
        assert_eq!(offset_of!(ServiceEntry, flags), 6);
    }

    #[test]
    fn affinity_layout() {
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(offset_of!(AffinityKey, service_id), 8);
        assert_eq!(size_of::<Affinity4>(), 16);
        assert_eq!(offset_of!(Affinity4, last_used_ns), 8);
        assert_eq!(size_of::<Affinity6>(), 32);
        assert_eq!(offset_of!(Affinity6, _pad), 20);
        assert_eq!(offset_of!(Affinity6, last_used_ns), 24);
    }

    #[test]
    fn counters_layout() {
        assert_eq!(size_of::<ServiceCounters>(), 40);
        assert_eq!(offset_of!(ServiceCounters, refused), 8);
        assert_eq!(offset_of!(ServiceCounters, datagrams), 16);
        assert_eq!(offset_of!(ServiceCounters, affinity_hits), 24);
        assert_eq!(offset_of!(ServiceCounters, sockets_destroyed), 32);
    }

    #[test]
    fn terminate_layouts() {
        assert_eq!(size_of::<Terminate4Key>(), 18);
        assert_eq!(offset_of!(Terminate4Key, frontend), 8);
        assert_eq!(offset_of!(Terminate4Key, protocol), 16);
        assert_eq!(size_of::<Terminate6Key>(), 42);
        assert_eq!(offset_of!(Terminate6Key, frontend), 20);
        assert_eq!(offset_of!(Terminate6Key, protocol), 40);
    }

    #[test]
    fn backend_layout() {
        assert_eq!(size_of::<BackendSlotKey>(), 8);
        assert_eq!(offset_of!(BackendSlotKey, slot), 4);
        assert_eq!(size_of::<Backend4>(), 8);
        assert_eq!(offset_of!(Backend4, port), 4);
        assert_eq!(offset_of!(Backend4, _pad), 6);
    }

    #[test]
    fn ipv6_layout() {
        assert_eq!(size_of::<Frontend6Key>(), 20);
        assert_eq!(offset_of!(Frontend6Key, port), 16);
        assert_eq!(offset_of!(Frontend6Key, protocol), 18);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(offset_of!(Backend6, port), 16);
        assert_eq!(offset_of!(Backend6, _pad), 18);
    }

    #[test]
    fn per_socket_layouts() {
        assert_eq!(size_of::<Reverse4Key>(), 16);
        assert_eq!(offset_of!(Reverse4Key, address), 8);
        assert_eq!(offset_of!(Reverse4Key, port), 12);
        assert_eq!(size_of::<Reverse6Key>(), 32);
        assert_eq!(offset_of!(Reverse6Key, port), 24);
        assert_eq!(size_of::<ServiceAddr4>(), 8);
        assert_eq!(size_of::<ServiceAddr6>(), 20);
        assert_eq!(size_of::<SockFrontend4Key>(), 16);
        assert_eq!(offset_of!(SockFrontend4Key, frontend), 8);
        assert_eq!(size_of::<SockFrontend6Key>(), 32);
        assert_eq!(offset_of!(SockFrontend6Key, _pad), 28);
        assert_eq!(size_of::<SockBackend4>(), 12);
        assert_eq!(offset_of!(SockBackend4, backend), 4);
        assert_eq!(size_of::<SockBackend6>(), 24);
        assert_eq!(offset_of!(SockBackend6, backend), 4);
        assert_eq!(align_of::<SockBackend6>(), 4);
    }

    #[test]
    fn member_layouts() {
        assert_eq!(size_of::<BackendMember4Key>(), 12);
        assert_eq!(align_of::<BackendMember4Key>(), 4);
        assert_eq!(offset_of!(BackendMember4Key, address), 4);
        assert_eq!(offset_of!(BackendMember4Key, port), 8);
        assert_eq!(offset_of!(BackendMember4Key, _pad), 10);
        assert_eq!(size_of::<BackendMember6Key>(), 24);
        assert_eq!(align_of::<BackendMember6Key>(), 4);
        assert_eq!(offset_of!(BackendMember6Key, address), 4);
        assert_eq!(offset_of!(BackendMember6Key, port), 20);
        assert_eq!(offset_of!(BackendMember6Key, _pad), 22);
        assert_eq!(size_of::<BackendMember>(), 4);
    }

    #[test]
    fn member_keys_round_trip_their_backend() {
        let b4 = Backend4 {
            address: [10, 244, 0, 1],
            port: 8080,
            _pad: 0,
        };
        assert_eq!(BackendMember4Key::new(7, &b4).backend(), b4);
        let b6 = Backend6 {
            address: [0xfd; 16],
            port: 8443,
            _pad: 0,
        };
        let key = BackendMember6Key::new(7, &b6);
        assert_eq!((key.service_id, key.backend()), (7, b6));
    }

    #[test]
    fn service_name_layout() {
        assert_eq!(size_of::<ServiceName>(), 2 * NAME_LEN + PORT_NAME_LEN);
        assert_eq!(offset_of!(ServiceName, name), NAME_LEN);
        assert_eq!(offset_of!(ServiceName, port_name), 2 * NAME_LEN);
    }

    #[test]
    fn service_name_round_trips_and_truncates_on_char_boundary() {
        let n = ServiceName::new("shop", "web", "http");
        assert_eq!(
            (n.namespace(), n.name(), n.port_name()),
            ("shop", "web", "http")
        );

        // 15 ASCII bytes then a 2-byte char: only the ASCII part fits before the NUL.
        let n = ServiceName::new("ns", "svc", "aaaaaaaaaaaaaaaé");
        assert_eq!(n.port_name(), "aaaaaaaaaaaaaaa");
        assert_eq!(n.port_name[PORT_NAME_LEN - 1], 0);
    }
}
