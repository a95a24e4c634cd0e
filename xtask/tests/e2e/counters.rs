//! Per-frontend counters: `lb-agent list` shows exactly the connects, datagrams, refusals and
//! session affinity hits the programs made for each frontend, they survive an agent restart, and a
//! frontend that is removed and added again starts from zero.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, ensure};
use lb_agent::list::{CountersJson, Listing};
use xtask::{
    manifests::{self, Port},
    testbed::{PodSpec, Testbed},
};

use super::{HTTP, testbed};

const COUNTED_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 80);
const COUNTED_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x80);
const STICKY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 81);
const REFUSING_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 82);
const UDP_POD_PORT: u16 = 5353;

/// `counted` (dual-stack, TCP 80 and UDP 53 over `pods`), `sticky` (ClientIP affinity, TCP 80
/// over `pods`) and, with `refusing`, a Service of that name without endpoints (TCP 80, UDP 53).
fn manifest(pods: &[PodSpec], refusing: bool) -> String {
    let ports = [Port::tcp("http", 80, "http"), Port::udp("dns", 53, "dns")];
    let slice_ports = [("http", HTTP, "TCP"), ("dns", UDP_POD_PORT, "UDP")];
    let counted =
        manifests::dual_stack_service("demo", "counted", (COUNTED_IP, COUNTED_IP6), &ports);
    let [counted4, counted6] = manifests::dual_stack_slices("demo", "counted", &slice_ports, pods);
    let sticky = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: demo}}
spec:
  clusterIP: {STICKY_IP}
  sessionAffinity: ClientIP
  ports: [{{name: http, port: 80, targetPort: http}}]
"
    );
    let [sticky4, _] = manifests::dual_stack_slices("demo", "sticky", &slice_ports, pods);
    let mut docs = vec![counted, counted4, counted6, sticky, sticky4];
    if refusing {
        docs.push(manifests::service("demo", "refusing", REFUSING_IP, &ports));
    }
    manifests::documents(&docs)
}

/// The counters `listing` shows for the frontend `target`/`protocol`.
pub fn counters(
    listing: &Listing,
    target: SocketAddr,
    protocol: &str,
) -> anyhow::Result<CountersJson> {
    let row = listing
        .frontends
        .iter()
        .find(|r| {
            r.frontend.address == target.ip().to_string()
                && r.frontend.port == target.port()
                && r.frontend.protocol == protocol
        })
        .with_context(|| format!("lb-agent list shows no frontend {target}/{protocol}"))?;
    row.counters
        .with_context(|| format!("lb-agent list shows no counters for {target}/{protocol}"))
}

/// `count` attempts of `kind` to `target` from the client (with [`Kind::Datagrams`], `count`
/// sockets of `messages` datagrams each), and how many were answered.
fn attempts(tb: &Testbed, target: SocketAddr, kind: Kind, count: u32) -> anyhow::Result<usize> {
    let mut args = tb.probe_args(target, count);
    match kind {
        Kind::Tcp => {}
        Kind::ConnectedUdp => args.udp = true,
        Kind::Datagrams { messages } => {
            args.udp_unconnected = true;
            args.messages = messages;
        }
    }
    Ok(tb
        .probe(&args)?
        .iter()
        .filter(|a| a.answer.is_some())
        .count())
}

#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    ConnectedUdp,
    Datagrams { messages: u32 },
}

