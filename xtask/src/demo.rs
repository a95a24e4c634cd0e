//! `cargo xtask demo`: the exercise a Kubernetes user runs when learning Services, on one machine
//! with no cluster. A web Deployment of 3 behind a ClusterIP, fetched through it; scaled to 5 and
//! to 2 by rewriting its EndpointSlice; a Service without endpoints; `lb-agent list`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use serde_yaml::Value;
use xtask::testbed::{PodSpec, Testbed, agent::SYNCED, probe::Attempt};

const EXAMPLE: &str = "web.yaml";
const WEB: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 10), 80);
const CACHE: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 20), 6379);
const POD_PORT: u16 = 8080;

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

pub fn run(agent_bin: &Path) -> anyhow::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let example = std::fs::read_to_string(examples.join(EXAMPLE))
        .with_context(|| format!("reading {}", examples.join(EXAMPLE).display()))?;

    step(
        "creating 5 pods (web-1..web-5 at 10.244.1.1-5, HTTP on :8080) in their own network namespaces, and a client namespace in its own cgroup",
    );
    let pods = PodSpec::numbered("web", 5, &[POD_PORT]);
    let mut tb = Testbed::new(agent_bin, &std::env::current_exe()?, &pods)?;
    tb.echo_agent_log("    agent | ");
    eprintln!(
        "    client namespace {} has no default route, and 10.96.0.0/12 is unreachable there:\n    \
         only lb's rewrite can take a connect to a ClusterIP anywhere",
        tb.client_netns()
    );

    step(
        "starting lb-agent on deploy/examples: Service demo/web (10.96.0.10:80) with 3 ready endpoints, demo/cache (10.96.0.20:6379) with none",
    );
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            tb.write_manifest(name, &std::fs::read_to_string(&path)?)?;
        }
    }
    tb.start_agent()?;

    fetch(&tb, 10)?;

    for replicas in [5, 2] {
        step(&format!(
            "scaling demo/web to {replicas}: rewriting its EndpointSlice in {EXAMPLE}"
        ));
        let mark = tb.agent().mark();
        let written = Instant::now();
        tb.write_manifest(EXAMPLE, &scale(&example, replicas)?)?;
        tb.agent().wait_for(SYNCED, mark, Duration::from_secs(5))?;
        eprintln!(
            "    the agent applied it {} ms after the file write",
            written.elapsed().as_millis()
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
    let services = tb.pin_dir().join("LB4_SERVICES");
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

fn one(tb: &Testbed, target: (Ipv4Addr, u16)) -> anyhow::Result<Attempt> {
    tb.probe(&tb.probe_args(SocketAddr::from(target), 1))?
        .pop()
        .context("the probe made no attempt")
}

/// The example manifest with its EndpointSlice listing pods web-1..web-`replicas`.
fn scale(example: &str, replicas: u8) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut found = false;
    for document in serde_yaml::Deserializer::from_str(example) {
        let mut doc = Value::deserialize(document)?;
        if doc.get("kind").and_then(Value::as_str) == Some("EndpointSlice") {
            found = true;
            let endpoints: Vec<Value> = (1..=replicas)
                .map(|i| {
                    serde_yaml::from_str(&format!(
                        "{{addresses: [10.244.1.{i}], conditions: {{ready: true}}, \
                         targetRef: {{kind: Pod, namespace: demo, name: web-{i}}}}}"
                    ))
                })
                .collect::<Result<_, _>>()?;
            doc["endpoints"] = Value::Sequence(endpoints);
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc)?);
    }
    if !found {
        bail!("{EXAMPLE} has no EndpointSlice to scale");
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
