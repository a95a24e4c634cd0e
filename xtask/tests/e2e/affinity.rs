//! `sessionAffinity: ClientIP`: a client (a network namespace) keeps the backend it got, over TCP
//! and UDP, IPv4 and IPv6, until that backend leaves the set or the timeout passes since its last
//! connect; another client has an affinity of its own.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use xtask::{
    manifests,
    testbed::{PodSpec, ServiceRoute, Testbed, probe::Attempt},
};

use super::{HTTP, testbed};

const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const STICKY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x70);
const UDP_POD_PORT: u16 = 5353;
/// The Service's `timeoutSeconds`: short, so the test sees it pass.
const TIMEOUT_S: u64 = 1;

/// A dual-stack Service with ClientIP affinity (TCP 80 → http, UDP 53 → dns) over `pods`.
fn manifest(pods: &[PodSpec]) -> String {
    let service = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: demo}}
spec:
  clusterIPs: [{STICKY_IP}, \"{STICKY_IP6}\"]
  ipFamilies: [IPv4, IPv6]
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {TIMEOUT_S}}}}}
  ports:
  - {{name: http, port: 80, targetPort: http}}
  - {{name: dns, port: 53, protocol: UDP, targetPort: dns}}
"
    );
    let ports = [("http", HTTP, "TCP"), ("dns", UDP_POD_PORT, "UDP")];
    let [v4, v6] = manifests::dual_stack_slices("demo", "sticky", &ports, pods);
    manifests::documents(&[service, v4, v6])
}

/// Who answered each attempt; an error for any that got no answer.
fn answered(attempts: &[Attempt]) -> anyhow::Result<Vec<String>> {
    attempts
        .iter()
        .map(|a| {
            a.answer
                .clone()
                .with_context(|| format!("an attempt failed: {:?}", a.error))
        })
        .collect()
}

/// Connects `count` times (TCP, or a new unconnected UDP socket each time with `udp`) from
/// `netns` (the client's when `None`) to `target`, with no pause; the one pod that answered all
/// of them.
fn one_backend(
    tb: &Testbed,
    netns: Option<&str>,
    target: SocketAddr,
    udp: bool,
    count: u32,
) -> anyhow::Result<String> {
    let mut args = tb.probe_args(target, count);
    args.udp_unconnected = udp;
    if let Some(netns) = netns {
        args.netns = netns.to_owned();
    }
    let pods: BTreeSet<String> = answered(&tb.probe(&args)?)?.into_iter().collect();
    ensure!(
        pods.len() == 1,
        "{count} {} to {target} went to {pods:?}, not to one pod",
        if udp { "datagrams" } else { "connects" }
    );
    Ok(pods.into_iter().next().unwrap_or_default())
}

pub fn client_ip() -> anyhow::Result<()> {
    let pods: Vec<PodSpec> = PodSpec::numbered("pod", 3, &[HTTP])
        .into_iter()
        .map(|p| PodSpec {
            udp_ports: vec![UDP_POD_PORT],
            ..p
        })
        .collect();
    let mut tb = testbed(&pods)?;
    tb.write_manifest("sticky.yaml", &manifest(&pods))?;
    tb.start_agent()?;
    let other = tb.add_client(
        "c2",
        Ipv4Addr::new(10, 244, 1, 253),
        ServiceRoute::Unreachable,
    )?;
    let tcp = SocketAddr::from((STICKY_IP, 80));

    // Every way in keeps its backend: TCP and UDP (a new socket each time), both families, from
    // this client and from another (whose backend is its own choice).
    for (target, udp) in [
        (tcp, false),
        (SocketAddr::from((STICKY_IP6, 80)), false),
        (SocketAddr::from((STICKY_IP, 53)), true),
        (SocketAddr::from((STICKY_IP6, 53)), true),
    ] {
        let mine = one_backend(&tb, None, target, udp, 30)?;
        let theirs = one_backend(&tb, Some(&other), target, udp, 30)?;
        eprintln!(
            "{target} ({}): this client on {mine}, the other on {theirs}",
            if udp { "UDP" } else { "TCP" }
        );
    }

    // The backend leaves the set: the client moves at once, and keeps its new backend.
    let first = one_backend(&tb, None, tcp, false, 5)?;
    let rest: Vec<PodSpec> = pods.iter().filter(|p| p.name != first).cloned().collect();
    let syncs = tb.agent().metrics()?.syncs()?;
    tb.write_manifest("sticky.yaml", &manifest(&rest))?;
    tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    let moved = one_backend(&tb, None, tcp, false, 30)?;
    ensure!(moved != first, "still on {first}, which left the set");
    eprintln!("{first} left the set: the client moved to {moved} and stays there");

    // Once the timeout has passed since its last connect, the client picks anew: over ten such
    // connects to 3 backends, at least two answer (all ten on one: 1 in 20 000).
    tb.write_manifest("sticky.yaml", &manifest(&pods))?;
    thread::sleep(Duration::from_millis(300));
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 200));
        seen.insert(one_backend(&tb, None, tcp, false, 1)?);
    }
    ensure!(
        seen.len() >= 2,
        "ten connects, each after the timeout, all went to {seen:?}"
    );
    eprintln!("after the timeout, new picks went to {seen:?}");
    Ok(())
}
