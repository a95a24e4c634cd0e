//! End-to-end tests: lb-agent with its eBPF program on veth namespaces, driven by manifest files,
//! checked by what a client process sees. Root only (they fail, not skip, without it); run them
//! with `xtask/run test`.
//!
//! Every test builds its own testbed (namespaces, cgroup, BPF filesystem, agent) and removes it;
//! traffic never leaves the namespaces (see xtask::testbed).
//!
//! A test is a function listed in `main`; one that is written but not listed would never run, so
//! unused code is an error here.
#![deny(dead_code)]

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use lb_agent::dataplane::{
    MapStore as _,
    bpf::BpfMaps,
    plan::{FrontendKey, Write},
    reconcile::FIRST_BACKOFF,
};
use lb_common::{Frontend4Key, ServiceEntry, protocol};
use libtest_mimic::{Arguments, Trial};
use serde_json::{Value, json};
use xtask::{
    manifests::{self, Endpoint, Port},
    testbed::{
        PodSpec, Testbed,
        agent::{self, http_status},
        fake_api::{ENDPOINT_SLICES, FakeApi, NODES, SERVICES},
        probe::{Attempt, now_us},
    },
};

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const HTTP: u16 = 8080;

fn web() -> SocketAddr {
    SocketAddr::from((WEB_IP, 80))
}

// Beside this file rather than in tests/, where cargo would take them for test targets.
#[path = "e2e/affinity.rs"]
mod affinity;
#[path = "e2e/bad_input.rs"]
mod bad_input;
#[path = "e2e/counters.rs"]
mod counters;
#[path = "e2e/dns.rs"]
mod dns;
#[path = "e2e/metrics.rs"]
mod metrics;
#[path = "e2e/security.rs"]
mod security;
#[path = "e2e/sockets.rs"]
mod sockets;
#[path = "e2e/termination.rs"]
mod termination;
#[path = "e2e/upgrade.rs"]
mod upgrade;

type E2eTest = fn() -> anyhow::Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    // Each test has its own testbed; one at a time keeps timings honest on 2 cores.
    args.test_threads = Some(1);
    let tests: Vec<(&str, E2eTest)> = vec![
        ("connects_spread_over_all_ready_backends", spread),
        (
            "added_endpoints_get_traffic_within_1s_of_the_file_write",
            scale_up,
        ),
        (
            "removed_endpoints_get_no_traffic_once_the_change_is_applied",
            scale_down,
        ),
        (
            "service_without_endpoints_refuses_connects_within_10ms",
            no_endpoints,
        ),
        (
            "other_destinations_and_processes_outside_the_cgroup_are_untouched",
            untouched,
        ),
        (
            "connected_udp_socket_reaches_a_backend_and_gets_its_reply",
            udp,
        ),
        (
            "named_target_ports_may_differ_between_slices",
            named_target_ports,
        ),
        ("connects_keep_working_while_the_agent_restarts", restart),
        (
            "bad_manifests_are_reported_and_disturb_no_other_service",
            bad_input,
        ),
        (
            "list_shows_the_maps_and_reset_removes_the_datapath",
            list_and_reset,
        ),
        (
            "unconnected_udp_replies_come_from_the_cluster_ip_and_each_socket_keeps_its_backend",
            sockets::unconnected_udp,
        ),
        (
            "unconnected_udp_sockets_stay_on_a_backend_that_moves_slot_and_leave_a_removed_one",
            sockets::udp_backend_changes,
        ),
        (
            "unconnected_udp_sockets_keep_backend_and_reply_source_across_an_agent_restart",
            sockets::udp_across_agent_restart,
        ),
        (
            "per_socket_maps_evict_and_never_block_a_send_or_connect",
            sockets::socket_maps_never_fill,
        ),
        (
            "udp_to_a_service_without_endpoints_is_refused_and_other_datagrams_are_untouched",
            sockets::udp_refused_and_untouched,
        ),
        (
            "getpeername_shows_the_cluster_ip_for_tcp_and_udp_on_both_families",
            sockets::getpeername,
        ),
        (
            "ipv6_ipv4_mapped_and_dual_stack_clusterips_reach_their_own_family",
            sockets::ipv6_and_dual_stack,
        ),
        (
            "names_resolve_through_kube_dns_with_glibc_musl_and_raw_udp_over_both_families",
            dns::resolvers,
        ),
        (
            "a_service_is_fetched_by_its_short_name_as_in_a_pod",
            dns::fetch_by_name,
        ),
        (
            "kube_source_follows_the_real_wire_format_and_relists_after_410",
            kube_wire_format,
        ),
        (
            "kube_api_outage_keeps_traffic_flowing_and_converges_after",
            kube_outage,
        ),
        (
            "kube_restart_waits_for_both_lists_and_keeps_connects_working",
            kube_restart,
        ),
        (
            "map_entries_deleted_behind_the_agents_back_are_repaired_within_the_resync_interval",
            drift_repair,
        ),
        (
            "an_unreadable_manifest_keeps_readyz_at_503_and_nothing_programmed_until_it_reads",
            unreadable_manifest,
        ),
        (
            "a_failed_write_is_retried_on_its_timer_and_serves_within_a_backoff_of_the_space_freeing",
            failed_write_retried,
        ),
        (
            "bad_input_corpus_all_at_once_through_both_sources_names_each_error_and_moves_no_other_frontend",
            bad_input::corpus,
        ),
        (
            "session_affinity_keeps_each_client_on_its_backend_until_it_leaves_or_the_timeout_passes",
            affinity::client_ip,
        ),
        (
            "per_frontend_counters_count_each_connect_datagram_refusal_and_affinity_hit_and_survive_a_restart",
            counters::per_frontend,
        ),
        (
            "sockets_through_a_service_to_a_removed_backend_are_ended_within_1s_and_reconnect_to_a_live_one",
            termination::ended_and_reconnected,
        ),
        (
            "sockets_to_a_removed_backend_are_ended_over_ipv6_and_ipv4_mapped_addresses_too",
            termination::ended_over_ipv6_and_ipv4_mapped,
        ),
        (
            "a_draining_backend_keeps_its_sockets_until_it_stops_serving_then_they_are_ended",
            termination::a_draining_backend_keeps_its_sockets_until_it_stops_serving,
        ),
        (
            "with_destroy_sockets_false_sockets_to_a_removed_backend_keep_talking_to_it",
            termination::kept_when_disabled,
        ),
        (
            "metrics_show_what_the_maps_hold_how_long_a_change_took_and_each_repair",
            metrics::scraped,
        ),
        (
            "pins_are_root_s_alone_and_the_agent_listens_on_its_health_address_only",
            security::pins_private_and_one_listening_socket,
        ),
        (
            "upgrade_from_an_agent_before_versioned_layouts_fails_no_connect",
            upgrade::from_before_versioned_layouts,
        ),
        (
            "upgrade_from_the_previous_layout_and_rollback_fail_no_connect",
            upgrade::from_the_previous_layout_and_back,
        ),
        (
            "upgrade_and_rollback_across_a_map_layout_change_fail_no_connect",
            upgrade::across_a_layout_change_and_back,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| Trial::test(name, move || test().map_err(|e| format!("{e:#}").into())))
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

fn testbed(pods: &[PodSpec]) -> anyhow::Result<Testbed> {
    Testbed::new(
        &agent::default_bin(),
        Path::new(env!("CARGO_BIN_EXE_xtask")),
        pods,
    )
}

/// The `web` Service (port 80 → named targetPort `http`) and one slice with `pods` on 8080.
fn web_manifest(pods: &[PodSpec]) -> String {
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(p.ip, &p.name))
        .collect();
    manifests::documents(&[
        manifests::service("demo", "web", WEB_IP, &[Port::tcp("http", 80, "http")]),
        manifests::endpoint_slice(
            "demo",
            "web-abc12",
            "web",
            &[("http", HTTP, "TCP")],
            &endpoints,
        ),
    ])
}

