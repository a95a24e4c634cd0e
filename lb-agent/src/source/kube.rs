//! Services, EndpointSlices and this node's Node from the Kubernetes API.
//!
//! kube-runtime watchers do the listing, watching, re-listing after an expired resourceVersion and
//! the backoff; this module only turns their events into model changes. A (re-)list is buffered
//! until it is complete, then replaces that kind's objects in one step, so the model never sees a
//! partial view.

use std::path::Path;

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt as _,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::model::{Cluster, NodeContext};

/// Label of a Node's zone, used for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A client from `--kubeconfig`, else the usual inference (`KUBECONFIG`, `~/.kube/config`,
/// in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no Kubernetes configuration: run in a cluster, set KUBECONFIG, pass --kubeconfig, or \
             use --manifests",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// Which watch an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    EndpointSlices,
    Node,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Services => "Services",
            Kind::EndpointSlices => "EndpointSlices",
            Kind::Node => "Node",
        }
    }
}

/// One watch event (boxed: the objects are large and of very different sizes).
pub enum Change {
    Services(Box<watcher::Event<Service>>),
    EndpointSlices(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
}

/// One item of the merged watch streams.
pub struct Update {
    pub kind: Kind,
    pub change: Result<Change, watcher::Error>,
}

/// All watches, merged: Services and EndpointSlices of every namespace, and this node's Node.
pub fn watch(client: Client, node_name: Option<&str>) -> BoxStream<'static, Update> {
    let services = follow(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .map(|r| Update {
        kind: Kind::Services,
        change: r.map(|e| Change::Services(Box::new(e))),
    });
    let slices = follow(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .map(|r| Update {
        kind: Kind::EndpointSlices,
        change: r.map(|e| Change::EndpointSlices(Box::new(e))),
    });
    let mut streams: Vec<BoxStream<'static, Update>> = vec![services.boxed(), slices.boxed()];
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let node = follow(Api::<Node>::all(client), config).map(|r| Update {
            kind: Kind::Node,
            change: r.map(|e| Change::Node(Box::new(e))),
        });
        streams.push(node.boxed());
    }
    futures::stream::select_all(streams).boxed()
}

/// A watcher with kube's default backoff, keeping only what the model reads.
fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Trim
        + 'static,
{
    watcher(api, config).default_backoff().modify(Trim::trim)
}

/// Drops the parts of an object the model never reads (managedFields, annotations such as
/// last-applied-configuration, a Node's status), which are most of its size.
pub trait Trim {
    fn trim(&mut self);
}

impl Trim for Service {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().clear();
        self.status = None;
    }
}

impl Trim for EndpointSlice {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().clear();
    }
}

impl Trim for Node {
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
        self.annotations_mut().clear();
        self.spec = None;
        self.status = None;
    }
}

/// A kind's progress through its initial (or a re-)list.
struct Listing<K> {
    synced: bool,
    buffer: Option<Vec<K>>,
}

impl<K> Default for Listing<K> {
    fn default() -> Self {
        Self {
            synced: false,
            buffer: None,
        }
    }
}

impl<K> Listing<K> {
    /// Feeds one event; returns the complete list when one has just finished.
    fn list_event(&mut self, event: &mut Option<watcher::Event<K>>) -> Option<Vec<K>> {
        match event.take()? {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(object) => {
                self.buffer.get_or_insert_with(Vec::new).push(object);
                None
            }
            watcher::Event::InitDone => {
                self.synced = true;
                Some(self.buffer.take().unwrap_or_default())
            }
            other => {
                *event = Some(other); // an Apply or Delete: for the caller
                None
            }
        }
    }
}

/// The model as the API server describes it.
pub struct KubeState {
    pub cluster: Cluster,
    services: Listing<Service>,
    slices: Listing<EndpointSlice>,
    node: Listing<Node>,
}

impl KubeState {
    /// `node.zone` is filled in from the Node object; without a node name, there is no Node to
    /// wait for.
    pub fn new(node: NodeContext) -> Self {
        let node_listing = Listing {
            synced: node.name.is_none(),
            buffer: None,
        };
        Self {
            cluster: Cluster::new(node),
            services: Listing::default(),
            slices: Listing::default(),
            node: node_listing,
        }
    }

    /// Whether every watch has completed its initial list, so the model holds a full view.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.node.synced
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Services(event) => {
                let mut event = Some(*event);
                if let Some(all) = self.services.list_event(&mut event) {
                    self.cluster.replace_services(all);
                }
                match event {
                    Some(watcher::Event::Apply(svc)) => self.cluster.upsert_service(svc),
                    Some(watcher::Event::Delete(svc)) => self
                        .cluster
                        .delete_service(&svc.namespace().unwrap_or_default(), &svc.name_any()),
                    _ => {}
                }
            }
            Change::EndpointSlices(event) => {
                let mut event = Some(*event);
                if let Some(all) = self.slices.list_event(&mut event) {
                    self.cluster.replace_slices(all);
                }
                match event {
                    Some(watcher::Event::Apply(slice)) => self.cluster.upsert_slice(slice),
                    Some(watcher::Event::Delete(slice)) => self
                        .cluster
                        .delete_slice(&slice.namespace().unwrap_or_default(), &slice.name_any()),
                    _ => {}
                }
            }
            Change::Node(event) => {
                let mut event = Some(*event);
                let node = match self.node.list_event(&mut event) {
                    Some(mut all) => all.pop(),
                    None => match event {
                        Some(watcher::Event::Apply(node)) => Some(node),
                        Some(watcher::Event::Delete(_)) => None,
                        _ => return,
                    },
                };
                let zone = node.and_then(|n| n.labels().get(ZONE_LABEL).cloned());
                let mut context = self.cluster.node().clone();
                context.zone = zone;
                self.cluster.set_node(context);
            }
        }
    }
}
