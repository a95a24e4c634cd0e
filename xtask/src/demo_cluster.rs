//! `cargo xtask demo --cluster`: the same exercise the real way, with `kubectl` on a real control
//! plane (etcd, kube-apiserver, kube-controller-manager on loopback) and the testbed's own node
//! running the Pods as network namespaces: `kubectl apply` of a Deployment of 3 nginx Pods and
//! its Service, `kubectl get endpoints`, wget by ClusterIP and by name, `kubectl scale` to 5 and
//! to 2, `kubectl delete`. Each command is printed as a user types it, with what it returned.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context as _, bail};
use xtask::testbed::{
    Resolv,
    cluster::{ClusterBed, names},
    control_plane::{ControlPlane, K8sBinaries},
};

/// The manifest applied, as a user has it.
const MANIFEST: &str = "deploy/examples/seed/web.yaml";

fn step(text: &str) {
    eprintln!("\n==> {text}");
}

/// Prints `$ kubectl ARGS` and what it printed.
fn show(command: &str, output: &str) {
    eprintln!("    $ {command}");
    for line in output.lines() {
        eprintln!("    {line}");
    }
}

/// `probe_bin` is an xtask executable (the testbed runs its probe and exec subcommands).
pub fn run(agent_bin: &Path, probe_bin: &Path) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = std::fs::read_to_string(root.join(MANIFEST))
        .with_context(|| format!("reading {MANIFEST}"))?;

    step(
        "starting a control plane on loopback: etcd, kube-apiserver and kube-controller-manager v1.26",
    );
    let binaries =
        K8sBinaries::locate().context("demo --cluster needs the control plane's binaries")?;
    let control_plane = ControlPlane::start(&binaries)?;

    step(
        "starting the testbed's node (it binds Pods and runs each as a network namespace, nginx for \
         an nginx image) and lb-agent, following the API server as that node",
    );
    let mut bed = ClusterBed::start(&control_plane, agent_bin, probe_bin, "demo", &["a"])?;
    eprintln!(
        "    namespace {} (kubectl -n {0} below); the client namespace {} has no default route, \
         and 10.96.0.0/12 is unreachable there: only lb's rewrite can take a connect to a \
         ClusterIP anywhere",
        bed.namespace,
        bed.tb.client_netns()
    );
    step("deploying web: 3 replicas of nginx and a ClusterIP Service");
    show(
        &format!("kubectl apply -f {MANIFEST}"),
        &bed.apply(&control_plane, &manifest)?,
    );
    let pods = bed
        .nodes
        .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
    kubectl(&bed, &control_plane, &["get", "pods", "-o", "wide"])?;
    kubectl(&bed, &control_plane, &["get", "service", "web"])?;
    kubectl(&bed, &control_plane, &["get", "endpoints", "web"])?;
    let ip = bed.cluster_ip(&control_plane, "web")?;
    let web = SocketAddr::from((ip, 80));
    bed.wait_answered_by(web, &names(&pods))?;

    step("kube-dns: a DNS pod (Debian's dnsmasq) behind a kube-dns Service, answering for web");
    let dns = bed.add_kube_dns(&control_plane, &[("web", ip)])?;
    let resolv = Resolv::pod(&bed.namespace, &[dns.into()]);
    eprintln!("    the client's /etc/resolv.conf, as kubelet writes it:");
    for line in resolv.render().lines() {
        eprintln!("        {line}");
    }

    step("wget by ClusterIP and by name from the client, 6 times each");
    let url = format!("http://{ip}/");
    for target in [url.as_str(), "http://web/"] {
        for _ in 0..6 {
            eprintln!(
                "    $ wget -qO- {target}    -> {}",
                wget(&bed, &resolv, target)?
            );
        }
    }

    for replicas in [5, 2] {
        step(&format!("scaling web to {replicas}"));
        kubectl(
            &bed,
            &control_plane,
            &[
                "scale",
                "deployment",
                "web",
                &format!("--replicas={replicas}"),
            ],
        )?;
        let pods =
            bed.nodes
                .wait_ready(&bed.namespace, "web-", replicas, Duration::from_secs(30))?;
        bed.wait_answered_by(web, &names(&pods))?;
        kubectl(&bed, &control_plane, &["get", "endpoints", "web"])?;
        tally(&bed, web, 20)?;
    }

    step("lb-agent list (reads the pinned maps)");
    for line in bed.tb.agent_command(&["list"])?.lines() {
        eprintln!("    {line}");
    }

    step("deleting web");
    show(
        &format!("kubectl delete -f {MANIFEST}"),
        &bed.delete(&control_plane, &manifest)?,
    );
    bed.wait_all_fail(web, "EHOSTUNREACH")?;
    match wget(&bed, &resolv, &url) {
        Ok(body) => bail!("{url} still answered after the delete: {body}"),
        Err(e) => eprintln!("    $ wget -qO- {url}    -> {}", format!("{e:#}").trim()),
    }
    eprintln!(
        "    {ip} is no longer a Service: nothing rewrites the connect, and the client's \
         unreachable route refuses it"
    );

    step("stopping the agent, the node, the control plane, and removing the namespaces");
    drop(bed);
    drop(control_plane);
    eprintln!("    done");
    Ok(())
}

/// Runs `kubectl -n NAMESPACE ARGS`, showing it and what it printed.
fn kubectl(bed: &ClusterBed, control_plane: &ControlPlane, args: &[&str]) -> anyhow::Result<()> {
    show(
        &format!("kubectl {}", args.join(" ")),
        &bed.kubectl(control_plane, args)?,
    );
    Ok(())
}

/// Fetches `url` with busybox wget in the client; the body.
fn wget(bed: &ClusterBed, resolv: &Resolv, url: &str) -> anyhow::Result<String> {
    let out = bed.tb.client_command(
        resolv,
        "busybox",
        &["wget", "-qO-", url],
        Duration::from_secs(10),
    )?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        bail!(
            "wget {url} failed: {body}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(body)
}

/// Connects `count` times and shows how many each Pod answered.
fn tally(bed: &ClusterBed, target: SocketAddr, count: u32) -> anyhow::Result<()> {
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for attempt in bed.connect(target, count)? {
        match (attempt.answer, attempt.error) {
            (Some(pod), _) => *answers.entry(pod).or_default() += 1,
            (None, error) => bail!("a connect to {target} failed: {error:?}"),
        }
    }
    let summary: Vec<String> = answers
        .iter()
        .map(|(pod, n)| format!("{pod}: {n}"))
        .collect();
    eprintln!("    {count} connects to {target}: {}", summary.join(", "));
    Ok(())
}