pub fn per_frontend() -> anyhow::Result<()> {
    let pods: Vec<PodSpec> = PodSpec::numbered("pod", 2, &[HTTP])
        .into_iter()
        .map(|p| PodSpec {
            udp_ports: vec![UDP_POD_PORT],
            ..p
        })
        .collect();
    let mut tb = testbed(&pods)?;
    tb.write_manifest("counted.yaml", &manifest(&pods, true))?;
    tb.start_agent()?;

    let tcp = SocketAddr::from((COUNTED_IP, 80));
    let tcp6 = SocketAddr::from((COUNTED_IP6, 80));
    let udp = SocketAddr::from((COUNTED_IP, 53));
    let sticky = SocketAddr::from((STICKY_IP, 80));
    let refusing_tcp = SocketAddr::from((REFUSING_IP, 80));
    let refusing_udp = SocketAddr::from((REFUSING_IP, 53));

    ensure!(
        attempts(&tb, tcp, Kind::Tcp, 40)? == 40,
        "TCP connects to {tcp} failed"
    );
    ensure!(
        attempts(&tb, tcp6, Kind::Tcp, 25)? == 25,
        "TCP connects to {tcp6} failed"
    );
    ensure!(
        attempts(&tb, udp, Kind::ConnectedUdp, 5)? == 5,
        "connected UDP to {udp} failed"
    );
    // 10 sockets × 3 datagrams, each answered.
    let answered = attempts(&tb, udp, Kind::Datagrams { messages: 3 }, 10)?;
    ensure!(
        answered == 30,
        "{answered} of 30 datagrams to {udp} answered"
    );
    ensure!(
        attempts(&tb, sticky, Kind::Tcp, 20)? == 20,
        "connects to {sticky} failed"
    );
    ensure!(
        attempts(&tb, refusing_tcp, Kind::Tcp, 7)? == 0,
        "{refusing_tcp} answered"
    );
    let answered = attempts(&tb, refusing_udp, Kind::Datagrams { messages: 1 }, 4)?;
    ensure!(answered == 0, "{refusing_udp} answered");

    let expected = [
        (
            tcp,
            "TCP",
            CountersJson {
                connects: 40,
                ..Default::default()
            },
        ),
        (
            tcp6,
            "TCP",
            CountersJson {
                connects: 25,
                ..Default::default()
            },
        ),
        (
            udp,
            "UDP",
            CountersJson {
                connects: 5,
                datagrams: 30,
                ..Default::default()
            },
        ),
        (
            SocketAddr::from((COUNTED_IP6, 53)),
            "UDP",
            CountersJson::default(),
        ),
        // The first connect picks, the 19 others keep the client's backend.
        (
            sticky,
            "TCP",
            CountersJson {
                connects: 20,
                affinity_hits: 19,
                ..Default::default()
            },
        ),
        (
            refusing_tcp,
            "TCP",
            CountersJson {
                refused: 7,
                ..Default::default()
            },
        ),
        (
            refusing_udp,
            "UDP",
            CountersJson {
                refused: 4,
                ..Default::default()
            },
        ),
    ];
    let check = |listing: &Listing, when: &str| -> anyhow::Result<()> {
        for (target, protocol, want) in &expected {
            let got = counters(listing, *target, protocol)?;
            ensure!(
                got == *want,
                "{when}: {target}/{protocol} counted {got:?}, expected {want:?}"
            );
        }
        Ok(())
    };
    check(&tb.listing()?, "after the traffic")?;
    eprintln!("lb-agent list counted every connect, datagram, refusal and affinity hit");

    // The counters live in the pinned maps: a restarted agent keeps them.
    tb.stop_agent()?;
    check(&tb.listing()?, "while the agent is stopped")?;
    tb.start_agent()?;
    check(&tb.listing()?, "after the agent restarted")?;

    // A frontend removed and added again is a new frontend: its counters start from zero.
    let syncs = tb.agent().metrics()?.syncs()?;
    tb.write_manifest("counted.yaml", &manifest(&pods, false))?;
    let syncs = tb
        .agent()
        .wait_synced(syncs, Duration::from_secs(5))?
        .syncs()?;
    tb.write_manifest("counted.yaml", &manifest(&pods, true))?;
    tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    let listing = tb.listing()?;
    for target in [refusing_tcp, refusing_udp] {
        let protocol = if target == refusing_tcp { "TCP" } else { "UDP" };
        let got = counters(&listing, target, protocol)?;
        ensure!(
            got == CountersJson::default(),
            "{target}/{protocol}, removed and added again, starts at {got:?}"
        );
    }
    let got = counters(&listing, tcp, "TCP")?;
    ensure!(
        got.connects == 40,
        "{tcp}, never removed, lost its count: {got:?}"
    );
    eprintln!("the counters survived a restart; a Service removed and added again starts at zero");
    Ok(())
}
