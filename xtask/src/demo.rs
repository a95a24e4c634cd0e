//! `cargo xtask demo`: the exercise a Kubernetes user runs when learning Services, on one machine
//! with no cluster. A web Deployment of 3 behind a ClusterIP, fetched through it and by name
//! through the kube-dns Service (dnsmasq as the DNS pod); scaled to 5 and to 2 by rewriting its
//! EndpointSlice; a Service without endpoints; `lb-agent list`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use xtask::testbed::{
    PodSpec, Resolv, Testbed, clients,
    probe::{Attempt, now_us},
};
use yaml_serde::Value;

const EXAMPLE: &str = "web.yaml";
const WEB: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const CACHE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 20), 6379);
const POD_PORT: u16 = 8080;
/// kube-dns's ClusterIPs and its pod's address, as deploy/examples/kube-dns.yaml has them.
const DNS_IPS: [&str; 2] = ["10.96.0.53", "fd00:96::53"];
const DNS_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 53);
/// What the DNS pod answers: the demo's Services by their full names.
const RECORDS: [(&str, &str); 3] = [
    ("web.demo.svc.cluster.local", "10.96.0.10"),
    ("cache.demo.svc.cluster.local", "10.96.0.20"),
    ("kube-dns.kube-system.svc.cluster.local", "10.96.0.53"),
];

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

/// `probe_bin` is an xtask executable (the testbed runs its probe and exec subcommands).
pub fn run(agent_bin: &Path, probe_bin: &Path) -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let example = std::fs::read_to_string(examples.join(EXAMPLE))
        .with_context(|| format!("reading {}", examples.join(EXAMPLE).display()))?;

    step(
        "creating 5 pods (web-1..web-5 at 10.244.1.1-5, HTTP on :8080) in their own network namespaces, and a client namespace in its own cgroup",
    );
    let pods = PodSpec::numbered("web", 5, &[POD_PORT]);
    let mut tb = Testbed::new(agent_bin, probe_bin, &pods)?;
    tb.echo_agent_log("    agent | ");
    eprintln!(
        "    client namespace {} has no default route, and 10.96.0.0/12 is unreachable there:\n    \
         only lb's rewrite can take a connect to a ClusterIP anywhere",
        tb.client_netns()
    );

    step(
        "creating the DNS pod coredns-1 (10.244.1.53, fd00:244:1::35): dnsmasq from Debian, answering for the demo's Services",
    );
    let records: Vec<(&str, std::net::IpAddr)> = RECORDS
        .iter()
        .map(|(name, ip)| Ok((*name, ip.parse()?)))
        .collect::<anyhow::Result<_>>()?;
    let dns_pod = PodSpec::coredns(DNS_POD_IP);
    tb.add_dns_pod(&dns_pod, &records)?;

    step(
        "starting lb-agent on deploy/examples: Service demo/web (10.96.0.10:80) with 3 ready endpoints, demo/cache (10.96.0.20:6379) with none, kube-system/kube-dns (10.96.0.53 and fd00:96::53, UDP and TCP 53) in front of coredns-1",
    );
    // The files only, as the agent reads a directory (seed/ holds `demo --cluster`'s manifest).
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            tb.write_manifest(name, &std::fs::read_to_string(&path)?)?;
        }
    }
    tb.start_agent()?;

    fetch(&tb, 10)?;
    by_name(&tb)?;

    for replicas in [5, 2] {
        step(&format!(
            "scaling demo/web to {replicas}: rewriting its EndpointSlice in {EXAMPLE}"
        ));
        let syncs = tb.agent().metrics()?.syncs()?;
        let written = now_us();
        tb.write_manifest(EXAMPLE, &scale(&example, replicas)?)?;
        // Only the file write makes the agent sync: the next sync is the one that applied it.
        let synced = tb.agent().wait_synced(syncs, Duration::from_secs(5))?;
        eprintln!(
            "    the agent applied it {:.1} ms after the file write (its lb_last_sync_timestamp_seconds)",
            synced.last_sync_us()?.saturating_sub(written) as f64 / 1000.0
        );
        fetch(&tb, 10)?;
    }

    step("connecting to demo/cache, which has no endpoints (\"Service has no endpoints\")");
    let attempt = one(&tb, CACHE)?;
    match attempt.error.as_deref() {
        Some("ECONNREFUSED") => eprintln!(
            "    connect 10.96.0.20:6379 -> connection refused after {:.2} ms, as with kube-proxy's REJECT rule",
            attempt.connect_us as f64 / 1000.0
        ),
        _ => bail!("expected the connect to be refused, got {attempt:?}"),
    }

    step("lb-agent list (reads the pinned maps)");
    eprint!("{}", indent(&tb.agent_command(&["list"])?));
    let services = tb.maps_dir().join("LB4_SERVICES");
    step(&format!(
        "bpftool map dump pinned {} (the maps carry BTF: fields have names)",
        services.display()
    ));
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&services)
        .output()
        .context("running bpftool")?;
    eprint!("{}", indent(&String::from_utf8_lossy(&dump.stdout)));

    step(&format!(
        "bpftool cgroup show {} (lb's eight programs on the client's cgroup)",
        tb.cgroup().display()
    ));
    let programs = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(tb.cgroup())
        .output()
        .context("running bpftool")?;
    eprint!("{}", indent(&String::from_utf8_lossy(&programs.stdout)));

    step("stopping the agent and removing the namespaces, cgroup and pins");
    tb.stop_agent()?;
    drop(tb);
    eprintln!("    done");
    Ok(())
}

