//! Sockets to a removed backend are ended: when a backend leaves a Service's backend set, the
//! agent destroys the sockets lb translated to it through that Service, TCP and connected UDP, so
//! their clients see an error, connect again and land on a live backend, instead of talking on to
//! a Pod that is going away. A socket connected to the Pod's IP directly is not lb's and is left
//! alone; with `--destroy-sockets=false` all of them are.
//!
//! The removed Pod keeps running, so a socket that was not ended would keep being answered by it:
//! that is what the clients here would notice.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use xtask::{
    manifests::{self, Endpoint, Port},
    testbed::{
        PodSpec, Testbed,
        probe::{Attempt, Running, now_us, v4_mapped},
    },
};

use super::{counters::counters, testbed};

const HELD_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const HELD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x90);
const LINE_PORT: u16 = 7070;
const UDP_POD_PORT: u16 = 5353;
/// How soon after the manifest write a client of a removed backend must be answered by a live one.
const MOVE_WITHIN: Duration = Duration::from_millis(1_000);
/// How long the clients are watched after a removal: the move, and a while after it.
const WATCH: Duration = Duration::from_millis(1_500);
/// Pause between a held client's exchanges.
const INTERVAL_MS: u64 = 20;

fn tcp() -> SocketAddr {
    SocketAddr::from((HELD_IP, 80))
}

fn udp() -> SocketAddr {
    SocketAddr::from((HELD_IP, 53))
}

/// Two pods answering lines on TCP and datagrams on UDP.
fn pods() -> Vec<PodSpec> {
    PodSpec::numbered("pod", 2, &[])
        .into_iter()
        .map(|p| PodSpec {
            line_ports: vec![LINE_PORT],
            udp_ports: vec![UDP_POD_PORT],
            ..p
        })
        .collect()
}

/// demo/held, dual-stack (TCP 80 → line, UDP 53 → dns), and its slices listing `pods`.
fn manifest(pods: &[PodSpec]) -> String {
    let ports = [Port::tcp("line", 80, "line"), Port::udp("dns", 53, "dns")];
    let service = manifests::dual_stack_service("demo", "held", (HELD_IP, HELD_IP6), &ports);
    let slice_ports = [("line", LINE_PORT, "TCP"), ("dns", UDP_POD_PORT, "UDP")];
    let [v4, v6] = manifests::dual_stack_slices("demo", "held", &slice_ports, pods);
    manifests::documents(&[service, v4, v6])
}

