//! Every way a socket reaches a Service besides a TCP connect: unconnected UDP (sendmsg/recvmsg),
//! getpeername, IPv6, IPv4-mapped addresses on AF_INET6 sockets, and dual-stack Services.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use xtask::{
    manifests::{self, Port},
    testbed::{
        PodSpec, Testbed,
        probe::{self, Attempt, now_us, v4_mapped},
    },
};

use super::{HTTP, WEB_IP, all_failed_with, answers, eventually, listing, testbed, web};

pub const WEB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const UDP_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const UDP_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x60);
const EMPTY_UDP_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 61);
const EMPTY_UDP_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x61);
const UDP_POD_PORT: u16 = 5353;

fn web6() -> SocketAddr {
    SocketAddr::from((WEB_IP6, 80))
}

/// `count` pods answering HTTP on 8080 and datagrams on 5353, on both families.
fn pods(count: u8) -> Vec<PodSpec> {
    PodSpec::numbered("pod", count, &[HTTP])
        .into_iter()
        .map(|p| PodSpec {
            udp_ports: vec![UDP_POD_PORT],
            ..p
        })
        .collect()
}

/// A dual-stack Service `name` at `cluster_ips` with `port`, and one slice per family listing
/// `pods` with `slice_ports`.
pub fn dual_stack(
    name: &str,
    cluster_ips: (Ipv4Addr, Ipv6Addr),
    port: Port,
    pods: &[PodSpec],
    slice_ports: &[(&str, u16, &str)],
) -> Vec<String> {
    let [v4, v6] = manifests::dual_stack_slices("demo", name, slice_ports, pods);
    vec![
        manifests::dual_stack_service("demo", name, cluster_ips, &[port]),
        v4,
        v6,
    ]
}

/// Dual-stack Services over `pods`: demo/web (TCP 80 → http) and demo/udp (UDP 53 → dns); and
/// demo/empty-udp (UDP 53, both families) with no endpoints.
fn manifest(pods: &[PodSpec]) -> String {
    let ports = [("http", HTTP, "TCP"), ("dns", UDP_POD_PORT, "UDP")];
    let web = dual_stack(
        "web",
        (WEB_IP, WEB_IP6),
        Port::tcp("http", 80, "http"),
        pods,
        &ports,
    );
    let udp = dual_stack(
        "udp",
        (UDP_IP, UDP_IP6),
        Port::udp("dns", 53, "dns"),
        pods,
        &ports,
    );
    let empty = manifests::dual_stack_service(
        "demo",
        "empty-udp",
        (EMPTY_UDP_IP, EMPTY_UDP_IP6),
        &[Port::udp("dns", 53, 53)],
    );
    manifests::documents(&[web, udp, vec![empty]].concat())
}

fn dual_stack_testbed(count: u8) -> anyhow::Result<(Vec<PodSpec>, Testbed)> {
    let pods = pods(count);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("services.yaml", &manifest(&pods))?;
    tb.start_agent()?;
    Ok((pods, tb))
}

/// The three ways a client addresses the UDP Service: IPv4, IPv6, IPv4-mapped on AF_INET6.
fn udp_frontends() -> [SocketAddr; 3] {
    let v4 = SocketAddr::from((UDP_IP, 53));
    [v4, SocketAddr::from((UDP_IP6, 53)), v4_mapped(v4)]
}

/// Datagrams grouped by the socket that sent them, in order.
fn by_socket(attempts: &[Attempt]) -> BTreeMap<u32, Vec<&Attempt>> {
    let mut out: BTreeMap<u32, Vec<&Attempt>> = BTreeMap::new();
    for a in attempts {
        out.entry(a.socket.unwrap_or(0)).or_default().push(a);
    }
    out
}

