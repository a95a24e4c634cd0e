//! lb's cgroup sock_addr programs: a socket that addresses a Service frontend (ClusterIP:port)
//! gets one ready backend (Pod IP:targetPort) instead, at the socket layer, so there is no
//! per-packet NAT:
//!
//! - `connect4`/`connect6`: TCP and connected UDP, once per connect;
//! - `sendmsg4`/`sendmsg6`: unconnected UDP (`sendto`/`sendmsg`), per datagram, with the backend
//!   kept per socket and frontend;
//! - `recvmsg4`/`recvmsg6`: replies to a translated datagram show the frontend as their source;
//! - `getpeername4`/`getpeername6`: a translated socket reports the frontend as its peer;
//! - `lb_end_tcp`/`lb_end_udp` (socket iterators the agent runs, not cgroup hooks): sockets
//!   translated to a backend that left the set are ended ([`terminate`]).
//!
//! A frontend with session affinity (`sessionAffinity: ClientIP`) sends each client, identified by
//! its network namespace, to the backend it got last time, while that backend is in the set and
//! the frontend's timeout has not passed since the client's last connect.
//!
//! Each frontend counts, per CPU, the connects and datagrams it translated or refused and its
//! session affinity hits (`LB_COUNTERS`, shown by `lb-agent list`).
//!
//! A socket that addresses anything else costs one map lookup and is left alone. IPv4 Services
//! reached through IPv4-mapped addresses (`::ffff:a.b.c.d`) on AF_INET6 sockets are served from
//! the IPv4 maps. The maps are described in lb-common.
#![no_std]
#![no_main]

mod family;
mod terminate;

use aya_ebpf::{
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{AffinityKey, ServiceEntry};

use family::{Counter, Family, Inet, Inet6, Inet6Addr, count};

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What to do with a socket's destination.
enum Verdict<F: Family> {
    /// Not a Service frontend: leave it alone.
    Untouched,
    /// A frontend without backends: fail the call with ECONNREFUSED, as kube-proxy's REJECT rule
    /// does, instead of sending to a ClusterIP nobody owns.
    Refuse(ServiceEntry),
    /// Send it here instead.
    Translate(F::Backend),
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    let addr = Inet::read_addr(&ctx);
    apply(&ctx, connect::<Inet>(&ctx, addr), Inet::write_addr)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    match Inet6::read_addr(&ctx) {
        Inet6Addr::Mapped(addr) => apply(&ctx, connect::<Inet>(&ctx, addr), Inet6::write_mapped),
        Inet6Addr::V6(addr) => apply(&ctx, connect::<Inet6>(&ctx, addr), Inet6::write_addr),
    }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    let addr = Inet::read_addr(&ctx);
    apply(&ctx, sendmsg::<Inet>(&ctx, addr), Inet::write_addr)
}

/// Datagrams to an IPv4-mapped address are handed to the IPv4 path (and its sendmsg4 hook) by the
/// kernel; they are handled here as well, which is harmless: a translated destination is a Pod
/// IP, which no frontend matches.
#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    match Inet6::read_addr(&ctx) {
        Inet6Addr::Mapped(addr) => apply(&ctx, sendmsg::<Inet>(&ctx, addr), Inet6::write_mapped),
        Inet6Addr::V6(addr) => apply(&ctx, sendmsg::<Inet6>(&ctx, addr), Inet6::write_addr),
    }
}

/// recvmsg programs may only return 1: they can rewrite the source, never drop.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_frontend::<Inet>(&ctx, Inet::read_addr(&ctx), Inet::write_addr);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    show_frontend::<Inet>(&ctx, Inet::read_addr(&ctx), Inet::write_addr);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    ALLOW
}

fn reverse6(ctx: &SockAddrContext) {
    match Inet6::read_addr(ctx) {
        Inet6Addr::Mapped(addr) => show_frontend::<Inet>(ctx, addr, Inet6::write_mapped),
        Inet6Addr::V6(addr) => show_frontend::<Inet6>(ctx, addr, Inet6::write_addr),
    }
}

/// Picks a backend for a connect and remembers the translation for getpeername and for replies
/// to a connected UDP socket.
#[inline(always)]
fn connect<F: Family>(ctx: &SockAddrContext, (address, port): (F::Addr, u16)) -> Verdict<F> {
    let frontend = F::frontend(address, port, protocol(ctx));
    let Some(service) = F::service(&frontend) else {
        return Verdict::Untouched;
    };
    if service.backend_count == 0 {
        count(service.service_id, Counter::Refused);
        return Verdict::Refuse(service);
    }
    let Some(backend) = choose::<F>(ctx, &service) else {
        return Verdict::Untouched;
    };
    F::remember_reverse(cookie(ctx), &backend, address, port);
    count(service.service_id, Counter::Connect);
    Verdict::Translate(backend)
}

