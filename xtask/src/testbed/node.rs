//! Nodes of the testbed's own on a real control plane ([`super::control_plane`]): they stand in
//! for the scheduler and kubelet, which the control plane does not have.
//!
//! [`Nodes::start`] creates the Node objects (Ready, with their zone label) and follows every Pod:
//! - a Pod without a node is bound (`pods/binding`) to the next node in turn;
//! - a Pod on one of these nodes runs as a network namespace on the testbed's switch, with an
//!   address of its node's range, serving each containerPort: Debian's nginx for an `nginx` image
//!   (answering its Pod's name), the testbed's pod server otherwise; then its status
//!   (`pods/status`) says Running, with its IP, and Ready;
//! - a Pod being deleted (`deletionTimestamp`) turns not ready at once, keeps serving for the
//!   preStop delay (as a container's preStop hook and graceful shutdown would), then stops and is
//!   deleted with grace period 0, as kubelet does.
//!
//! [`Nodes::set_ready`] is a readiness probe's outcome: the Pod's Ready condition follows it.
//!
//! Addresses: node `i` (from 0) hands out 10.244.1.(100 + 40 i) onwards, forty per node, so two or
//! three nodes fit beside the testbed's own pods (.1–.99) and client (.254). An address freed by a
//! Pod goes to the back of its node's queue, so a new Pod rarely takes the address of one that just
//! left (which the EndpointSlice controller may still list as terminating).

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::json;
use tokio::sync::mpsc;

use super::{
    attach,
    cleanup::{self, Guard, Undo},
    ip6_of,
    netns::Netns,
    pod::PodServer,
};

/// Label that says which zone a node is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Addresses each node hands out.
const ADDRESSES_PER_NODE: u8 = 40;

/// How often the nodes say again that they are Ready.
const HEARTBEAT: Duration = Duration::from_secs(20);

/// A Node to create.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub zone: Option<String>,
}

/// A Pod as it runs on a node, as tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub ready: bool,
    /// Deleted, serving until its preStop delay is over.
    pub terminating: bool,
}