/// Starts connecting to `web` every `interval_ms` for `duration_ms`, in the background.
fn probe_web_for(
    tb: &Testbed,
    duration_ms: u64,
    interval_ms: u64,
) -> anyhow::Result<xtask::testbed::probe::Running> {
    let mut args = tb.probe_args(web(), 100_000);
    args.duration_ms = Some(duration_ms);
    args.interval_ms = interval_ms;
    tb.start_probe(&args)
}

/// `count` web pods, all of them in the web manifest, and the agent running on it.
fn web_testbed(count: u8) -> anyhow::Result<(Vec<PodSpec>, Testbed)> {
    let pods = PodSpec::numbered("web", count, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    tb.start_agent()?;
    Ok((pods, tb))
}

/// Whether every attempt failed with `errno` (`EHOSTUNREACH`: nothing translated it, so the
/// client namespace's unreachable route answered).
fn all_failed_with(attempts: &[Attempt], errno: &str) -> bool {
    attempts.iter().all(|a| a.error.as_deref() == Some(errno))
}

/// Answers by pod name; fails on any attempt that got no answer.
fn answers(attempts: &[Attempt]) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut counts = BTreeMap::new();
    for a in attempts {
        match (&a.answer, &a.error) {
            (Some(name), _) => *counts.entry(name.clone()).or_default() += 1,
            (None, error) => bail!(
                "a connect failed: {error:?} (of {} attempts)",
                attempts.len()
            ),
        }
    }
    Ok(counts)
}

fn spread() -> anyhow::Result<()> {
    let (_, tb) = web_testbed(3)?;

    let attempts = tb.probe(&tb.probe_args(web(), 300))?;
    ensure!(
        attempts.len() == 300,
        "the probe made {} attempts",
        attempts.len()
    );
    let counts = answers(&attempts)?;
    ensure!(counts.len() == 3, "not every backend answered: {counts:?}");
    for (pod, n) in &counts {
        let share = *n as f64 / 300.0;
        ensure!(
            (0.20..=0.47).contains(&share),
            "{pod} got {:.0}% of connects: {counts:?}",
            share * 100.0
        );
    }
    Ok(())
}

fn scale_up() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 5, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods[..3]))?;
    tb.start_agent()?;

    let probe = probe_web_for(&tb, 2_500, 2)?;
    thread::sleep(Duration::from_millis(500));
    let written_at = now_us();
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    let attempts = probe.finish()?;

    answers(&attempts).context("while the backend set grew")?;
    for new in ["web-4", "web-5"] {
        let first = attempts
            .iter()
            .find(|a| a.answer.as_deref() == Some(new))
            .with_context(|| format!("{new} never answered"))?;
        let after_ms = first.at_us.saturating_sub(written_at) as f64 / 1000.0;
        ensure!(
            first.at_us >= written_at,
            "{new} answered before it was added"
        );
        ensure!(
            after_ms <= 1000.0,
            "{new} first answered {after_ms:.0} ms after the write"
        );
        eprintln!("{new} first answered {after_ms:.0} ms after the file write");
    }
    Ok(())
}

