//! `/metrics` as an operator's dashboard reads it: what the maps hold by family, how full they
//! are, what the programs translated (in all and per Service), how long a change took to reach
//! the maps, and the repairs the agent made, each checked against what the test did.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use anyhow::ensure;
use lb_common::{MAX_FRONTENDS, MAX_SERVICES};
use xtask::{
    manifests::{self, Port},
    testbed::{PodSpec, metrics::Metrics},
};

use super::{HTTP, bpftool_delete, testbed};

const DUAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);
const DUAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x100);
const SINGLE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 101);

/// `dual` (dual-stack, TCP 80 over `pods`) and, with `single`, `single` (IPv4, TCP 80 over
/// `pods`).
fn manifest(pods: &[PodSpec], single: bool) -> String {
    let ports = [Port::tcp("http", 80, "http")];
    let slice_ports = [("http", HTTP, "TCP")];
    let dual = manifests::dual_stack_service("demo", "dual", (DUAL_IP, DUAL_IP6), &ports);
    let [dual4, dual6] = manifests::dual_stack_slices("demo", "dual", &slice_ports, pods);
    let mut docs = vec![dual, dual4, dual6];
    if single {
        docs.push(manifests::service("demo", "single", SINGLE_IP, &ports));
        let [single4, _] = manifests::dual_stack_slices("demo", "single", &slice_ports, pods);
        docs.push(single4);
    }
    manifests::documents(&docs)
}

/// The per-Service series of `counter` for Service `name`'s `http` port.
fn per_service(counter: &str, name: &str) -> String {
    format!("lb_service_{counter}_total{{namespace=\"demo\",service=\"{name}\",port=\"http\"}}")
}

/// `series` is `want`, or an error saying what it is.
fn expect(m: &Metrics, series: &str, want: f64) -> anyhow::Result<()> {
    let got = m.get(series)?;
    ensure!(
        (got - want).abs() < 1e-12,
        "{series} is {got}, expected {want}"
    );
    Ok(())
}

pub fn scraped() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("pod", 2, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.agent_flags(&["--resync-interval", "300ms", "--metrics-per-service"]);
    tb.write_manifest("m.yaml", &manifest(&pods, true))?;
    tb.start_agent()?;

    // Two Services over IPv4, one of them over IPv6 too; two backends each.
    let m = tb.agent().metrics()?;
    for (series, want) in [
        ("lb_services{family=\"IPv4\"}", 2.0),
        ("lb_services{family=\"IPv6\"}", 1.0),
        ("lb_frontends{family=\"IPv4\"}", 2.0),
        ("lb_frontends{family=\"IPv6\"}", 1.0),
        ("lb_backends{family=\"IPv4\"}", 4.0),
        ("lb_backends{family=\"IPv6\"}", 2.0),
        (
            "lb_map_fill_ratio{map=\"LB4_SERVICES\"}",
            2.0 / f64::from(MAX_SERVICES),
        ),
        (
            "lb_map_fill_ratio{map=\"LB_SVC_NAMES\"}",
            3.0 / f64::from(MAX_FRONTENDS),
        ),
        // The cold start is not a change: nothing to time yet.
        ("lb_network_programming_duration_seconds_count", 0.0),
    ] {
        expect(&m, series, want)?;
    }

    // What the programs translated: in all, and per Service.
    for (ip, count) in [(DUAL_IP, 10), (SINGLE_IP, 5)] {
        let answered = tb.probe(&tb.probe_args(SocketAddr::from((ip, 80)), count))?;
        ensure!(answered.iter().all(|a| a.answer.is_some()), "{answered:?}");
    }
    let m = tb.agent().metrics()?;
    expect(&m, "lb_connects_translated_total", 15.0)?;
    expect(&m, &per_service("connects_translated", "dual"), 10.0)?;
    expect(&m, &per_service("connects_translated", "single"), 5.0)?;
    expect(&m, "lb_refused_total", 0.0)?;

    // A change: one pod leaves both Services. Its time from the change (as the agent saw it) to
    // the maps is counted once, and well under a second here.
    let syncs = m.syncs()?;
    tb.write_manifest("m.yaml", &manifest(&pods[..1], true))?;
    let m = tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    expect(&m, "lb_backends{family=\"IPv4\"}", 2.0)?;
    expect(&m, "lb_backends{family=\"IPv6\"}", 1.0)?;
    expect(&m, "lb_network_programming_duration_seconds_count", 1.0)?;
    let took = m.get("lb_network_programming_duration_seconds_sum")?;
    ensure!(
        took > 0.0 && took < 1.0,
        "the change took {took} s to program"
    );
    expect(
        &m,
        "lb_sync_duration_seconds_count",
        m.get("lb_syncs_total")?,
    )?;
    eprintln!(
        "a change reached the maps {:.1} ms after the agent saw it",
        took * 1e3
    );

    // A service entry deleted behind the agent's back is a frontend repair at the next resync.
    let port = 80u16.to_ne_bytes();
    let [a, b, c, d] = SINGLE_IP.octets();
    bpftool_delete(&tb, "LB4_SERVICES", &[a, b, c, d, port[0], port[1], 6, 0])?;
    let m = tb
        .agent()
        .wait_metrics("a drift repair", Duration::from_secs(3), |m| {
            Ok(m.count("lb_drift_repairs_total{what=\"frontend\"}")? >= 1)
        })?;
    expect(&m, "lb_frontends{family=\"IPv4\"}", 2.0)?;
    expect(&m, "lb_write_failures_total{reason=\"map_full\"}", 0.0)?;
    eprintln!("the deleted entry was counted as a frontend drift repair");

    // A Service that goes takes its series with it, and its count stays in the sum.
    let syncs = m.syncs()?;
    tb.write_manifest("m.yaml", &manifest(&pods[..1], false))?;
    let m = tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    expect(&m, "lb_connects_translated_total", 15.0)?;
    ensure!(
        m.get(&per_service("connects_translated", "single"))
            .is_err(),
        "single's series outlived it: {m:?}"
    );
    eprintln!("15 connects counted in all and per Service; a deleted Service's stay in the sum");
    Ok(())
}