/// A client holding one socket to `target` (TCP, or connected UDP with `udp`) and exchanging on
/// it every [`INTERVAL_MS`] until stopped; returns once it was answered, with the pod that did.
fn hold(tb: &Testbed, target: SocketAddr, udp: bool) -> anyhow::Result<(Running, String)> {
    let mut args = tb.probe_args(target, 100_000);
    args.hold = true;
    args.udp = udp;
    args.interval_ms = INTERVAL_MS;
    // Longer than the test: it is stopped, and this only bounds it should the test not get there.
    args.duration_ms = Some(25_000);
    let client = tb.start_probe(&args)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(first) = client.attempts().first() {
            let pod = first
                .answer
                .clone()
                .with_context(|| format!("a held client of {target} failed at once: {first:?}"))?;
            return Ok((client, pod));
        }
        if Instant::now() >= deadline {
            client.stop()?;
            bail!("a held client of {target} made no exchange within 5 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Writes the manifest with `pods` as the backends and waits for the agent's sync; returns when
/// the write began (µs since the epoch).
fn set_backends(tb: &mut Testbed, pods: &[PodSpec]) -> anyhow::Result<u64> {
    let syncs = tb.agent().metrics()?.syncs()?;
    let written_at = tb.write_manifest_timed("held.yaml", &manifest(pods))?;
    tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    Ok(written_at)
}

/// Takes `gone` out of the backends; returns when the write began, once [`WATCH`] has passed
/// since, so that the clients' attempts cover it.
fn remove(tb: &mut Testbed, pods: &[PodSpec], gone: &PodSpec) -> anyhow::Result<u64> {
    let rest: Vec<PodSpec> = pods.iter().filter(|p| p.ip != gone.ip).cloned().collect();
    let written_at = set_backends(tb, &rest)?;
    sleep_until(written_at + WATCH.as_micros() as u64);
    Ok(written_at)
}

fn sleep_until(at_us: u64) {
    thread::sleep(Duration::from_micros(at_us.saturating_sub(now_us())));
}

/// `who` was answered by `pod` at every exchange: no error, never another pod.
fn undisturbed(attempts: &[Attempt], pod: &str, who: &str) -> anyhow::Result<()> {
    if let Some(other) = attempts.iter().find(|a| a.answer.as_deref() != Some(pod)) {
        bail!(
            "{who}, on {pod}, was disturbed: {other:?} (of {} exchanges)",
            attempts.len()
        );
    }
    Ok(())
}

/// What a client of `removed` sees once it left the backend set at `written_at`: answers from
/// `removed` until then, then an error, then answers from live pods only, the first within
/// [`MOVE_WITHIN`] of the write. Returns the error and when that first answer came (ms after the
/// write).
fn moved_off(
    attempts: &[Attempt],
    written_at: u64,
    removed: &str,
    who: &str,
) -> anyhow::Result<(String, u64)> {
    let (before, after): (Vec<&Attempt>, Vec<&Attempt>) =
        attempts.iter().partition(|a| a.at_us < written_at);
    if let Some(other) = before.iter().find(|a| a.answer.as_deref() != Some(removed)) {
        bail!("{who}, on {removed}, was disturbed before it was removed: {other:?}");
    }
    let failed = after
        .iter()
        .position(|a| a.error.is_some())
        .with_context(|| {
            format!(
                "{who}'s socket to {removed} was not ended: {} exchanges since the write, none \
                 failed, answered by {:?}",
                after.len(),
                after.last().and_then(|a| a.answer.as_deref())
            )
        })?;
    let error = after[failed].error.clone().unwrap_or_default();
    let rest = &after[failed + 1..];
    if let Some(late) = rest.iter().find(|a| a.answer.as_deref() == Some(removed)) {
        bail!("{who} was answered by {removed} after its socket ended ({error}): {late:?}");
    }
    let live = rest
        .iter()
        .find(|a| a.answer.is_some())
        .with_context(|| format!("{who} was never answered again after {error}: {rest:?}"))?;
    let after_ms = (live.at_us - written_at) / 1000;
    ensure!(
        Duration::from_millis(after_ms) <= MOVE_WITHIN,
        "{who} got {error} and was first answered by {:?} {after_ms} ms after {removed} was \
         removed",
        live.answer
    );
    Ok((error, after_ms))
}

/// Held clients of a Service (TCP and connected UDP) whose backend is removed get an error and
/// are answered by the pod that stayed within 1 s; one connected to the pod directly, and one
/// whose backend stayed, are not disturbed; `lb-agent list` counts the sockets it ended.
pub fn ended_and_reconnected() -> anyhow::Result<()> {
    let pods = pods();
    let mut tb = testbed(&pods)?;
    tb.write_manifest("held.yaml", &manifest(&pods))?;
    tb.start_agent()?;

    let (tcp_client, tcp_pod) = hold(&tb, tcp(), false)?;
    let (udp_client, udp_pod) = hold(&tb, udp(), true)?;
    // `first` is the TCP Service client's backend, the first to be removed.
    let (first, second) = if pods[0].name == tcp_pod {
        (&pods[0], &pods[1])
    } else {
        (&pods[1], &pods[0])
    };
    // Talks to the same pod as the TCP Service client, but lb did not translate it.
    let direct_target = SocketAddr::from((first.ip, LINE_PORT));
    let (direct, direct_pod) = hold(&tb, direct_target, false)?;
    ensure!(direct_pod == first.name, "{direct_target} is {direct_pod}");
    eprintln!(
        "held: TCP through the Service on {tcp_pod}, UDP on {udp_pod}, TCP to {direct_target} \
         directly"
    );

    let written_at = remove(&mut tb, &pods, first)?;
    let (error, after_ms) = moved_off(
        &tcp_client.attempts(),
        written_at,
        &first.name,
        "the TCP Service client",
    )?;
    eprintln!(
        "{} removed: the TCP Service client got {error}, and {} answered it {after_ms} ms after \
         the write",
        first.name, second.name
    );

    let udp_removed_at = if udp_pod == first.name {
        written_at
    } else {
        undisturbed(
            &udp_client.attempts(),
            &udp_pod,
            "the UDP Service client, whose backend stayed,",
        )?;
        eprintln!("the UDP Service client, on {udp_pod}, which stayed, was not disturbed");
        // Its turn: both back, then its pod out.
        set_backends(&mut tb, &pods)?;
        remove(&mut tb, &pods, second)?
    };
    let (error, after_ms) = moved_off(
        &udp_client.attempts(),
        udp_removed_at,
        &udp_pod,
        "the UDP Service client",
    )?;
    eprintln!(
        "{udp_pod} removed: the UDP Service client got {error}, and was answered again \
         {after_ms} ms after the write"
    );

    let direct = direct.stop()?;
    undisturbed(
        &direct,
        &first.name,
        "the client connected to the pod directly",
    )?;
    eprintln!(
        "the client connected to {} directly was answered by it all along ({} exchanges)",
        first.name,
        direct.len()
    );

    // Every error a Service client had was one of its sockets ended.
    let ended = [tcp_client.stop()?, udp_client.stop()?]
        .map(|attempts| attempts.iter().filter(|a| a.error.is_some()).count() as u64);
    let listing = tb.listing()?;
    for (frontend, protocol, ended) in [(tcp(), "TCP", ended[0]), (udp(), "UDP", ended[1])] {
        let counted = counters(&listing, frontend, protocol)?.sockets_destroyed;
        ensure!(
            counted >= ended,
            "{frontend}/{protocol}: lb-agent list counts {counted} sockets destroyed, but the \
             client had {ended} ended"
        );
        eprintln!("{frontend}/{protocol}: {ended} sockets ended, {counted} counted");
    }
    Ok(())
}

/// The same for TCP over IPv6, and over an IPv4-mapped address on an AF_INET6 socket (which lb
/// translates in its IPv4 maps): a held client of a removed backend is ended and moves.
pub fn ended_over_ipv6_and_ipv4_mapped() -> anyhow::Result<()> {
    let pods = pods();
    let mut tb = testbed(&pods)?;
    tb.write_manifest("held.yaml", &manifest(&pods))?;
    tb.start_agent()?;
    for (target, family) in [
        (SocketAddr::from((HELD_IP6, 80)), "IPv6"),
        (v4_mapped(tcp()), "IPv4-mapped"),
    ] {
        set_backends(&mut tb, &pods)?;
        let (client, pod) = hold(&tb, target, false)?;
        let gone = pods
            .iter()
            .find(|p| p.name == pod)
            .with_context(|| format!("{target} answered as {pod}, not a pod of the Service"))?;
        let written_at = remove(&mut tb, &pods, gone)?;
        let who = format!("the {family} TCP client of {target}");
        let (error, after_ms) = moved_off(&client.stop()?, written_at, &pod, &who)?;
        eprintln!("{pod} removed: {who} got {error} and was answered again {after_ms} ms after");
    }
    Ok(())
}

/// A backend that terminates gracefully (not ready, still serving, terminating: its Pod is
/// shutting down and drains) gets no new connects, but keeps the ones it has; once its endpoint
/// is gone, they are ended.
pub fn a_draining_backend_keeps_its_sockets_until_it_stops_serving() -> anyhow::Result<()> {
    let pods = pods();
    let mut tb = testbed(&pods)?;
    tb.write_manifest("held.yaml", &manifest(&pods))?;
    tb.start_agent()?;
    let (client, pod) = hold(&tb, tcp(), false)?;
    let (draining, other) = if pods[0].name == pod {
        (&pods[0], &pods[1])
    } else {
        (&pods[1], &pods[0])
    };
    // The pod turns terminating but still serves: a slice of its own says so.
    let terminating = Endpoint {
        ready: Some(false),
        serving: Some(true),
        terminating: Some(true),
        ..Endpoint::ready(draining.ip, &draining.name)
    };
    let slices = |draining: Option<Endpoint>| {
        let ports = [Port::tcp("line", 80, "line"), Port::udp("dns", 53, "dns")];
        let slice_ports = [("line", LINE_PORT, "TCP"), ("dns", UDP_POD_PORT, "UDP")];
        let mut endpoints = vec![Endpoint::ready(other.ip, &other.name)];
        endpoints.extend(draining);
        manifests::documents(&[
            manifests::service("demo", "held", HELD_IP, &ports),
            manifests::endpoint_slice("demo", "held-1", "held", &slice_ports, &endpoints),
        ])
    };
    let syncs = tb.agent().metrics()?.syncs()?;
    let drain_at = tb.write_manifest_timed("held.yaml", &slices(Some(terminating)))?;
    tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    // New connects go to the other pod only.
    let fresh = tb.probe(&{
        let mut args = tb.probe_args(tcp(), 5);
        args.hold = true;
        args.count = 1;
        args
    })?;
    ensure!(
        fresh
            .iter()
            .all(|a| a.answer.as_deref() == Some(other.name.as_str())),
        "a new connect while {} drains: {fresh:?}",
        draining.name
    );
    sleep_until(drain_at + WATCH.as_micros() as u64);
    let syncs = tb.agent().metrics()?.syncs()?;
    let gone_at = tb.write_manifest_timed("held.yaml", &slices(None))?;
    tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
    sleep_until(gone_at + WATCH.as_micros() as u64);
    let attempts = client.stop()?;
    let (drained, after): (Vec<Attempt>, Vec<Attempt>) =
        attempts.into_iter().partition(|a| a.at_us < gone_at);
    undisturbed(
        &drained,
        &draining.name,
        "the held client while its backend drained",
    )?;
    let (error, after_ms) = moved_off(&after, gone_at, &draining.name, "the held client")?;
    eprintln!(
        "{} drained for {} exchanges without an error; once its endpoint went, the client got \
         {error} and {} answered it {after_ms} ms after",
        draining.name,
        drained.iter().filter(|a| a.at_us >= drain_at).count(),
        other.name
    );
    Ok(())
}

/// With `--destroy-sockets=false`, a held TCP client of a removed backend keeps talking to it,
/// without an error, while new connects go to the backend that stayed.
pub fn kept_when_disabled() -> anyhow::Result<()> {
    let pods = pods();
    let mut tb = testbed(&pods)?;
    tb.agent_flags(&["--destroy-sockets=false"]);
    tb.write_manifest("held.yaml", &manifest(&pods))?;
    tb.start_agent()?;

    let (client, pod) = hold(&tb, tcp(), false)?;
    let rest: Vec<PodSpec> = pods.iter().filter(|p| p.name != pod).cloned().collect();
    set_backends(&mut tb, &rest)?;
    let synced_at = now_us();

    // The removal is in the maps: a new socket goes to the pod that stayed.
    let mut fresh = tb.probe_args(tcp(), 1);
    fresh.hold = true;
    let fresh = tb.probe(&fresh)?;
    ensure!(
        fresh.len() == 1 && fresh[0].answer.as_deref() == Some(rest[0].name.as_str()),
        "a new connect after {pod} was removed: {fresh:?}"
    );

    let kept_for = Duration::from_secs(2);
    sleep_until(synced_at + kept_for.as_micros() as u64 + 100_000);
    let attempts = client.stop()?;
    undisturbed(&attempts, &pod, "the held TCP Service client")?;
    let last = attempts.last().map_or(0, |a| a.at_us);
    ensure!(
        last >= synced_at + kept_for.as_micros() as u64,
        "the held client stopped {} ms after the sync",
        last.saturating_sub(synced_at) / 1000
    );
    let destroyed = counters(&tb.listing()?, tcp(), "TCP")?.sockets_destroyed;
    ensure!(destroyed == 0, "{destroyed} sockets destroyed");
    eprintln!(
        "{pod} removed with --destroy-sockets=false: the held client was answered by it for \
         {} exchanges, none failed",
        attempts.len()
    );
    Ok(())
}