fn scale_down() -> anyhow::Result<()> {
    let (pods, mut tb) = web_testbed(5)?;

    let before = tb.agent().metrics()?.frontend_writes()?;
    tb.write_manifest("web.yaml", &web_manifest(&pods[..2]))?;
    wait_for_web(&tb, &pods[..2], Duration::from_secs(5))?;
    // In place: the frontend was updated, never removed and added again.
    let after = tb.agent().metrics()?.frontend_writes()?;
    let written: [u64; 3] = std::array::from_fn(|i| after[i] - before[i]);
    ensure!(
        written == [0, 1, 0],
        "frontends added, updated, removed: {written:?}"
    );

    let counts = answers(&tb.probe(&tb.probe_args(web(), 200))?)?;
    ensure!(
        counts.keys().all(|pod| pod == "web-1" || pod == "web-2"),
        "a removed backend was reached after the agent applied the change: {counts:?}"
    );
    ensure!(
        counts.len() == 2,
        "both remaining backends should answer: {counts:?}"
    );
    Ok(())
}

fn no_endpoints() -> anyhow::Result<()> {
    let mut tb = testbed(&[])?;
    tb.write_manifest(
        "cache.yaml",
        &manifests::service("demo", "cache", EMPTY_IP, &[Port::tcp("redis", 6379, 6379)]),
    )?;
    tb.start_agent()?;

    let attempts = tb.probe(&tb.probe_args(SocketAddr::from((EMPTY_IP, 6379)), 20))?;
    ensure!(attempts.len() == 20);
    for a in &attempts {
        ensure!(
            a.error.as_deref() == Some("ECONNREFUSED"),
            "expected ECONNREFUSED, got {a:?}"
        );
        ensure!(a.connect_us < 10_000, "refusal took {} µs", a.connect_us);
    }
    let slowest = attempts.iter().map(|a| a.connect_us).max().unwrap_or(0);
    eprintln!("slowest refusal: {slowest} µs");
    Ok(())
}

fn untouched() -> anyhow::Result<()> {
    let (pods, tb) = web_testbed(3)?;

    // A pod IP is not a frontend: every connect goes exactly there.
    let direct = answers(&tb.probe(&tb.probe_args(SocketAddr::from((pods[1].ip, HTTP)), 30))?)?;
    ensure!(
        direct.keys().eq(["web-2"]),
        "direct connects were redirected: {direct:?}"
    );

    // The ClusterIP on a port the Service does not have: not rewritten, so the client
    // namespace's unreachable route answers.
    let other_port = tb.probe(&tb.probe_args(SocketAddr::from((WEB_IP, 81)), 5))?;
    ensure!(
        all_failed_with(&other_port, "EHOSTUNREACH"),
        "port 81 was touched: {other_port:?}"
    );

    // A process outside the cgroup: its connects to the ClusterIP are not rewritten.
    let mut outside = tb.probe_args(web(), 5);
    outside.cgroup = None;
    let outside = tb.probe(&outside)?;
    ensure!(
        all_failed_with(&outside, "EHOSTUNREACH"),
        "a process outside the cgroup was load-balanced: {outside:?}"
    );

    // And inside, the same ClusterIP:port is (the control for the two checks above).
    answers(&tb.probe(&tb.probe_args(web(), 5))?)?;
    Ok(())
}

fn udp() -> anyhow::Result<()> {
    let pods: Vec<PodSpec> = PodSpec::numbered("dns", 3, &[])
        .into_iter()
        .map(|p| PodSpec {
            udp_ports: vec![5353],
            ..p
        })
        .collect();
    let mut tb = testbed(&pods)?;
    let endpoints: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(p.ip, &p.name))
        .collect();
    tb.write_manifest(
        "dns.yaml",
        &manifests::documents(&[
            manifests::service("kube-system", "dns", DNS_IP, &[Port::udp("dns", 53, "dns")]),
            manifests::endpoint_slice(
                "kube-system",
                "dns-1",
                "dns",
                &[("dns", 5353, "UDP")],
                &endpoints,
            ),
        ]),
    )?;
    tb.start_agent()?;

    let mut args = tb.probe_args(SocketAddr::from((DNS_IP, 53)), 30);
    args.udp = true;
    let counts = answers(&tb.probe(&args)?)?;
    ensure!(counts.len() >= 2, "UDP connects did not spread: {counts:?}");
    Ok(())
}

fn named_target_ports() -> anyhow::Result<()> {
    // A rollout that moved the container port: old pods serve 8080, the new one only 9090.
    let mut pods = PodSpec::numbered("web", 3, &[HTTP]);
    pods[2].tcp_ports = vec![9090];
    let mut tb = testbed(&pods)?;
    let old: Vec<Endpoint> = pods[..2]
        .iter()
        .map(|p| Endpoint::ready(p.ip, &p.name))
        .collect();
    let new = [Endpoint::ready(pods[2].ip, &pods[2].name)];
    tb.write_manifest(
        "web.yaml",
        &manifests::documents(&[
            manifests::service("demo", "web", WEB_IP, &[Port::tcp("http", 80, "http")]),
            manifests::endpoint_slice("demo", "web-old", "web", &[("http", HTTP, "TCP")], &old),
            manifests::endpoint_slice("demo", "web-new", "web", &[("http", 9090, "TCP")], &new),
        ]),
    )?;
    tb.start_agent()?;

    let counts = answers(&tb.probe(&tb.probe_args(web(), 150))?)?;
    ensure!(
        counts.len() == 3,
        "every pod should answer on its own port: {counts:?}"
    );
    Ok(())
}

