//! The maps, and the two address families the programs serve through one [`Family`] interface,
//! so each program's logic is written once.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST},
    btf_maps::{HashMap, LruHashMap, PerCpuHashMap},
    macros::btf_map,
    programs::SockAddrContext,
};
use lb_common::{
    Affinity4, Affinity6, AffinityKey, Backend4, Backend6, BackendMember, BackendMember4Key,
    BackendMember6Key, BackendSlotKey, DEFAULT_AFFINITY_MAP_ENTRIES, DEFAULT_SOCKET_MAP_ENTRIES,
    Frontend4Key, Frontend6Key, MAX_BACKEND_SLOTS, MAX_FRONTENDS, MAX_SERVICES, MAX_TERMINATIONS,
    Reverse4Key, Reverse6Key, ServiceAddr4, ServiceAddr6, ServiceCounters, ServiceEntry,
    ServiceName, SockBackend4, SockBackend6, SockFrontend4Key, SockFrontend6Key, Terminate4Key,
    Terminate6Key,
};

const SOCKET_MAP_ENTRIES: usize = DEFAULT_SOCKET_MAP_ENTRIES as usize;
const AFFINITY_MAP_ENTRIES: usize = DEFAULT_AFFINITY_MAP_ENTRIES as usize;
/// Maps whose entries are allocated when written, not all at creation.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map]
static LB4_SERVICES: HashMap<Frontend4Key, ServiceEntry, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
static LB4_BACKENDS: HashMap<BackendSlotKey, Backend4, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
static LB4_MEMBERS: HashMap<BackendMember4Key, BackendMember, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
static LB6_SERVICES: HashMap<Frontend6Key, ServiceEntry, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
static LB6_BACKENDS: HashMap<BackendSlotKey, Backend6, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

#[btf_map]
static LB6_MEMBERS: HashMap<BackendMember6Key, BackendMember, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// Read by `lb-agent list` only; declared here so it is created, typed (BTF) and pinned with the
/// others.
#[btf_map]
static LB_SVC_NAMES: HashMap<u32, ServiceName, { MAX_FRONTENDS as usize }> = HashMap::new();

/// Per frontend (service id), per CPU. An entry is created by the frontend's first count, so
/// that only frontends with traffic take memory (preallocated, the map would take
/// `MAX_FRONTENDS` × CPUs × 40 bytes), and the agent never pays for creating them (a per-CPU
/// allocation takes tens of microseconds: a cold start's 10 000 would take a quarter of a
/// second). The agent deletes a frontend's entry with the frontend, and any its resync finds of
/// a frontend that is gone (a connect racing a removal can create one).
#[btf_map]
static LB_COUNTERS: PerCpuHashMap<u32, ServiceCounters, { MAX_FRONTENDS as usize }, NO_PREALLOC> =
    PerCpuHashMap::new();

/// One of a frontend's [`ServiceCounters`].
#[derive(Clone, Copy)]
pub enum Counter {
    Connect,
    Refused,
    Datagram,
    AffinityHit,
    SocketDestroyed,
}

impl Counter {
    #[inline(always)]
    fn of(self, counters: &mut ServiceCounters) -> &mut u64 {
        match self {
            Counter::Connect => &mut counters.connects,
            Counter::Refused => &mut counters.refused,
            Counter::Datagram => &mut counters.datagrams,
            Counter::AffinityHit => &mut counters.affinity_hits,
            Counter::SocketDestroyed => &mut counters.sockets_destroyed,
        }
    }
}

