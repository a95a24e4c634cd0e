//! A testbed on a real control plane ([`ControlPlane`]): a namespace of its own, the testbed's own
//! nodes running that namespace's Pods ([`Nodes`]), and lb-agent following the API server as the
//! first node. What the control-plane tests and `xtask/run demo --cluster` drive with `kubectl`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    PodSpec, Testbed,
    control_plane::ControlPlane,
    node::{NodeSpec, Nodes, RunningPod},
    probe::Attempt,
};

/// How long a deleted Pod keeps serving (its preStop delay): longer than the EndpointSlice
/// controller takes to list it as terminating (it sometimes retries after about a second).
pub const PRESTOP: Duration = Duration::from_secs(3);

/// Where the DNS pod runs (the testbed's own, beside the nodes' Pods).
const DNS_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 53);

pub struct ClusterBed {
    pub namespace: String,
    /// The node the agent runs as.
    pub agent_node: String,
    pub nodes: Nodes,
    pub tb: Testbed,
}

impl ClusterBed {
    /// A namespace `<prefix>-<testbed id>`, a node per zone in `zones` (named `<id>-<zone>`), and
    /// the agent started, as the first node, and ready. `probe_bin` is an executable with the
    /// testbed's subcommands (xtask).
    pub fn start(
        control_plane: &ControlPlane,
        agent_bin: &Path,
        probe_bin: &Path,
        prefix: &str,
        zones: &[&str],
    ) -> anyhow::Result<Self> {
        let mut tb = Testbed::new(agent_bin, probe_bin, &[])?;
        let namespace = format!("{prefix}-{}", tb.id);
        control_plane.kubectl(&["create", "namespace", &namespace])?;
        let specs: Vec<NodeSpec> = zones
            .iter()
            .map(|zone| NodeSpec {
                name: format!("{}-{zone}", tb.id),
                zone: Some((*zone).into()),
            })
            .collect();
        let nodes = Nodes::start(
            control_plane.kubeconfig(),
            &namespace,
            tb.switch_netns(),
            &tb.id,
            &specs,
            PRESTOP,
        )?;
        tb.use_kubeconfig(control_plane.kubeconfig(), &specs[0].name);
        tb.start_agent()?;
        Ok(Self {
            namespace,
            agent_node: specs[0].name.clone(),
            nodes,
            tb,
        })
    }

    /// `kubectl -n NAMESPACE ARGS`.
    pub fn kubectl(&self, control_plane: &ControlPlane, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        control_plane.kubectl(&all)
    }

    /// `kubectl -n NAMESPACE apply -f -` of `manifest`.
    pub fn apply(&self, control_plane: &ControlPlane, manifest: &str) -> anyhow::Result<String> {
        control_plane.kubectl_with_input(&["-n", &self.namespace, "apply", "-f", "-"], manifest)
    }

    /// `kubectl -n NAMESPACE delete -f -` of `manifest`.
    pub fn delete(&self, control_plane: &ControlPlane, manifest: &str) -> anyhow::Result<String> {
        control_plane.kubectl_with_input(&["-n", &self.namespace, "delete", "-f", "-"], manifest)
    }

    /// A Service's ClusterIP.
    pub fn cluster_ip(
        &self,
        control_plane: &ControlPlane,
        service: &str,
    ) -> anyhow::Result<Ipv4Addr> {
        let ip = self.kubectl(
            control_plane,
            &[
                "get",
                "service",
                service,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ],
        )?;
        ip.trim()
            .parse()
            .with_context(|| format!("Service {service} has ClusterIP {ip:?}"))
    }

    /// Connects `count` times to `target` from the client.
    pub fn connect(&self, target: SocketAddr, count: u32) -> anyhow::Result<Vec<Attempt>> {
        self.tb.probe(&self.tb.probe_args(target, count))
    }

    /// Waits until 40 connects in a row to `target` are answered by exactly the pods `names`
    /// (within 10 s), and returns how long that took.
    pub fn wait_answered_by(
        &self,
        target: SocketAddr,
        names: &BTreeSet<String>,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = BTreeSet::new();
        while started.elapsed() < Duration::from_secs(10) {
            let attempts = self.connect(target, 40)?;
            last = attempts.iter().map(describe).collect();
            if last == *names {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("connects to {target} answered by {last:?} after 10 s, expected {names:?}")
    }

    /// Waits until every connect to `target` fails with `errno` (within 10 s).
    pub fn wait_all_fail(&self, target: SocketAddr, errno: &str) -> anyhow::Result<Vec<Attempt>> {
        let started = Instant::now();
        loop {
            let attempts = self.connect(target, 20)?;
            if attempts.iter().all(|a| a.error.as_deref() == Some(errno)) {
                return Ok(attempts);
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!(
                    "10 s on, connects to {target} give {:?}, not {errno}",
                    attempts.iter().map(describe).collect::<BTreeSet<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kube-dns as a cluster has it: a DNS pod (Debian's dnsmasq, the testbed's own) behind a
    /// Service `kube-dns` in this namespace, whose hand-written EndpointSlice lists it. It
    /// answers `<name>.<namespace>.svc.cluster.local` for each `(name, address)`. Returns the
    /// Service's ClusterIP, for a client's resolv.conf.
    pub fn add_kube_dns(
        &mut self,
        control_plane: &ControlPlane,
        records: &[(&str, Ipv4Addr)],
    ) -> anyhow::Result<Ipv4Addr> {
        let dns_pod = PodSpec::coredns(DNS_POD_IP);
        let names: Vec<(String, IpAddr)> = records
            .iter()
            .map(|(name, ip)| {
                (
                    format!("{name}.{}.svc.cluster.local", self.namespace),
                    IpAddr::V4(*ip),
                )
            })
            .collect();
        let names: Vec<(&str, IpAddr)> = names.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
        self.tb.add_dns_pod(&dns_pod, &names)?;
        let service = format!(
            "apiVersion: v1
kind: Service
metadata:
  name: kube-dns
spec:
  ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-1
  labels:
    kubernetes.io/service-name: kube-dns
addressType: IPv4
ports:
- {{name: dns, port: 53, protocol: UDP}}
- {{name: dns-tcp, port: 53, protocol: TCP}}
endpoints:
- addresses: [{DNS_POD_IP}]
  conditions: {{ready: true}}
"
        );
        self.apply(control_plane, &service)?;
        self.cluster_ip(control_plane, "kube-dns")
    }

    /// The agent's maps for this namespace's Services as `lb-agent list` shows them, one sorted
    /// line per frontend with its backends sorted.
    pub fn listing(&self) -> anyhow::Result<String> {
        let listing = self.tb.listing()?;
        let mut lines: Vec<String> = listing
            .frontends
            .iter()
            .filter(|row| row.service.namespace == self.namespace)
            .map(|row| {
                let mut backends: Vec<String> = row
                    .backends
                    .iter()
                    .map(|b| format!("{}:{}", b.address, b.port))
                    .collect();
                backends.sort();
                format!(
                    "{}/{} {}:{}/{} -> {}",
                    row.service.namespace,
                    row.service.name,
                    row.frontend.address,
                    row.frontend.port,
                    row.frontend.protocol,
                    backends.join(",")
                )
            })
            .collect();
        lines.sort();
        Ok(lines.join("\n"))
    }
}

/// Who answered an attempt, or its error.
pub fn describe(attempt: &Attempt) -> String {
    match (&attempt.answer, &attempt.error) {
        (Some(name), _) => name.clone(),
        (None, Some(error)) => error.clone(),
        (None, None) => "nothing".into(),
    }
}

/// The Pods' names.
pub fn names(pods: &[RunningPod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}