fn restart() -> anyhow::Result<()> {
    let (_, mut tb) = web_testbed(3)?;

    let probe = probe_web_for(&tb, 4_000, 5)?;
    thread::sleep(Duration::from_millis(500));
    tb.stop_agent()?;
    let stopped_at = now_us();
    thread::sleep(Duration::from_millis(1_000));
    let restarted_at = now_us();
    tb.start_agent()?;
    let attempts = probe.finish()?;

    let counts = answers(&attempts).context("across the agent's restart")?;
    ensure!(counts.len() == 3, "{counts:?}");
    let while_down = attempts
        .iter()
        .filter(|a| (stopped_at..restarted_at).contains(&a.at_us))
        .count();
    ensure!(
        while_down >= 20,
        "only {while_down} connects were made while the agent was down"
    );
    adopted_without_writes(&mut tb)?;
    eprintln!(
        "{} connects, {while_down} while the agent was down, none failed",
        attempts.len()
    );
    Ok(())
}

fn bad_input() -> anyhow::Result<()> {
    let (pods, mut tb) = web_testbed(2)?;

    // Junk YAML in a new file, and a Service with a port out of range in another.
    let mark = tb.agent().mark();
    tb.write_manifest(
        "junk.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [oops\n",
    )?;
    tb.write_manifest(
        "odd.yaml",
        &manifests::service(
            "demo",
            "odd",
            Ipv4Addr::new(10, 96, 0, 30),
            &[Port::tcp("http", 80, 80)],
        )
        .replace("port: 80\n", "port: 70000\n"),
    )?;
    // The files may be seen in one sync or two; wait until both are reported.
    tb.agent()
        .wait_for("odd.yaml", mark, Duration::from_secs(5))?;
    let junk = tb
        .agent()
        .wait_for("junk.yaml", mark, Duration::from_secs(5))?;
    ensure!(junk.contains("not valid YAML"), "{junk}");
    let odd = tb
        .agent()
        .wait_for("Service demo/odd", mark, Duration::from_secs(5))?;
    ensure!(
        odd.contains("odd.yaml") && odd.contains("spec.ports[0].port") && odd.contains("70000"),
        "{odd}"
    );

    // The web Service's own file turns bad: its previous version stays in force.
    let mark = tb.agent().mark();
    tb.write_manifest(
        "web.yaml",
        &web_manifest(&pods).replace("port: 8080", "port: http-alt"),
    )?;
    let line = tb
        .agent()
        .wait_for("EndpointSlice demo/web-abc12", mark, Duration::from_secs(5))?;
    ensure!(
        line.contains("ports[0].port") && line.contains("keeping its previous version"),
        "{line}"
    );

    ensure!(tb.agent().is_running(), "the agent stopped on bad input");
    let counts = answers(&tb.probe(&tb.probe_args(web(), 40))?)?;
    ensure!(counts.len() == 2, "web was disturbed: {counts:?}");
    Ok(())
}

fn list_and_reset() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 2, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest(
        "all.yaml",
        &format!(
            "{}{}",
            web_manifest(&pods),
            manifests::documents(&[manifests::service(
                "demo",
                "cache",
                EMPTY_IP,
                &[Port::tcp("redis", 6379, 6379)]
            )])
        ),
    )?;
    tb.start_agent()?;

    let json: serde_json::Value =
        serde_json::from_str(&tb.agent_command(&["list", "-o", "json"])?)?;
    let zero = serde_json::json!({
        "connects": 0, "refused": 0, "datagrams": 0, "affinity_hits": 0, "sockets_destroyed": 0
    });
    let expected = serde_json::json!({"layout_version": lb_common::LAYOUT_VERSION, "frontends": [
        {
            "service": {"namespace": "demo", "name": "cache", "port": "redis"},
            "frontend": {"address": "10.96.0.20", "port": 6379, "protocol": "TCP"},
            "backends": [],
            "counters": zero
        },
        {
            "service": {"namespace": "demo", "name": "web", "port": "http"},
            "frontend": {"address": "10.96.0.10", "port": 80, "protocol": "TCP"},
            "backends": [
                {"address": "10.244.1.1", "port": 8080},
                {"address": "10.244.1.2", "port": 8080}
            ],
            "counters": zero
        }
    ]});
    ensure!(json == expected, "lb-agent list -o json:\n{json:#}");
    let table = tb.agent_command(&["list"])?;
    ensure!(
        table.lines().any(|l| l.starts_with("demo/web:http")
            && l.contains("10.96.0.10:80/TCP")
            && l.contains("10.244.1.1:8080, 10.244.1.2:8080")),
        "lb-agent list:\n{table}"
    );
    ensure!(
        table.contains(&format!(
            "maps of layout version {}",
            lb_common::LAYOUT_VERSION
        )),
        "lb-agent list does not say the layout version:\n{table}"
    );

    // Stopped, the agent leaves the datapath; reset removes it, and connects are no longer
    // rewritten.
    tb.stop_agent()?;
    answers(&tb.probe(&tb.probe_args(web(), 5))?).context("with the agent stopped")?;
    tb.agent_command(&["reset"])?;
    ensure!(
        !tb.pin_dir().exists(),
        "reset left {}",
        tb.pin_dir().display()
    );
    let after = tb.probe(&tb.probe_args(web(), 3))?;
    ensure!(
        all_failed_with(&after, "EHOSTUNREACH"),
        "connects were still rewritten after reset: {after:?}"
    );
    Ok(())
}