/// Adds one to a frontend's counter (this CPU's copy, without an atomic: a program preempted on
/// its CPU by another, on a preemptible kernel, may rarely lose a count, which per-CPU counters
/// accept), creating the frontend's counters at its first count.
#[inline(always)]
pub fn count(service_id: u32, counter: Counter) {
    if let Some(counters) = LB_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: this CPU's value of an existing entry, written only by this CPU's programs.
        *counter.of(unsafe { &mut *counters }) += 1;
        return;
    }
    // The first count: this CPU's value is this one, the others' zero. If another CPU created
    // the entry meanwhile, the insert fails and the count goes to the entry it made.
    let mut first = ServiceCounters::default();
    *counter.of(&mut first) = 1;
    if LB_COUNTERS
        .insert(service_id, first, u64::from(BPF_NOEXIST))
        .is_err()
        && let Some(counters) = LB_COUNTERS.get_ptr_mut(service_id)
    {
        // SAFETY: as above.
        *counter.of(unsafe { &mut *counters }) += 1;
    }
}

// The backends whose sockets the agent is ending, with the frontend they left (see
// lb-common's `Terminate4Key`): filled and emptied by the agent around each run of the socket
// iterators, so allocated only then.
const TERMINATIONS: usize = MAX_TERMINATIONS as usize;

#[btf_map]
static LB4_TERMINATE: HashMap<Terminate4Key, u32, TERMINATIONS, NO_PREALLOC> = HashMap::new();

#[btf_map]
static LB6_TERMINATE: HashMap<Terminate6Key, u32, TERMINATIONS, NO_PREALLOC> = HashMap::new();

// The per-socket maps: LRU, so they can never fill up (the agent sizes them at load time).
#[btf_map]
static LB4_REVERSE: LruHashMap<Reverse4Key, ServiceAddr4, SOCKET_MAP_ENTRIES> = LruHashMap::new();

#[btf_map]
static LB6_REVERSE: LruHashMap<Reverse6Key, ServiceAddr6, SOCKET_MAP_ENTRIES> = LruHashMap::new();

#[btf_map]
static LB4_SOCK_BACKEND: LruHashMap<SockFrontend4Key, SockBackend4, SOCKET_MAP_ENTRIES> =
    LruHashMap::new();

#[btf_map]
static LB6_SOCK_BACKEND: LruHashMap<SockFrontend6Key, SockBackend6, SOCKET_MAP_ENTRIES> =
    LruHashMap::new();

// Session affinity, per client network namespace and frontend: LRU as well (the agent sizes
// them at load time).
#[btf_map]
static LB4_AFFINITY: LruHashMap<AffinityKey, Affinity4, AFFINITY_MAP_ENTRIES> = LruHashMap::new();

#[btf_map]
static LB6_AFFINITY: LruHashMap<AffinityKey, Affinity6, AFFINITY_MAP_ENTRIES> = LruHashMap::new();

/// An address family's maps and address format. Addresses are network-order bytes, ports host
/// order, as in the maps.
pub trait Family {
    type Addr: Copy + PartialEq;
    type Frontend;
    type Backend: Copy;

    fn frontend(address: Self::Addr, port: u16, protocol: u8) -> Self::Frontend;
    /// The frontend's entry, copied out at once: the agent may replace it while we run.
    fn service(frontend: &Self::Frontend) -> Option<ServiceEntry>;
    fn backend(service_id: u32, slot: u32) -> Option<Self::Backend>;
    fn backend_addr(backend: &Self::Backend) -> (Self::Addr, u16);
    /// Whether `backend` is in the backend set of service `service_id`, whichever slot it is in
    /// (its entry in the family's member map exists).
    fn is_member(service_id: u32, backend: &Self::Backend) -> bool;

    /// The service id and backend this socket's datagrams to `frontend` went to.
    fn sock_backend(cookie: u64, frontend: &Self::Frontend) -> Option<(u32, Self::Backend)>;
    fn remember_sock_backend(
        cookie: u64,
        frontend: &Self::Frontend,
        service_id: u32,
        backend: &Self::Backend,
    );

    /// The backend a client got from a frontend with session affinity, and when it last
    /// connected.
    fn affinity(key: &AffinityKey) -> Option<(Self::Backend, u64)>;
    fn remember_affinity(key: &AffinityKey, backend: &Self::Backend, now_ns: u64);