pub fn unconnected_udp() -> anyhow::Result<()> {
    let (_, tb) = dual_stack_testbed(3)?;

    for frontend in udp_frontends() {
        let mut args = tb.probe_args(frontend, 20);
        args.udp_unconnected = true;
        args.messages = 5;
        let attempts = tb.probe(&args)?;
        ensure!(attempts.len() == 100, "{} datagrams", attempts.len());
        let counts = answers(&attempts).with_context(|| format!("sendto {frontend}"))?;

        // What a resolver checks before it accepts an answer: it comes from where it asked.
        let shown = frontend.to_string();
        for a in &attempts {
            ensure!(
                a.from.as_deref() == Some(shown.as_str()),
                "a reply to {frontend} came from {:?}, not from the ClusterIP",
                a.from
            );
        }
        // Each socket stays on one backend; sockets spread over all of them.
        for (socket, sent) in by_socket(&attempts) {
            let pods: BTreeSet<_> = sent.iter().map(|a| a.answer.clone()).collect();
            ensure!(
                pods.len() == 1,
                "socket {socket}'s datagrams to {frontend} went to {pods:?}"
            );
        }
        ensure!(
            counts.len() == 3,
            "20 sockets to {frontend} should reach all 3 pods: {counts:?}"
        );
        eprintln!("sendto {frontend}: replies from {shown}, sockets per pod {counts:?}");
    }
    Ok(())
}

/// Sockets keep their backend while it stays in the set, even when a scale-down moves it to
/// another slot, and move (once) when it leaves.
pub fn udp_backend_changes() -> anyhow::Result<()> {
    let (pods, tb) = dual_stack_testbed(3)?;
    // Enough sockets that some land on each pod: (2/3)^24 is the chance that none is on pod-1.
    const SOCKETS: usize = 24;

    // Both families at once: each frontend has its own slots, and both go through the change.
    let mut probes = Vec::new();
    for frontend in [udp_frontends()[0], udp_frontends()[1]] {
        let mut args = tb.probe_args(frontend, 1);
        args.udp_unconnected = true;
        args.messages = 60;
        args.interval_ms = 40;
        for _ in 0..SOCKETS {
            probes.push((frontend, tb.spawn_probe(&args)?));
        }
    }

    // pod-1 leaves: the agent moves pod-3 from the last slot into pod-1's.
    thread::sleep(Duration::from_millis(800));
    let written_at = now_us();
    tb.write_manifest("services.yaml", &manifest(&pods[1..]))?;
    // Applied once no frontend lists pod-1 (on either family) any more.
    let gone = [pods[0].ip.to_string(), pods[0].ip6().to_string()];
    eventually(Duration::from_secs(5), || {
        let now = listing(&tb)?;
        let listed = now.values().flat_map(|(_, backends)| backends).any(|b| {
            gone.iter()
                .any(|ip| b.rsplit_once(':').is_some_and(|(a, _)| a == ip))
        });
        Ok(listed.then(|| format!("pod-1 still listed: {now:#?}")))
    })?;
    let applied_at = now_us();

    let mut moved: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    let mut stayed_after_slot_move: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for (frontend, child) in probes {
        let attempts = probe::collect(child)?;
        answers(&attempts).with_context(|| format!("sendto {frontend}"))?;
        let pods_between = |from: u64, to: u64| -> BTreeSet<String> {
            attempts
                .iter()
                .filter(|a| (from..to).contains(&a.at_us))
                .map(|a| a.answer.clone().unwrap_or_default())
                .collect()
        };
        let (before, after) = (
            pods_between(0, written_at),
            pods_between(applied_at, u64::MAX),
        );
        ensure!(
            before.len() == 1 && after.len() == 1,
            "a socket to {frontend} changed backend without a reason: {before:?} before the \
             change, {after:?} after"
        );
        let (first, last) = (before.first().unwrap(), after.first().unwrap());
        if first == "pod-1" {
            ensure!(last != "pod-1", "a socket stayed on the removed pod-1");
            *moved.entry(frontend).or_default() += 1;
        } else {
            ensure!(
                first == last,
                "a socket to {frontend} on {first}, which stayed in the set, moved to {last}"
            );
            if first == "pod-3" {
                *stayed_after_slot_move.entry(frontend).or_default() += 1;
            }
        }
    }
    for frontend in [udp_frontends()[0], udp_frontends()[1]] {
        let (m, s) = (
            moved.get(&frontend).copied().unwrap_or(0),
            stayed_after_slot_move.get(&frontend).copied().unwrap_or(0),
        );
        ensure!(
            m > 0 && s > 0,
            "of {SOCKETS} sockets to {frontend}, some should have been on pod-1 ({m}) and on \
             pod-3 ({s})"
        );
        eprintln!(
            "sendto {frontend}: {m} sockets moved off the removed pod-1, {s} stayed on pod-3 \
             across its slot move"
        );
    }
    Ok(())
}