// --- The Kubernetes API source, against a stand-in API server speaking the captured wire format.

fn fixture(file: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lb-agent/tests/fixtures/k8s-api")
        .join(file);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

fn fixture_events(file: &str) -> anyhow::Result<Vec<Value>> {
    fixture(file)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

/// The documents of a multi-document YAML text, as the JSON an API server sends.
fn objects(yaml: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    yaml_serde::Deserializer::from_str(yaml)
        .map(|doc| Ok(Value::deserialize(doc)?))
        .filter(|v: &anyhow::Result<Value>| v.as_ref().map_or(true, |v| !v.is_null()))
        .collect()
}

/// Serves `yaml`'s Services and EndpointSlices from `api`.
fn serve_objects(api: &FakeApi, yaml: &str) -> anyhow::Result<()> {
    for object in objects(yaml)? {
        match object["kind"].as_str() {
            Some("Service") => api.put(SERVICES, object),
            Some("EndpointSlice") => api.put(ENDPOINT_SLICES, object),
            other => bail!("unexpected kind {other:?}"),
        }
    }
    Ok(())
}

/// `lb-agent list -o json` (read with the agent's own schema types) as frontend → (service,
/// backends sorted; the list shows slot order).
fn listing(tb: &Testbed) -> anyhow::Result<BTreeMap<String, (String, Vec<String>)>> {
    let listing = tb.listing()?;
    let mut out = BTreeMap::new();
    for row in listing.frontends {
        let (s, f) = (&row.service, &row.frontend);
        let mut service = format!("{}/{}", s.namespace, s.name);
        if !s.port.is_empty() {
            service = format!("{service}:{}", s.port);
        }
        let mut backends: Vec<String> = row
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.address, b.port))
            .collect();
        backends.sort();
        out.insert(
            format!("{}:{}/{}", f.address, f.port, f.protocol),
            (service, backends),
        );
    }
    Ok(out)
}

fn entry(service: &str, backends: &[&str]) -> (String, Vec<String>) {
    (
        service.to_owned(),
        backends.iter().map(|b| b.to_string()).collect(),
    )
}

/// Waits until `list` shows the web frontend with exactly `pods` as its backends: the change is
/// in the maps.
fn wait_for_web(tb: &Testbed, pods: &[PodSpec], timeout: Duration) -> anyhow::Result<()> {
    let backends: Vec<String> = pods.iter().map(|p| format!("{}:{HTTP}", p.ip)).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let wanted = entry("demo/web:http", &backends);
    eventually(timeout, || {
        let now = listing(tb)?;
        Ok((now.get("10.96.0.10:80/TCP") != Some(&wanted))
            .then(|| format!("not applied: {now:#?}")))
    })
}

/// A restarted agent, now ready, adopted the pinned web frontend and wrote nothing to the maps.
fn adopted_without_writes(tb: &mut Testbed) -> anyhow::Result<()> {
    let metrics = tb.agent().metrics()?;
    let (frontends, written) = (metrics.sum("lb_frontends")?, metrics.frontend_writes()?);
    ensure!(
        frontends == 1 && written == [0, 0, 0],
        "the restart rewrote maps: {frontends} frontends, added, updated, removed {written:?}"
    );
    Ok(())
}