    /// Records that this socket's `backend` stands for the frontend `address:port`.
    fn remember_reverse(cookie: u64, backend: &Self::Backend, address: Self::Addr, port: u16);
    /// The frontend this socket's `address:port` stands for, if it is a backend it was
    /// translated to.
    fn reverse(cookie: u64, address: Self::Addr, port: u16) -> Option<(Self::Addr, u16)>;

    /// The service id of `frontend` when the agent is ending the sockets it translated to
    /// `backend` (with `protocol`).
    fn terminating(
        backend: (Self::Addr, u16),
        frontend: (Self::Addr, u16),
        protocol: u8,
    ) -> Option<u32>;
}

pub struct Inet;
pub struct Inet6;

// Failed updates of the LRU maps are ignored: they only fail for lack of memory, and then the
// socket still reaches its backend (only the reply source or the stickiness is lost).

impl Family for Inet {
    type Addr = [u8; 4];
    type Frontend = Frontend4Key;
    type Backend = Backend4;

    #[inline(always)]
    fn frontend(address: [u8; 4], port: u16, protocol: u8) -> Frontend4Key {
        Frontend4Key {
            address,
            port,
            protocol,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn service(frontend: &Frontend4Key) -> Option<ServiceEntry> {
        // SAFETY: read-only access to a value the kernel keeps alive during this program.
        unsafe { LB4_SERVICES.get(frontend) }.copied()
    }

    #[inline(always)]
    fn backend(service_id: u32, slot: u32) -> Option<Backend4> {
        let key = BackendSlotKey { service_id, slot };
        // SAFETY: as above.
        unsafe { LB4_BACKENDS.get(&key) }.copied()
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend4) -> ([u8; 4], u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn is_member(service_id: u32, backend: &Backend4) -> bool {
        let key = BackendMember4Key::new(service_id, backend);
        // SAFETY: as above; only the entry's presence is used.
        unsafe { LB4_MEMBERS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn sock_backend(cookie: u64, frontend: &Frontend4Key) -> Option<(u32, Backend4)> {
        let key = SockFrontend4Key {
            cookie,
            frontend: *frontend,
        };
        // SAFETY: as above.
        unsafe { LB4_SOCK_BACKEND.get(&key) }.map(|v| (v.service_id, v.backend))
    }

    #[inline(always)]
    fn remember_sock_backend(
        cookie: u64,
        frontend: &Frontend4Key,
        service_id: u32,
        backend: &Backend4,
    ) {
        let key = SockFrontend4Key {
            cookie,
            frontend: *frontend,
        };
        let value = SockBackend4 {
            service_id,
            backend: *backend,
        };
        let _ = LB4_SOCK_BACKEND.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey) -> Option<(Backend4, u64)> {
        // SAFETY: read-only access to a value the kernel keeps alive during this program.
        unsafe { LB4_AFFINITY.get(key) }.map(|v| (v.backend, v.last_used_ns))
    }

    #[inline(always)]
    fn remember_affinity(key: &AffinityKey, backend: &Backend4, now_ns: u64) {
        let value = Affinity4 {
            backend: *backend,
            last_used_ns: now_ns,
        };
        let _ = LB4_AFFINITY.insert(key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn remember_reverse(cookie: u64, backend: &Backend4, address: [u8; 4], port: u16) {
        let key = Reverse4Key {
            cookie,
            address: backend.address,
            port: backend.port,
            _pad: 0,
        };
        let value = ServiceAddr4 {
            address,
            port,
            _pad: 0,
        };
        let _ = LB4_REVERSE.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn reverse(cookie: u64, address: [u8; 4], port: u16) -> Option<([u8; 4], u16)> {
        let key = Reverse4Key {
            cookie,
            address,
            port,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { LB4_REVERSE.get(&key) }.map(|v| (v.address, v.port))
    }

    #[inline(always)]
    fn terminating(
        (backend, backend_port): ([u8; 4], u16),
        (frontend, frontend_port): ([u8; 4], u16),
        protocol: u8,
    ) -> Option<u32> {
        let key = Terminate4Key {
            backend: Backend4 {
                address: backend,
                port: backend_port,
                _pad: 0,
            },
            frontend: ServiceAddr4 {
                address: frontend,
                port: frontend_port,
                _pad: 0,
            },
            protocol,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { LB4_TERMINATE.get(&key) }.copied()
    }
}

impl Inet {
    #[inline(always)]
    pub fn read_addr(ctx: &SockAddrContext) -> ([u8; 4], u16) {
        // SAFETY: the kernel hands a valid bpf_sock_addr for the duration of the program.
        let sa = unsafe { &*ctx.sock_addr };
        (sa.user_ip4.to_ne_bytes(), read_port(sa.user_port))
    }

    #[inline(always)]
    pub fn write_addr(ctx: &SockAddrContext, address: [u8; 4], port: u16) {
        // SAFETY: as above; user_ip4 and user_port are writable in these hooks.
        unsafe {
            let sa = ctx.sock_addr;
            (*sa).user_ip4 = u32::from_ne_bytes(address);
            (*sa).user_port = write_port(port);
        }
    }
}

impl Family for Inet6 {
    type Addr = [u8; 16];
    type Frontend = Frontend6Key;
    type Backend = Backend6;

    #[inline(always)]
    fn frontend(address: [u8; 16], port: u16, protocol: u8) -> Frontend6Key {
        Frontend6Key {
            address,
            port,
            protocol,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn service(frontend: &Frontend6Key) -> Option<ServiceEntry> {
        // SAFETY: read-only access to a value the kernel keeps alive during this program.
        unsafe { LB6_SERVICES.get(frontend) }.copied()
    }

    #[inline(always)]
    fn backend(service_id: u32, slot: u32) -> Option<Backend6> {
        let key = BackendSlotKey { service_id, slot };
        // SAFETY: as above.
        unsafe { LB6_BACKENDS.get(&key) }.copied()
    }

    #[inline(always)]
    fn backend_addr(backend: &Backend6) -> ([u8; 16], u16) {
        (backend.address, backend.port)
    }

    #[inline(always)]
    fn is_member(service_id: u32, backend: &Backend6) -> bool {
        let key = BackendMember6Key::new(service_id, backend);
        // SAFETY: as above; only the entry's presence is used.
        unsafe { LB6_MEMBERS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn sock_backend(cookie: u64, frontend: &Frontend6Key) -> Option<(u32, Backend6)> {
        let key = SockFrontend6Key {
            cookie,
            frontend: *frontend,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { LB6_SOCK_BACKEND.get(&key) }.map(|v| (v.service_id, v.backend))
    }

    #[inline(always)]
    fn remember_sock_backend(
        cookie: u64,
        frontend: &Frontend6Key,
        service_id: u32,
        backend: &Backend6,
    ) {
        let key = SockFrontend6Key {
            cookie,
            frontend: *frontend,
            _pad: 0,
        };
        let value = SockBackend6 {
            service_id,
            backend: *backend,
        };
        let _ = LB6_SOCK_BACKEND.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn affinity(key: &AffinityKey) -> Option<(Backend6, u64)> {
        // SAFETY: read-only access to a value the kernel keeps alive during this program.
        unsafe { LB6_AFFINITY.get(key) }.map(|v| (v.backend, v.last_used_ns))
    }

    #[inline(always)]
    fn remember_affinity(key: &AffinityKey, backend: &Backend6, now_ns: u64) {
        let value = Affinity6 {
            backend: *backend,
            _pad: 0,
            last_used_ns: now_ns,
        };
        let _ = LB6_AFFINITY.insert(key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn remember_reverse(cookie: u64, backend: &Backend6, address: [u8; 16], port: u16) {
        let key = Reverse6Key {
            cookie,
            address: backend.address,
            port: backend.port,
            _pad: [0; 6],
        };
        let value = ServiceAddr6 {
            address,
            port,
            _pad: 0,
        };
        let _ = LB6_REVERSE.insert(&key, &value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn reverse(cookie: u64, address: [u8; 16], port: u16) -> Option<([u8; 16], u16)> {
        let key = Reverse6Key {
            cookie,
            address,
            port,
            _pad: [0; 6],
        };
        // SAFETY: as above.
        unsafe { LB6_REVERSE.get(&key) }.map(|v| (v.address, v.port))
    }

    #[inline(always)]
    fn terminating(
        (backend, backend_port): ([u8; 16], u16),
        (frontend, frontend_port): ([u8; 16], u16),
        protocol: u8,
    ) -> Option<u32> {
        let key = Terminate6Key {
            backend: Backend6 {
                address: backend,
                port: backend_port,
                _pad: 0,
            },
            frontend: ServiceAddr6 {
                address: frontend,
                port: frontend_port,
                _pad: 0,
            },
            protocol,
            _pad: 0,
        };
        // SAFETY: as above.
        unsafe { LB6_TERMINATE.get(&key) }.copied()
    }
}

/// An AF_INET6 socket's address: IPv6, or IPv4-mapped (`::ffff:a.b.c.d`), which the IPv4 maps
/// serve.
pub enum Inet6Addr {
    V6(([u8; 16], u16)),
    Mapped(([u8; 4], u16)),
}

/// `::ffff:0:0/96`, the third word in network order.
const MAPPED_PREFIX_WORD: u32 = 0x0000_ffff;

impl Inet6 {
    #[inline(always)]
    pub fn read_addr(ctx: &SockAddrContext) -> Inet6Addr {
        // SAFETY: the kernel hands a valid bpf_sock_addr for the duration of the program.
        let sa = unsafe { &*ctx.sock_addr };
        // One 4-byte load per word: the context allows no other access size here.
        let words = [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ];
        let port = read_port(sa.user_port);
        if words[0] == 0 && words[1] == 0 && u32::from_be(words[2]) == MAPPED_PREFIX_WORD {
            return Inet6Addr::Mapped((words[3].to_ne_bytes(), port));
        }
        let mut address = [0u8; 16];
        for (i, word) in words.iter().enumerate() {
            address[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        Inet6Addr::V6((address, port))
    }

    #[inline(always)]
    pub fn write_addr(ctx: &SockAddrContext, address: [u8; 16], port: u16) {
        let word = |i: usize| {
            u32::from_ne_bytes([
                address[i * 4],
                address[i * 4 + 1],
                address[i * 4 + 2],
                address[i * 4 + 3],
            ])
        };
        write_words(ctx, [word(0), word(1), word(2), word(3)], port);
    }

    /// Writes an IPv4 address as `::ffff:a.b.c.d`, for an AF_INET6 socket.
    #[inline(always)]
    pub fn write_mapped(ctx: &SockAddrContext, address: [u8; 4], port: u16) {
        let words = [
            0,
            0,
            MAPPED_PREFIX_WORD.to_be(),
            u32::from_ne_bytes(address),
        ];
        write_words(ctx, words, port);
    }
}

#[inline(always)]
fn write_words(ctx: &SockAddrContext, words: [u32; 4], port: u16) {
    // SAFETY: the context is valid for the program's duration; user_ip6 and user_port are
    // writable in these hooks. Volatile keeps LLVM from merging the 4-byte stores into wider
    // ones, which the verifier may refuse.
    unsafe {
        let sa = ctx.sock_addr;
        for (i, word) in words.iter().enumerate() {
            core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], *word);
        }
        (*sa).user_port = write_port(port);
    }
}

/// `user_port` holds the network-order port in its low 16 bits.
#[inline(always)]
fn read_port(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn write_port(port: u16) -> u32 {
    u32::from(port.to_be())
}
