//! Ending sockets to removed backends: socket iterator programs (`iter/tcp`, `iter/udp`) that the
//! agent runs in each network namespace of the cgroup after a backend left a frontend's set. A
//! connected socket whose destination is such a backend, and that lb translated from that
//! frontend (its reverse entry says so), is ended with the `bpf_sock_destroy` kfunc (Linux 6.5):
//! the application sees ECONNABORTED and connects again, to a live backend. A socket connected to
//! the Pod IP directly has no reverse entry and is left alone.
//!
//! The kfunc call is emitted as a call to an undefined symbol; the agent rewrites it into a kfunc
//! call before loading the object (aya 0.14 does not resolve kfuncs).

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{bpf_get_socket_cookie, bpf_seq_write};
use lb_common::protocol;

use crate::family::{Counter, Family, Inet, Inet6, count};

/// The kernel's `struct bpf_iter_meta`.
#[repr(C)]
pub struct IterMeta {
    pub seq: *mut c_void,
    pub session_id: u64,
    pub seq_num: u64,
}

/// The kernel's `struct bpf_iter__tcp`: a `sock_common`, which may be a full, request or
/// time-wait socket.
#[repr(C)]
pub struct IterTcp {
    pub meta: *mut IterMeta,
    pub sk_common: *mut c_void,
    pub uid: u32,
}

/// The kernel's `struct bpf_iter__udp`.
#[repr(C)]
pub struct IterUdp {
    pub meta: *mut IterMeta,
    pub udp_sk: *mut c_void,
    pub uid: u32,
    pub bucket: i32,
}

unsafe extern "C" {
    /// Aborts the socket (ECONNABORTED); 0 on success.
    fn bpf_sock_destroy(sk: *mut c_void) -> i32;
}

// `struct sock_common`'s fields, at their offsets (stable since long before Linux 6.5; the
// IPv6 destination's with network namespaces and IPv6 built in, as every distribution kernel
// has them). A wrong offset could only make a lookup miss: nothing is ended without its reverse
// entry, keyed by the socket's cookie.
const DADDR: usize = 0;
const DPORT: usize = 12;
const FAMILY: usize = 16;
const STATE: usize = 18;
const V6_DADDR: usize = 56;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// `TCP_TIME_WAIT` and `TCP_NEW_SYN_RECV`: not full sockets, nothing to end.
const TIME_WAIT: u8 = 6;
const NEW_SYN_RECV: u8 = 12;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn lb_end_tcp(ctx: *mut IterTcp) -> i32 {
    // SAFETY: the kernel hands a valid context for the duration of the program.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    end_if_departed(meta, sk, protocol::TCP);
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub fn lb_end_udp(ctx: *mut IterUdp) -> i32 {
    // SAFETY: as above.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).udp_sk) };
    end_if_departed(meta, sk, protocol::UDP);
    0
}

#[inline(always)]
fn end_if_departed(meta: *mut IterMeta, sk: *mut c_void, protocol: u8) {
    if sk.is_null() {
        return;
    }
    let Some(service_id) = departed(sk, protocol) else {
        return;
    };
    // SAFETY: `sk` is the iterator's socket, unmodified, which the kernel holds locked.
    if unsafe { bpf_sock_destroy(sk) } != 0 {
        return;
    }
    count(service_id, Counter::SocketDestroyed);
    // The agent counts what was ended from the iterator's output: one cookie per socket.
    // SAFETY: as above; the cookie is read from a live socket.
    let mut cookie = unsafe { bpf_get_socket_cookie(sk) };
    // SAFETY: `meta` is the iterator's, and the cookie is 8 bytes on this stack.
    unsafe { bpf_seq_write((*meta).seq.cast(), (&raw mut cookie).cast(), 8) };
}

/// The service id of the frontend this socket was translated from, when its destination is a
/// backend that left that frontend's set.
#[inline(always)]
fn departed(sk: *mut c_void, protocol: u8) -> Option<u32> {
    let at = sk as *const u8;
    // SAFETY: fixed offsets into the socket's `struct sock_common`, which the verifier checks
    // against the kernel's BTF.
    let (family, state, port) = unsafe {
        (
            *at.add(FAMILY).cast::<u16>(),
            *at.add(STATE),
            u16::from_be(*at.add(DPORT).cast::<u16>()),
        )
    };
    if state == TIME_WAIT || state == NEW_SYN_RECV || port == 0 {
        return None; // not a full connected socket
    }
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    match family {
        AF_INET => {
            // SAFETY: as above.
            let address: [u8; 4] = unsafe { *at.add(DADDR).cast() };
            departed_through::<Inet>(cookie, (address, port), protocol)
        }
        AF_INET6 => {
            // SAFETY: as above.
            let address: [u8; 16] = unsafe { *at.add(V6_DADDR).cast() };
            // An IPv4 Service reached through an IPv4-mapped address was translated in the
            // IPv4 maps.
            match address {
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                    departed_through::<Inet>(cookie, ([a, b, c, d], port), protocol)
                }
                _ => departed_through::<Inet6>(cookie, (address, port), protocol),
            }
        }
        _ => None,
    }
}

#[inline(always)]
fn departed_through<F: Family>(cookie: u64, backend: (F::Addr, u16), protocol: u8) -> Option<u32> {
    let frontend = F::reverse(cookie, backend.0, backend.1)?;
    F::terminating(backend, frontend, protocol)
}