/// The nodes, running in a thread of their own until dropped.
pub struct Nodes {
    commands: mpsc::UnboundedSender<Order>,
    running: Arc<Mutex<BTreeMap<(String, String), RunningPod>>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

enum Order {
    SetReady {
        namespace: String,
        name: String,
        ready: bool,
    },
    /// A terminating Pod's preStop delay is over.
    Finish {
        namespace: String,
        name: String,
    },
    Stop,
}

impl Nodes {
    /// Creates the Node objects and starts following the Pods of `namespace` (a test's own, so
    /// that the nodes of several tests never bind one another's Pods). `switch` is the testbed's
    /// switch namespace and `id` its name prefix (see [`super::Testbed::switch_netns`] and
    /// [`super::Testbed::id`]); `prestop` is how long a deleted Pod keeps serving.
    pub fn start(
        kubeconfig: &Path,
        namespace: &str,
        switch: &str,
        id: &str,
        nodes: &[NodeSpec],
        prestop: Duration,
    ) -> anyhow::Result<Self> {
        if nodes.is_empty() || nodes.len() > 3 {
            bail!("the testbed runs one to three nodes, not {}", nodes.len());
        }
        let (commands, orders) = mpsc::unbounded_channel();
        let running = Arc::new(Mutex::new(BTreeMap::new()));
        let kubelet = Kubelet {
            switch: switch.to_owned(),
            id: id.to_owned(),
            nodes: nodes.to_vec(),
            prestop,
            free: (0..nodes.len())
                .map(|i| {
                    let first = 100 + ADDRESSES_PER_NODE * i as u8;
                    (first..first + ADDRESSES_PER_NODE)
                        .map(|last| Ipv4Addr::new(10, 244, 1, last))
                        .collect()
                })
                .collect(),
            next_bind: 0,
            next_port: 0,
            pods: BTreeMap::new(),
            shared: running.clone(),
            commands: commands.clone(),
        };
        let (kubeconfig, namespace) = (kubeconfig.to_owned(), namespace.to_owned());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(kubelet.run(kubeconfig, namespace, orders, started_tx))
        });
        match started_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("starting the testbed's nodes")),
            Err(_) => match thread.join() {
                Ok(Err(e)) => return Err(e.context("starting the testbed's nodes")),
                _ => bail!("the testbed's nodes did not start within 30 s"),
            },
        }
        Ok(Self {
            commands,
            running,
            thread: Some(thread),
        })
    }

    /// The Pods running on the nodes now, by namespace and name.
    pub fn running(&self) -> Vec<RunningPod> {
        self.running.lock().unwrap().values().cloned().collect()
    }

    /// A readiness probe's outcome: the Pod's Ready condition becomes `ready`.
    pub fn set_ready(&self, namespace: &str, name: &str, ready: bool) -> anyhow::Result<()> {
        self.commands
            .send(Order::SetReady {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                ready,
            })
            .map_err(|_| anyhow::anyhow!("the testbed's nodes have stopped"))
    }

    /// Waits until `count` Pods whose name starts with `prefix` in `namespace` run and are ready
    /// and none is terminating; returns them.
    pub fn wait_ready(
        &self,
        namespace: &str,
        prefix: &str,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<RunningPod>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let pods: Vec<RunningPod> = self
                .running()
                .into_iter()
                .filter(|p| p.namespace == namespace && p.name.starts_with(prefix))
                .collect();
            if pods.len() == count && pods.iter().all(|p| p.ready && !p.terminating) {
                return Ok(pods);
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "waited {timeout:?} for {count} ready Pods {namespace}/{prefix}*; running: {:?}",
                    pods.iter()
                        .map(|p| format!(
                            "{} ready={} terminating={}",
                            p.name, p.ready, p.terminating
                        ))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        let _ = self.commands.send(Order::Stop);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(Err(e)) => {
                    eprintln!("warning: the testbed's nodes stopped with an error: {e:#}")
                }
                Err(_) => eprintln!("warning: the testbed's nodes panicked"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// What runs a Pod's containers; it stops when dropped.
enum Server {
    Pod(#[allow(dead_code)] PodServer),
    Nginx(#[allow(dead_code)] NginxServer),
}

/// One Pod running here.
struct Local {
    node: usize,
    ip: Ipv4Addr,
    ready: bool,
    terminating: bool,
    containers: Vec<(String, String)>,
    // Dropped in this order: the server, then the namespace.
    _server: Server,
    _netns: Netns,
}

struct Kubelet {
    switch: String,
    id: String,
    nodes: Vec<NodeSpec>,
    prestop: Duration,
    /// Each node's free addresses, oldest freed first.
    free: Vec<VecDeque<Ipv4Addr>>,
    next_bind: usize,
    next_port: usize,
    pods: BTreeMap<(String, String), Local>,
    shared: Arc<Mutex<BTreeMap<(String, String), RunningPod>>>,
    commands: mpsc::UnboundedSender<Order>,
}

impl Kubelet {
    async fn run(
        mut self,
        kubeconfig: PathBuf,
        namespace: String,
        mut orders: mpsc::UnboundedReceiver<Order>,
        started: std::sync::mpsc::Sender<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let client = match self.register(&kubeconfig).await {
            Ok(client) => client,
            Err(e) => {
                let _ = started.send(Err(anyhow::anyhow!("{e:#}")));
                return Err(e);
            }
        };
        let _ = started.send(Ok(()));
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let mut events =
            std::pin::pin!(watcher(pods, watcher::Config::default()).default_backoff());
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                order = orders.recv() => match order {
                    None | Some(Order::Stop) => break,
                    Some(Order::SetReady { namespace, name, ready }) => {
                        self.set_ready(&client, &namespace, &name, ready).await;
                    }
                    Some(Order::Finish { namespace, name }) => {
                        self.finish(&client, &namespace, &name).await;
                    }
                },
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                        if let Err(e) = self.pod_changed(&client, &pod).await {
                            eprintln!("testbed node: {}: {e:#}", pod_id(&pod));
                        }
                    }
                    Some(Ok(watcher::Event::Delete(pod))) => {
                        let key = key_of(&pod);
                        self.stop_local(&key);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => eprintln!("testbed node: watching Pods: {e}"),
                    None => break,
                },
                _ = heartbeat.tick() => {
                    for node in &self.nodes {
                        if let Err(e) = node_ready(&client, &node.name).await {
                            eprintln!("testbed node {}: heartbeat: {e:#}", node.name);
                        }
                    }
                }
            }
        }
        for key in self.pods.keys().cloned().collect::<Vec<_>>() {
            self.stop_local(&key);
        }
        Ok(())
    }

    /// Creates the Node objects, Ready.
    async fn register(&self, kubeconfig: &Path) -> anyhow::Result<Client> {
        let client = lb_agent::source::kube::client(Some(kubeconfig)).await?;
        let nodes: Api<Node> = Api::all(client.clone());
        for node in &self.nodes {
            let mut labels = json!({"kubernetes.io/hostname": node.name});
            if let Some(zone) = &node.zone {
                labels[ZONE_LABEL] = json!(zone);
            }
            let object: Node = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": labels},
            }))?;
            nodes
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| format!("creating Node {}", node.name))?;
            node_ready(&client, &node.name).await?;
        }
        Ok(client)
    }

    async fn pod_changed(&mut self, client: &Client, pod: &Pod) -> anyhow::Result<()> {
        let key = key_of(pod);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let ours = node
            .as_deref()
            .and_then(|n| self.nodes.iter().position(|spec| spec.name == n));
        let api: Api<Pod> = Api::namespaced(client.clone(), &key.0);
        if pod.metadata.deletion_timestamp.is_some() {
            match self.pods.get_mut(&key) {
                Some(local) if !local.terminating => {
                    // Not ready at once; serving until the preStop delay is over.
                    local.terminating = true;
                    local.ready = false;
                    let status = status(&key.1, local);
                    self.publish(&key);
                    api.patch_status(&key.1, &PatchParams::default(), &Patch::Merge(status))
                        .await?;
                    let (commands, prestop) = (self.commands.clone(), self.prestop);
                    tokio::spawn(async move {
                        tokio::time::sleep(prestop).await;
                        let _ = commands.send(Order::Finish {
                            namespace: key.0,
                            name: key.1,
                        });
                    });
                }
                Some(_) => {}
                // Never started here: nothing to stop.
                None if ours.is_some() || node.is_none() => {
                    delete_now(&api, &key.1).await?;
                }
                None => {}
            }
            return Ok(());
        }
        match (node, ours) {
            (None, _) => {
                let node = &self.nodes[self.next_bind % self.nodes.len()].name;
                self.next_bind += 1;
                let binding = json!({
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": key.1, "namespace": key.0},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                });
                api.create_subresource::<_, serde_json::Value>(
                    "binding",
                    &key.1,
                    &PostParams::default(),
                    &binding,
                )
                .await
                .with_context(|| format!("binding to node {node}"))?;
            }
            (Some(_), Some(node)) if !self.pods.contains_key(&key) => {
                let local = self.start_local(pod, node)?;
                let status = status(&key.1, &local);
                self.pods.insert(key.clone(), local);
                self.publish(&key);
                api.patch_status(&key.1, &PatchParams::default(), &Patch::Merge(status))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Starts a Pod's namespace and servers.
    fn start_local(&mut self, pod: &Pod, node: usize) -> anyhow::Result<Local> {
        let ip = self.free[node]
            .pop_front()
            .with_context(|| format!("node {} has no address left", self.nodes[node].name))?;
        let result = self.start_at(pod, node, ip);
        if result.is_err() {
            self.free[node].push_back(ip);
        }
        result
    }

    fn start_at(&mut self, pod: &Pod, node: usize, ip: Ipv4Addr) -> anyhow::Result<Local> {
        let (_, name) = key_of(pod);
        self.next_port += 1;
        let netns = Netns::create(&format!("{}-k{}", self.id, self.next_port))?;
        attach(&self.switch, &netns, &format!("vk{}", self.next_port), ip)?;
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            let number = u16::try_from(port.container_port).context("containerPort")?;
            match port.protocol.as_deref() {
                Some("UDP") => udp.push(number),
                _ => tcp.push(number),
            }
        }
        let nginx = containers.iter().any(|c| {
            let image = c.image.as_deref().unwrap_or_default();
            image == "nginx" || image.starts_with("nginx:") || image.ends_with("/nginx")
        });
        let server = if nginx {
            Server::Nginx(NginxServer::start(netns.name(), &name, &tcp)?)
        } else {
            Server::Pod(PodServer::start(netns.name(), &name, &tcp, &[], &udp, &[])?)
        };
        Ok(Local {
            node,
            ip,
            ready: true,
            terminating: false,
            containers: containers
                .iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect(),
            _server: server,
            _netns: netns,
        })
    }

    async fn set_ready(&mut self, client: &Client, namespace: &str, name: &str, ready: bool) {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(local) = self.pods.get_mut(&key) else {
            eprintln!("testbed node: no Pod {namespace}/{name} runs here");
            return;
        };
        local.ready = ready && !local.terminating;
        let status = status(name, local);
        self.publish(&key);
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
        {
            eprintln!("testbed node: {namespace}/{name}: setting Ready: {e}");
        }
    }

    /// A terminating Pod's preStop delay is over: it stops, and is deleted for good.
    async fn finish(&mut self, client: &Client, namespace: &str, name: &str) {
        self.stop_local(&(namespace.to_owned(), name.to_owned()));
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        if let Err(e) = delete_now(&api, name).await {
            eprintln!("testbed node: {namespace}/{name}: deleting: {e:#}");
        }
    }

    fn stop_local(&mut self, key: &(String, String)) {
        if let Some(local) = self.pods.remove(key) {
            self.free[local.node].push_back(local.ip);
        }
        self.shared.lock().unwrap().remove(key);
    }

    /// Shows a Pod's state to [`Nodes::running`].
    fn publish(&self, key: &(String, String)) {
        let Some(local) = self.pods.get(key) else {
            return;
        };
        self.shared.lock().unwrap().insert(
            key.clone(),
            RunningPod {
                namespace: key.0.clone(),
                name: key.1.clone(),
                node: self.nodes[local.node].name.clone(),
                ip: local.ip,
                ready: local.ready,
                terminating: local.terminating,
            },
        );
    }
}

/// A Pod's status as kubelet reports it.
fn status(name: &str, local: &Local) -> serde_json::Value {
    let now = now();
    let ready = if local.ready { "True" } else { "False" };
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastTransitionTime": now});
    let containers: Vec<serde_json::Value> = local
        .containers
        .iter()
        .map(|(container, image)| {
            json!({
                "name": container,
                "image": image,
                "imageID": "",
                "containerID": format!("testbed://{name}-{container}"),
                "ready": local.ready,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": local.ip.to_string(),
        "podIPs": [{"ip": local.ip.to_string()}, {"ip": ip6_of(local.ip).to_string()}],
        "startTime": now,
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
        "containerStatuses": containers,
    }})
}

/// Says that a Node is Ready, now.
async fn node_ready(client: &Client, name: &str) -> anyhow::Result<()> {
    let now = now();
    let status = json!({"status": {
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the lb testbed's node is ready",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
    }});
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .with_context(|| format!("setting Node {name} Ready"))?;
    Ok(())
}

/// Deletes a Pod with grace period 0, as kubelet does once its containers have stopped.
async fn delete_now(api: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Now, as the API writes times.
fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn key_of(pod: &Pod) -> (String, String) {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

fn pod_id(pod: &Pod) -> String {
    let (namespace, name) = key_of(pod);
    format!("Pod {namespace}/{name}")
}

/// Debian's nginx in a Pod's namespace, answering the Pod's name on each port (IPv4 and IPv6),
/// in a directory of its own; killed on drop.
struct NginxServer {
    child: Child,
    /// For a run interrupted before the drop.
    _kill: Guard,
    _dir: Guard,
}

impl NginxServer {
    fn start(netns: &str, name: &str, ports: &[u16]) -> anyhow::Result<Self> {
        let nginx = super::find_tool("nginx")
            .context("nginx not found: `xtask/run setup` installs Debian's nginx-light")?;
        let dir = std::env::temp_dir().join(format!("{netns}-nginx"));
        std::fs::create_dir_all(&dir)?;
        let dir_guard = cleanup::register(Undo::RemoveDir(dir.clone()));
        let servers: String = ports
            .iter()
            .map(|port| {
                format!(
                    "server {{ listen {port}; listen [::]:{port}; \
                     location / {{ default_type text/plain; return 200 \"{name}\\n\"; }} }}\n"
                )
            })
            .collect();
        let d = dir.display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 512; }}\n\
             http {{\naccess_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
             {servers}}}\n"
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config)?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(&nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let server = Self {
            _kill: cleanup::register(Undo::Kill(child.id())),
            child,
            _dir: dir_guard,
        };
        server.wait_listening(netns, ports, &dir)?;
        Ok(server)
    }

    /// Returns once nginx accepts connections on every port (bounded), or says why it stopped.
    fn wait_listening(&self, netns: &str, ports: &[u16], dir: &Path) -> anyhow::Result<()> {
        for _ in 0..100 {
            let listening = ports.iter().all(|port| {
                Command::new("ip")
                    .args(["netns", "exec", netns, "ss", "-Htln"])
                    .arg(format!("sport = :{port}"))
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty())
            });
            if listening {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        bail!(
            "nginx did not listen on {ports:?} within 2 s: {}",
            log.trim()
        )
    }
}

impl Drop for NginxServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