pub fn getpeername() -> anyhow::Result<()> {
    let (pods, tb) = dual_stack_testbed(2)?;

    let udp4 = udp_frontends()[0];
    for (frontend, udp) in [
        (web(), false),
        (web6(), false),
        (v4_mapped(web()), false),
        (udp4, true),
        (SocketAddr::from((UDP_IP6, 53)), true),
        (v4_mapped(udp4), true),
    ] {
        let mut args = tb.probe_args(frontend, 10);
        args.peer = true;
        args.udp = udp;
        let attempts = tb.probe(&args)?;
        answers(&attempts).with_context(|| format!("connect {frontend}"))?;
        for a in &attempts {
            ensure!(
                a.peer.as_deref() == Some(frontend.to_string().as_str()),
                "getpeername after connect {frontend} said {:?}",
                a.peer
            );
        }
    }

    // A socket connected to a Pod IP directly reports that Pod IP.
    let direct = SocketAddr::from((pods[0].ip6(), HTTP));
    let mut args = tb.probe_args(direct, 3);
    args.peer = true;
    for a in tb.probe(&args)? {
        ensure!(
            a.peer.as_deref() == Some(direct.to_string().as_str()),
            "{a:?}"
        );
    }
    Ok(())
}

pub fn ipv6_and_dual_stack() -> anyhow::Result<()> {
    let (pods, tb) = dual_stack_testbed(3)?;

    // The same Service through each of its ClusterIPs, and its IPv4 one from AF_INET6 sockets.
    for frontend in [web(), web6(), v4_mapped(web())] {
        let counts = answers(&tb.probe(&tb.probe_args(frontend, 60))?)
            .with_context(|| format!("connect {frontend}"))?;
        ensure!(
            counts.len() == 3,
            "connects to {frontend} should reach all 3 pods: {counts:?}"
        );
    }

    // Each frontend has the backends of its own family.
    let got = listing(&tb)?;
    let v4: Vec<String> = pods.iter().map(|p| format!("{}:{HTTP}", p.ip)).collect();
    let v6: Vec<String> = pods.iter().map(|p| format!("{}:{HTTP}", p.ip6())).collect();
    ensure!(
        got.get("10.96.0.10:80/TCP") == Some(&("demo/web:http".to_owned(), v4)),
        "{got:#?}"
    );
    ensure!(
        got.get("fd00:96::10:80/TCP") == Some(&("demo/web:http".to_owned(), v6)),
        "{got:#?}"
    );
    let table = tb.agent_command(&["list"])?;
    ensure!(
        table.contains("[fd00:96::10]:80/TCP") && table.contains("[fd00:244:1::1]:8080"),
        "{table}"
    );

    // IPv6 addresses that are not frontends are left alone: another port of the ClusterIP hits
    // the client's unreachable route, a pod's own address is reached directly.
    let other = tb.probe(&tb.probe_args(SocketAddr::from((WEB_IP6, 81)), 3))?;
    ensure!(
        all_failed_with(&other, "EHOSTUNREACH"),
        "[fd00:96::10]:81 was touched: {other:?}"
    );
    let direct = answers(&tb.probe(&tb.probe_args(SocketAddr::from((pods[1].ip6(), HTTP)), 10))?)?;
    ensure!(direct.keys().eq(["pod-2"]), "{direct:?}");
    Ok(())
}

/// A UDP Service without endpoints refuses datagrams at once; datagrams that are not to a
/// frontend are left alone.
pub fn udp_refused_and_untouched() -> anyhow::Result<()> {
    let (pods, tb) = dual_stack_testbed(2)?;

    for frontend in [
        SocketAddr::from((EMPTY_UDP_IP, 53)),
        SocketAddr::from((EMPTY_UDP_IP6, 53)),
        v4_mapped(SocketAddr::from((EMPTY_UDP_IP, 53))),
    ] {
        let mut args = tb.probe_args(frontend, 5);
        args.udp_unconnected = true;
        for a in tb.probe(&args)? {
            ensure!(
                a.error.as_deref() == Some("ECONNREFUSED"),
                "sendto {frontend} (no endpoints): {a:?}"
            );
            ensure!(a.connect_us < 10_000, "refusal took {} µs", a.connect_us);
        }
    }

    // Datagrams straight to a pod, from inside lb's cgroup: untouched, replies show the pod.
    for pod_addr in [IpAddr::from(pods[1].ip), IpAddr::from(pods[1].ip6())] {
        let target = SocketAddr::from((pod_addr, UDP_POD_PORT));
        let mut args = tb.probe_args(target, 3);
        args.udp_unconnected = true;
        args.messages = 3;
        for a in tb.probe(&args)? {
            ensure!(
                a.answer.as_deref() == Some("pod-2")
                    && a.from.as_deref() == Some(target.to_string().as_str()),
                "sendto {target}: {a:?}"
            );
        }
    }

    // The UDP ClusterIP on a port it does not serve: not translated, so unreachable.
    for target in [
        SocketAddr::from((UDP_IP, 54)),
        SocketAddr::from((UDP_IP6, 54)),
    ] {
        let mut args = tb.probe_args(target, 2);
        args.udp_unconnected = true;
        for a in tb.probe(&args)? {
            ensure!(
                a.error.as_deref() == Some("EHOSTUNREACH"),
                "sendto {target} was touched: {a:?}"
            );
        }
    }
    Ok(())
}