/// Fetches the web Service `count` times and shows who answered.
fn fetch(tb: &Testbed, count: u32) -> anyhow::Result<()> {
    step(&format!(
        "GET http://10.96.0.10/ {count} times from the client"
    ));
    let attempts = tb.probe(&tb.probe_args(SocketAddr::from(WEB), count))?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for a in &attempts {
        match (&a.answer, &a.error) {
            (Some(pod), _) => {
                eprintln!("    GET http://10.96.0.10/ -> {pod}");
                *tally.entry(pod.clone()).or_default() += 1;
            }
            (None, error) => bail!("a request failed: {error:?}"),
        }
    }
    let summary: Vec<String> = tally.iter().map(|(pod, n)| format!("{pod}: {n}")).collect();
    eprintln!("    answered by {}", summary.join(", "));
    Ok(())
}

/// Resolves and fetches `web` by name from the client, as the seed's `wget -qO- web` in a Pod:
/// the client's resolv.conf names kube-dns's ClusterIPs, as kubelet writes it.
fn by_name(tb: &Testbed) -> anyhow::Result<()> {
    let nameservers: Vec<std::net::IpAddr> = DNS_IPS
        .iter()
        .map(|ip| ip.parse())
        .collect::<Result<_, _>>()?;
    let resolv = Resolv::pod("demo", &nameservers);
    step(&format!(
        "resolving `web` from the client, whose /etc/resolv.conf is:\n{}",
        indent(resolv.render().trim_end())
    ));
    let musl = clients::musl_resolve()?;
    let musl = musl.to_str().context("musl client path")?;
    let timeout = Duration::from_secs(15);
    for (label, cmd, args) in [
        (
            "glibc's getaddrinfo (connected UDP)",
            "getent",
            vec!["hosts", "web"],
        ),
        (
            "musl's getaddrinfo (unconnected UDP, as in Alpine images)",
            musl,
            vec!["-4", "web"],
        ),
        (
            "dig over TCP through the Service's TCP port 53",
            "dig",
            vec!["+tcp", "+short", "web.demo.svc.cluster.local"],
        ),
    ] {
        let out = tb.client_command(&resolv, cmd, &args, timeout)?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{label}: `{cmd} {}` failed: {text}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!(
            "    {label}: {}",
            text.split_whitespace().next().unwrap_or("")
        );
    }

    step("wget -qO- http://web/ five times from the client (busybox, resolving through kube-dns)");
    for _ in 0..5 {
        let out = tb.client_command(
            &resolv,
            "busybox",
            &["wget", "-qO-", "http://web/"],
            timeout,
        )?;
        let body = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wget http://web/ failed: {body}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        eprintln!("    wget -qO- http://web/ -> {}", body.trim());
    }
    Ok(())
}

fn one(tb: &Testbed, target: (Ipv4Addr, u16)) -> anyhow::Result<Attempt> {
    tb.probe(&tb.probe_args(SocketAddr::from(target), 1))?
        .pop()
        .context("the probe made no attempt")
}

/// The example manifest with its EndpointSlice listing pods web-1..web-`replicas`.
fn scale(example: &str, replicas: u8) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut found = false;
    for document in yaml_serde::Deserializer::from_str(example) {
        let mut doc = Value::deserialize(document)?;
        if doc.get("kind").and_then(Value::as_str) == Some("EndpointSlice") {
            found = true;
            let endpoints: Vec<Value> = (1..=replicas)
                .map(|i| {
                    yaml_serde::from_str(&format!(
                        "{{addresses: [10.244.1.{i}], conditions: {{ready: true}}, \
                         targetRef: {{kind: Pod, namespace: demo, name: web-{i}}}}}"
                    ))
                })
                .collect::<Result<_, _>>()?;
            doc["endpoints"] = Value::Sequence(endpoints);
        }
        out.push_str("---\n");
        out.push_str(&yaml_serde::to_string(&doc)?);
    }
    if !found {
        bail!("{EXAMPLE} has no EndpointSlice to scale");
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