/// Polls `check` until it holds, or fails with its last finding.
fn eventually(
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let finding = check()?;
        match finding {
            None => return Ok(()),
            Some(f) if std::time::Instant::now() >= deadline => bail!("after {timeout:?}: {f}"),
            Some(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn kube_wire_format() -> anyhow::Result<()> {
    let api = FakeApi::start()?;
    api.load_list(
        SERVICES,
        &serde_json::from_str(&fixture("services-list.json")?)?,
    );
    api.load_list(
        ENDPOINT_SLICES,
        &serde_json::from_str(&fixture("endpointslices-list.json")?)?,
    );
    api.put(NODES, node("node-a", "zone-1"));
    let mut tb = testbed(&[])?;
    tb.use_api(&api, Some("node-a"))?;
    tb.start_agent()?;

    // The captured lists, as node-a in zone-1 sees them (IPv4 frontends: the datapath's).
    let mut expected: BTreeMap<String, (String, Vec<String>)> = [
        ("10.96.0.1:443/TCP", entry("default/kubernetes:https", &[])),
        (
            "10.96.64.87:80/TCP",
            entry("lbtest/web:http", &["10.244.0.10:8080", "10.244.0.11:8080"]),
        ),
        (
            "10.96.64.87:53/UDP",
            entry("lbtest/web:dns", &["10.244.0.10:5353", "10.244.0.11:5353"]),
        ),
        (
            "10.96.62.239:443/TCP",
            entry("shop/api:https", &["10.244.1.20:8443"]),
        ),
        (
            "10.96.19.148:8000/TCP",
            entry(
                "shop/big",
                &["10.244.3.1:8000", "10.244.3.2:8000", "10.244.3.3:8000"],
            ),
        ),
        (
            "10.96.80.156:7000/TCP",
            entry("shop/manual", &["10.250.0.7:7000"]),
        ),
        (
            "10.96.159.49:80/TCP",
            entry("shop/web:http", &["10.244.1.10:8080"]),
        ),
        (
            "10.96.159.49:9090/TCP",
            entry("shop/web:metrics", &["10.244.1.10:9090"]),
        ),
        (
            "10.96.159.49:53/UDP",
            entry("shop/web:dns", &["10.244.1.10:5353"]),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let got = listing(&tb)?;
    ensure!(got == expected, "after the initial lists:\n{got:#?}");

    // The captured watch streams: web-a1 gains 10.244.1.14 (unhinted, so hints no longer apply)
    // and 10.244.1.10 starts terminating; big-2 and manual go.
    for event in fixture_events("services-watch.jsonl")? {
        api.push_event(SERVICES, &event);
    }
    for event in fixture_events("endpointslices-watch.jsonl")? {
        api.push_event(ENDPOINT_SLICES, &event);
    }
    expected.remove("10.96.80.156:7000/TCP");
    expected.insert(
        "10.96.19.148:8000/TCP".into(),
        entry("shop/big", &["10.244.3.1:8000", "10.244.3.2:8000"]),
    );
    for (port, name) in [(8080, "http"), (9090, "metrics")] {
        let backends = [format!("10.244.1.14:{port}"), format!("10.244.2.11:{port}")];
        let proto = "TCP";
        let key = format!(
            "10.96.159.49:{}/{proto}",
            if port == 8080 { 80 } else { 9090 }
        );
        expected.insert(key, (format!("shop/web:{name}"), backends.to_vec()));
    }
    expected.insert(
        "10.96.159.49:53/UDP".into(),
        entry("shop/web:dns", &["10.244.1.14:5353", "10.244.2.11:5353"]),
    );
    eventually(Duration::from_secs(5), || {
        let got = listing(&tb)?;
        Ok((got != expected).then(|| format!("after the watch events:\n{got:#?}")))
    })?;

    // The watches drop; the server has compacted past them and answers 410 Expired, so the agent
    // must re-list, and learns that shop/big went while nobody watched.
    api.expire_next_watch(SERVICES);
    api.expire_next_watch(ENDPOINT_SLICES);
    api.remove(SERVICES, "shop", "big");
    api.drop_watches();
    expected.remove("10.96.19.148:8000/TCP");
    eventually(Duration::from_secs(10), || {
        let got = listing(&tb)?;
        Ok((got != expected).then(|| format!("after the re-list:\n{got:#?}")))
    })?;
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.starts_with(&format!("GET {SERVICES}?")) && !r.contains("watch="))
        .count();
    ensure!(
        lists >= 2,
        "the agent never re-listed Services: {:#?}",
        api.requests()
    );
    ensure!(tb.agent().is_running());
    Ok(())
}

/// Three web pods, and an API server serving the web Service and its slice to the agent.
fn kube_web_testbed() -> anyhow::Result<(Vec<PodSpec>, Testbed, FakeApi)> {
    let pods = PodSpec::numbered("web", 3, &[HTTP]);
    let mut tb = testbed(&pods)?;
    let api = FakeApi::start()?;
    serve_objects(&api, &web_manifest(&pods))?;
    tb.use_api(&api, None)?;
    tb.start_agent()?;
    Ok((pods, tb, api))
}

fn kube_outage() -> anyhow::Result<()> {
    let (pods, mut tb, api) = kube_web_testbed()?;

    let probe = probe_web_for(&tb, 2_500, 5)?;
    thread::sleep(Duration::from_millis(300));
    let mark = tb.agent().mark();
    api.set_down(true);
    tb.agent()
        .wait_for("watch failed", mark, Duration::from_secs(10))?;

    // Scaled to 2 while the agent cannot see it.
    let scaled = objects(&web_manifest(&pods[..2]))?;
    let slice = scaled
        .into_iter()
        .find(|o| o["kind"] == "EndpointSlice")
        .context("no slice")?;
    api.push_event(
        ENDPOINT_SLICES,
        &json!({"type": "MODIFIED", "object": slice}),
    );
    let during = probe.finish()?;
    answers(&during).context("while the API server was down")?;

    let mark = tb.agent().mark();
    api.set_down(false);
    tb.agent()
        .wait_for("watch recovered", mark, Duration::from_secs(40))?;
    wait_for_web(&tb, &pods[..2], Duration::from_secs(10))?;
    let counts = answers(&tb.probe(&tb.probe_args(web(), 100))?)?;
    ensure!(
        counts.keys().all(|p| p == "web-1" || p == "web-2"),
        "not converged: {counts:?}"
    );
    // Each failed watch attempt is counted, by resource.
    let metrics = tb.agent().metrics()?;
    let failures = metrics.sum("lb_watch_failures_total")?;
    ensure!(
        failures >= 2,
        "lb_watch_failures_total is {failures} after the outage: {metrics:?}"
    );
    eprintln!(
        "{} connects during the outage, none failed; {failures} failed watch attempts counted",
        during.len()
    );
    Ok(())
}

fn kube_restart() -> anyhow::Result<()> {
    let (_, mut tb, api) = kube_web_testbed()?;

    let probe = probe_web_for(&tb, 3_000, 5)?;
    thread::sleep(Duration::from_millis(300));
    tb.stop_agent()?;

    // The new agent gets Services at once but EndpointSlices only after 1.5 s: programming from
    // that partial view would leave web without backends and refuse connects.
    api.set_list_delay(ENDPOINT_SLICES, Duration::from_millis(1_500));
    tb.spawn_agent()?;
    tb.agent().wait_live(Duration::from_secs(10))?;
    ensure!(
        http_status(tb.agent().health_addr(), "/readyz")? == 503,
        "ready before the lists were complete"
    );
    tb.agent().wait_ready(Duration::from_secs(20))?;
    adopted_without_writes(&mut tb)?;

    let attempts = probe.finish()?;
    let counts = answers(&attempts).context("across the restart")?;
    ensure!(counts.len() == 3, "{counts:?}");
    Ok(())
}

/// How often the drift test's agent compares the maps with its wanted state
/// (`--resync-interval`).
const RESYNC: Duration = Duration::from_secs(2);

/// `bpftool map delete pinned PIN_DIR/MAP key hex …`.
fn bpftool_delete(tb: &Testbed, map: &str, key: &[u8]) -> anyhow::Result<()> {
    let bpftool = xtask::testbed::find_tool("bpftool").context("bpftool not found")?;
    let mut cmd = std::process::Command::new(bpftool);
    cmd.args(["map", "delete", "pinned"])
        .arg(tb.maps_dir().join(map))
        .args(["key", "hex"])
        .args(key.iter().map(|b| format!("{b:02x}")));
    let out = cmd.output().context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool map delete {map}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The web frontend's service entry, then one of its backend slots, deleted with bpftool: each is
/// back (in `list`, and for connects) within one resync interval.
fn drift_repair() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 2, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.agent_flags(&["--resync-interval", &format!("{}s", RESYNC.as_secs())]);
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    tb.start_agent()?;
    let frontend = "10.96.0.10:80/TCP";
    let backends: Vec<String> = pods.iter().map(|p| format!("{}:{HTTP}", p.ip)).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let wanted = entry("demo/web:http", &backends);
    let before = listing(&tb)?;
    ensure!(before.get(frontend) == Some(&wanted), "{before:?}");
    // Within one interval (and a margin), `list` shows the frontend as it was and connects reach
    // both pods again.
    let wait_repaired = |what: &str| -> anyhow::Result<()> {
        let deleted_at = std::time::Instant::now();
        eventually(RESYNC + Duration::from_secs(2), || {
            let now = listing(&tb)?;
            Ok((now.get(frontend) != Some(&wanted)).then(|| format!("not repaired: {now:?}")))
        })?;
        eprintln!("{what} repaired after {:?}", deleted_at.elapsed());
        let counts = answers(&tb.probe(&tb.probe_args(web(), 40))?)?;
        ensure!(counts.len() == 2, "after the {what} repair: {counts:?}");
        Ok(())
    };

    // LB4_SERVICES key: ClusterIP (network order), port (host order), protocol, padding.
    let port = 80u16.to_ne_bytes();
    bpftool_delete(
        &tb,
        "LB4_SERVICES",
        &[10, 96, 0, 10, port[0], port[1], 6, 0],
    )?;
    ensure!(
        !listing(&tb)?.contains_key(frontend),
        "the entry is still there"
    );
    wait_repaired("service entry")?;

    // Slot 1 of the (re-added) frontend: whichever service id it has now, from bpftool's dump.
    let id = service_id(&tb, [10, 96, 0, 10])?;
    let mut key = id.to_ne_bytes().to_vec();
    key.extend(1u32.to_ne_bytes());
    bpftool_delete(&tb, "LB4_BACKENDS", &key)?;
    wait_repaired("backend slot")?;
    let repaired: Vec<String> = tb
        .agent()
        .lines()
        .into_iter()
        .filter(|l| l.contains("repaired drift"))
        .collect();
    for line in &repaired {
        eprintln!("{line}");
    }
    ensure!(repaired.len() >= 2, "each repair is logged");
    let counted = tb.agent().metrics()?.sum("lb_drift_repairs_total")?;
    ensure!(
        counted >= 2,
        "lb_drift_repairs_total is {counted} after two repairs"
    );
    Ok(())
}

const API_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);

/// `LB4_SERVICES` filled behind the agent's back (as another program could): a new Service's
/// write fails. It is retried on its backoff timer alone (no new event, no periodic resync), so
/// once an entry is freed, connects reach it within one backoff; the failure and the recovery are
/// each logged once.
fn failed_write_retried() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 2, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.agent_flags(&["--resync-interval", "1h"]);
    tb.write_manifest("web.yaml", &web_manifest(&pods[..1]))?;
    tb.start_agent()?;

    // Frontends no Service has, in 10.111.0.0/16 (inside the Service CIDR, so nothing else
    // reaches them), until the map is full.
    let mut maps = BpfMaps::open_pinned(tb.pin_dir())?;
    let junk = |i: u32| {
        let [_, _, a, b] = i.to_be_bytes();
        FrontendKey::V4(Frontend4Key {
            address: [10, 111, a, b],
            port: 1,
            protocol: protocol::TCP,
            _pad: 0,
        })
    };
    let refuse = ServiceEntry::new(u32::MAX, 0, 0, 0);
    let mut filled = 0;
    loop {
        match maps.write(&Write::PutService(junk(filled), refuse)) {
            Ok(()) => filled += 1,
            Err(e) if e.to_string().contains("is full") => break,
            Err(e) => return Err(e),
        }
        ensure!(
            filled <= lb_common::MAX_SERVICES,
            "LB4_SERVICES never filled up"
        );
    }

    let api = SocketAddr::from((API_IP, 80));
    tb.write_manifest(
        "api.yaml",
        &manifests::documents(&[
            manifests::service("demo", "api", API_IP, &[Port::tcp("http", 80, "http")]),
            manifests::endpoint_slice(
                "demo",
                "api-1",
                "api",
                &[("http", HTTP, "TCP")],
                &[Endpoint::ready(pods[1].ip, &pods[1].name)],
            ),
        ]),
    )?;
    // The sync's attempt fails, and so does the first retry on the timer.
    let failing = tb
        .agent()
        .wait_metrics("two failed writes", Duration::from_secs(5), |m| {
            Ok(m.sum("lb_write_failures_total")? >= 2)
        })?;
    ensure!(failing.count("lb_frontends_failing")? == 1, "{failing:?}");

    let mut args = tb.probe_args(api, 100_000);
    args.duration_ms = Some(3_000);
    args.interval_ms = 5;
    let probe = tb.spawn_probe(&args)?;
    thread::sleep(Duration::from_millis(200));
    maps.write(&Write::DeleteService(junk(0)))?;
    let freed_at = now_us();
    let attempts = xtask::testbed::probe::collect(probe)?;
    let now = tb.agent().metrics()?;
    // Every failed attempt started before the space was freed, and the retry after the n-th
    // comes one backoff later (500 ms, doubling): so within that of the freeing.
    let failures = now.sum("lb_write_failures_total")?;
    let backoff = FIRST_BACKOFF * 2u32.pow(failures.saturating_sub(1) as u32);

    let before: Vec<&Attempt> = attempts.iter().filter(|a| a.at_us < freed_at).collect();
    ensure!(
        !before.is_empty()
            && before
                .iter()
                .all(|a| a.error.as_deref() == Some("EHOSTUNREACH")),
        "connects to the failing frontend were translated while its map was full: {before:?}"
    );
    let first = attempts
        .iter()
        .position(|a| a.answer.is_some())
        .context("the frontend was never programmed")?;
    let after_ms = attempts[first].at_us.saturating_sub(freed_at) / 1000;
    eprintln!("translated {after_ms} ms after the space was freed ({failures} failed attempts)");
    ensure!(
        Duration::from_millis(after_ms) <= backoff + Duration::from_millis(300),
        "translated {after_ms} ms after the space was freed; the retry was due within {backoff:?}"
    );
    let counts = answers(&attempts[first..]).context("once programmed")?;
    ensure!(counts.keys().eq(["web-2"]), "{counts:?}");

    // The first attempt was the sync's; every later one, the successful one included, came from
    // the retry timer.
    let retried = now.count("lb_write_retries_total")?;
    ensure!(
        retried == failures,
        "{failures} failed attempts, then one that worked: {failures} retries, but {retried} \
         came from the timer"
    );
    ensure!(now.count("lb_write_recoveries_total")? == 1, "{now:?}");
    ensure!(now.count("lb_frontends_failing")? == 0, "{now:?}");
    let lines = tb.agent().lines();
    let logged = |what: &str| {
        lines
            .iter()
            .filter(|l| l.contains(what) && l.contains("10.96.0.40:80/TCP"))
            .count()
    };
    ensure!(
        logged("not programmed") == 1 && logged("recovered") == 1,
        "the failure and the recovery are each logged once:\n{}",
        lines.join("\n")
    );
    Ok(())
}

/// The service id of the IPv4 frontend on `address`, from `bpftool map dump -j LB4_SERVICES`.
fn service_id(tb: &Testbed, address: [u8; 4]) -> anyhow::Result<u32> {
    let bpftool = xtask::testbed::find_tool("bpftool").context("bpftool not found")?;
    let out = std::process::Command::new(bpftool)
        .args(["-j", "map", "dump", "pinned"])
        .arg(tb.maps_dir().join("LB4_SERVICES"))
        .output()
        .context("running bpftool")?;
    let dump: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    for row in dump.as_array().into_iter().flatten() {
        let formatted = &row["formatted"];
        let addr: Vec<u64> = formatted["key"]["address"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        if addr == address.map(u64::from) {
            return formatted["value"]["service_id"]
                .as_u64()
                .map(|id| id as u32)
                .context("no service_id");
        }
    }
    bail!("no entry for {address:?} in {dump}")
}

/// A manifest that cannot be read (here a link to /proc/self/mem, whose first page no read can
/// get, even as root): the agent programs nothing and /readyz stays 503; once it reads, both.
fn unreadable_manifest() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 1, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    let broken = tb.manifests_dir().join("broken.yaml");
    std::os::unix::fs::symlink("/proc/self/mem", &broken)?;

    let agent = tb.spawn_agent()?;
    agent.wait_live(Duration::from_secs(10))?;
    let addr = agent.health_addr();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        ensure!(http_status(addr, "/healthz")? == 200, "/healthz");
        ensure!(
            http_status(addr, "/readyz")? == 503,
            "ready although a manifest could not be read"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let line = tb
        .agent()
        .wait_for("broken.yaml", 0, Duration::from_secs(1))?;
    ensure!(line.contains("cannot read"), "{line}");
    ensure!(listing(&tb)?.is_empty(), "programmed from a partial read");

    std::fs::remove_file(&broken)?;
    eventually(Duration::from_secs(2), || {
        Ok((http_status(addr, "/readyz")? != 200).then(|| "still not ready".to_owned()))
    })?;
    let counts = answers(&tb.probe(&tb.probe_args(web(), 10))?)?;
    ensure!(counts.len() == 1, "{counts:?}");
    Ok(())
}