/// Unconnected UDP sockets keep their backend and their replies' source while the agent is
/// stopped and restarted: the per-socket maps are pinned and adopted like the others.
pub fn udp_across_agent_restart() -> anyhow::Result<()> {
    let (_, mut tb) = dual_stack_testbed(3)?;
    let mut probes = Vec::new();
    for frontend in udp_frontends() {
        let mut args = tb.probe_args(frontend, 1);
        args.udp_unconnected = true;
        args.messages = 60;
        args.interval_ms = 40;
        for _ in 0..4 {
            probes.push((frontend, tb.spawn_probe(&args)?));
        }
    }
    thread::sleep(Duration::from_millis(600));
    tb.stop_agent()?;
    thread::sleep(Duration::from_millis(600));
    tb.start_agent()?;

    for (frontend, child) in probes {
        let attempts = probe::collect(child)?;
        answers(&attempts).with_context(|| format!("sendto {frontend} across the restart"))?;
        ensure!(attempts.len() == 60, "{} datagrams", attempts.len());
        let pods: BTreeSet<_> = attempts.iter().map(|a| a.answer.clone()).collect();
        ensure!(
            pods.len() == 1,
            "a socket to {frontend} changed backend across the restart: {pods:?}"
        );
        let shown = frontend.to_string();
        ensure!(
            attempts.iter().all(|a| a.from.as_deref() == Some(&shown)),
            "a reply to {frontend} did not come from the ClusterIP across the restart"
        );
    }
    Ok(())
}

/// The per-socket maps are LRU: with room for 64 records, hundreds of sockets still get every
/// datagram translated and every reply shown from the ClusterIP, and the maps hold at most 64.
pub fn socket_maps_never_fill() -> anyhow::Result<()> {
    let pods = pods(2);
    let mut tb = testbed(&pods)?;
    tb.agent_flags(&["--socket-map-entries", "64"]);
    tb.write_manifest("services.yaml", &manifest(&pods))?;
    tb.start_agent()?;

    let frontend = udp_frontends()[0];
    let mut args = tb.probe_args(frontend, 400);
    args.udp_unconnected = true;
    let attempts = tb.probe(&args)?;
    answers(&attempts).context("with a full reverse map")?;
    let shown = frontend.to_string();
    ensure!(
        attempts.iter().all(|a| a.from.as_deref() == Some(&shown)),
        "a reply did not come from the ClusterIP"
    );
    // TCP connects record their translation too (for getpeername).
    let mut tcp = tb.probe_args(web(), 200);
    tcp.peer = true;
    let connects = tb.probe(&tcp)?;
    answers(&connects).context("connects with a full reverse map")?;

    for map in ["LB4_REVERSE", "LB4_SOCK_BACKEND"] {
        let dump = std::process::Command::new(
            xtask::testbed::find_tool("bpftool").context("bpftool not found")?,
        )
        .args(["--json", "map", "dump", "pinned"])
        .arg(tb.maps_dir().join(map))
        .output()?;
        let entries: serde_json::Value = serde_json::from_slice(&dump.stdout)
            .with_context(|| format!("bpftool map dump {map}"))?;
        let count = entries.as_array().map_or(0, Vec::len);
        ensure!(
            (1..=64).contains(&count),
            "{map} holds {count} records with room for 64"
        );
        eprintln!("{map}: {count} records after 400 sockets and 200 connects (room for 64)");
    }
    Ok(())
}
