//! cgroup/connect4: rewrite a connect to a Service ClusterIP:port into one to a backend Pod
//! IP:targetPort. One map lookup per connect of any socket in the cgroup; the rewrite happens once
//! per connect, with no per-packet work.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::HashMap,
    helpers::generated::{bpf_get_prandom_u32, bpf_set_retval},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    Backend4, Backend6, BackendSlotKey, Frontend4Key, Frontend6Key, MAX_BACKEND_SLOTS,
    MAX_SERVICES, ServiceEntry, ServiceName,
};

#[btf_map]
static LB4_SERVICES: HashMap<Frontend4Key, ServiceEntry, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
static LB4_BACKENDS: HashMap<BackendSlotKey, Backend4, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// IPv6 frontends: written by the agent and shown by `lb-agent list`; the connect6 program that
/// will read them is still to come.
#[btf_map]
static LB6_SERVICES: HashMap<Frontend6Key, ServiceEntry, { MAX_SERVICES as usize }> =
    HashMap::new();

#[btf_map]
static LB6_BACKENDS: HashMap<BackendSlotKey, Backend6, { MAX_BACKEND_SLOTS as usize }> =
    HashMap::new();

/// Read by `lb-agent list` only; declared here so it is created, typed (BTF) and pinned with the
/// others.
#[btf_map]
static LB_SVC_NAMES: HashMap<u32, ServiceName, { MAX_SERVICES as usize }> = HashMap::new();

/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the duration of the program.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    let frontend = Frontend4Key {
        address: sock_addr.user_ip4.to_ne_bytes(),
        // user_port holds the network-order port in its low 16 bits.
        port: u16::from_be(sock_addr.user_port as u16),
        protocol: sock_addr.protocol as u8,
        _pad: 0,
    };

    // Copy the entry out at once: the agent may replace it while we run.
    // SAFETY: read-only access to a value the kernel keeps alive during this program.
    let Some(service) = (unsafe { LB4_SERVICES.get(&frontend) }).copied() else {
        return ALLOW; // not a Service frontend: leave the connect alone
    };

    if service.backend_count == 0 {
        // kube-proxy REJECTs connections to a Service without endpoints: fail at once with
        // ECONNREFUSED rather than letting the SYN go to a ClusterIP nobody owns.
        // SAFETY: plain helper call; setting an errno is allowed in cgroup sock_addr programs.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        debug!(
            &ctx,
            "lb: service {} has no backends, refusing connect", service.service_id
        );
        return REJECT;
    }

    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % u32::from(service.backend_count);
    let slot_key = BackendSlotKey {
        service_id: service.service_id,
        slot,
    };
    // SAFETY: as above.
    let Some(backend) = (unsafe { LB4_BACKENDS.get(&slot_key) }).copied() else {
        // Cannot happen while the agent keeps slots 0..count present; leave the connect alone
        // rather than guess (the client sees the same failure as with no load balancer).
        debug!(
            &ctx,
            "lb: service {} slot {} missing", service.service_id, slot
        );
        return ALLOW;
    };

    sock_addr.user_ip4 = u32::from_ne_bytes(backend.address);
    sock_addr.user_port = u32::from(backend.port.to_be());
    debug!(
        &ctx,
        "lb: service {} -> slot {} port {}", service.service_id, slot, backend.port
    );
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0"; // bpf_set_retval and friends are GPL-only helpers