/// Like [`connect`], for one datagram of an unconnected socket: the socket's earlier datagrams to
/// this frontend went to a backend, and the next ones go there too while it is in the frontend's
/// set, whichever slot it is in now. Once it leaves (or the frontend was removed and added again
/// under another service id), the next datagram picks anew.
#[inline(always)]
fn sendmsg<F: Family>(ctx: &SockAddrContext, (address, port): (F::Addr, u16)) -> Verdict<F> {
    let frontend = F::frontend(address, port, protocol(ctx));
    let Some(service) = F::service(&frontend) else {
        return Verdict::Untouched;
    };
    if service.backend_count == 0 {
        count(service.service_id, Counter::Refused);
        return Verdict::Refuse(service);
    }
    let cookie = cookie(ctx);
    if let Some((service_id, backend)) = F::sock_backend(cookie, &frontend)
        && service_id == service.service_id
        && F::is_member(service_id, &backend)
    {
        // The two LRU maps evict independently: bring the reverse record back if it went, or
        // the replies to this datagram would show the Pod IP.
        let (backend_address, backend_port) = F::backend_addr(&backend);
        if F::reverse(cookie, backend_address, backend_port) != Some((address, port)) {
            F::remember_reverse(cookie, &backend, address, port);
        }
        count(service_id, Counter::Datagram);
        return Verdict::Translate(backend);
    }
    let Some(backend) = choose::<F>(ctx, &service) else {
        return Verdict::Untouched;
    };
    F::remember_sock_backend(cookie, &frontend, service.service_id, &backend);
    F::remember_reverse(cookie, &backend, address, port);
    count(service.service_id, Counter::Datagram);
    Verdict::Translate(backend)
}

/// The backend for a new connect (or a socket's first datagram): with session affinity, the one
/// this client (network namespace) got last time, while it is in the set and the timeout has not
/// passed since; otherwise, and then remembered, a random one.
#[inline(always)]
fn choose<F: Family>(ctx: &SockAddrContext, service: &ServiceEntry) -> Option<F::Backend> {
    if service.affinity_timeout_s == 0 {
        return pick::<F>(ctx, service);
    }
    let key = AffinityKey {
        // SAFETY: sock_addr programs pass their context to bpf_get_netns_cookie.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        service_id: service.service_id,
        _pad: 0,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
    let backend = match F::affinity(&key) {
        Some((backend, last_used))
            if now.saturating_sub(last_used) < timeout_ns
                && F::is_member(service.service_id, &backend) =>
        {
            count(service.service_id, Counter::AffinityHit);
            backend
        }
        _ => pick::<F>(ctx, service)?,
    };
    F::remember_affinity(&key, &backend, now);
    Some(backend)
}

/// The backend in a random slot of the service's (non-empty) backend set.
#[inline(always)]
fn pick<F: Family>(ctx: &SockAddrContext, service: &ServiceEntry) -> Option<F::Backend> {
    // `max` keeps the verifier and a racing agent from ever dividing by zero.
    // SAFETY: plain helper call.
    let slot = unsafe { aya_ebpf::helpers::generated::bpf_get_prandom_u32() }
        % u32::from(service.backend_count).max(1);
    let backend = F::backend(service.service_id, slot);
    if backend.is_none() {
        // Cannot happen while the agent keeps slots 0..count present; leave the socket alone
        // rather than guess (the client sees what it would without a load balancer).
        debug!(
            ctx,
            "lb: service {} slot {} missing", service.service_id, slot
        );
    }
    backend
}

/// Rewrites a peer or reply source that is a backend this socket was translated to back into the
/// frontend the socket addressed.
#[inline(always)]
fn show_frontend<F: Family>(
    ctx: &SockAddrContext,
    (address, port): (F::Addr, u16),
    write: fn(&SockAddrContext, F::Addr, u16),
) {
    if let Some((frontend, frontend_port)) = F::reverse(cookie(ctx), address, port) {
        write(ctx, frontend, frontend_port);
    }
}

#[inline(always)]
fn apply<F: Family>(
    ctx: &SockAddrContext,
    verdict: Verdict<F>,
    write: fn(&SockAddrContext, F::Addr, u16),
) -> i32 {
    match verdict {
        Verdict::Untouched => ALLOW,
        Verdict::Translate(backend) => {
            let (address, port) = F::backend_addr(&backend);
            write(ctx, address, port);
            ALLOW
        }
        Verdict::Refuse(service) => {
            // SAFETY: plain helper call; cgroup sock_addr programs may set the errno.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            debug!(
                ctx,
                "lb: service {} has no backends, refusing", service.service_id
            );
            REJECT
        }
    }
}

#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the duration of the program.
    unsafe { (*ctx.sock_addr).protocol as u8 }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: sock_addr programs pass their context to bpf_get_socket_cookie.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0"; // bpf_set_retval and friends are GPL-only helpers
