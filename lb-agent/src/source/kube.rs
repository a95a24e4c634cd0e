//! Services, EndpointSlices and this node's Node from the Kubernetes API.
//!
//! kube-runtime watchers do the listing, watching, re-listing after an expired resourceVersion and
//! the backoff; this module only turns their events into model changes. A (re-)list is buffered
//! until it is complete, then replaces that kind's objects in one step, so the model never sees a
//! partial view.

use std::{collections::BTreeSet, path::Path};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::Batch;
use crate::model::{Event, ServiceInput, ServiceKey, SliceInput};

/// Label of a Node's zone, used for topology hints.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A Node's zone, from its label.
pub fn node_zone(node: &Node) -> Option<String> {
    node.labels().get(ZONE_LABEL).cloned()
}

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
    let services = watch_kind(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .map(|r| Update {
        kind: Kind::Services,
        change: r.map(|e| Change::Services(Box::new(e))),
    });
    let slices = watch_kind(
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
        let node = watch_kind(Api::<Node>::all(client), config).map(|r| Update {
            kind: Kind::Node,
            change: r.map(|e| Change::Node(Box::new(e))),
        });
        streams.push(node.boxed());
    }
    futures::stream::select_all(streams).boxed()
}

/// A watcher with kube's default backoff, keeping only what the model reads.
fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config).default_backoff()
}

/// A kind's progress through its initial (or a re-)list, holding objects as the model keeps
/// them (`I`), never as the API sends them.
struct Listing<I> {
    synced: bool,
    buffer: Option<Vec<I>>,
}

impl<I> Default for Listing<I> {
    fn default() -> Self {
        Self {
            synced: false,
            buffer: None,
        }
    }
}

/// What a watch event means for the model.
enum Feed<I> {
    /// Part of a list still coming in, or an object the model cannot refer to.
    Pending,
    /// A list is complete: these are all the objects.
    Replace(Vec<I>),
    Upsert(I),
    /// Namespace and name of an object that is gone.
    Delete(String, String),
}

impl<I> Listing<I> {
    /// Turns a watch event into a model change, parsing objects as they arrive.
    fn feed<K: ResourceExt>(
        &mut self,
        event: watcher::Event<K>,
        parse: fn(&K) -> Option<I>,
    ) -> Feed<I> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                Feed::Pending
            }
            watcher::Event::InitApply(object) => {
                let buffer = self.buffer.get_or_insert_with(Vec::new);
                buffer.extend(parse(&object));
                Feed::Pending
            }
            watcher::Event::InitDone => {
                self.synced = true;
                Feed::Replace(self.buffer.take().unwrap_or_default())
            }
            watcher::Event::Apply(object) => parse(&object).map_or(Feed::Pending, Feed::Upsert),
            watcher::Event::Delete(object) => {
                Feed::Delete(object.namespace().unwrap_or_default(), object.name_any())
            }
        }
    }
}

/// Turns the watches' events into model events. A (re-)list is buffered until complete and then
/// replaces that kind's objects in one step.
pub struct KubeFeed {
    services: Listing<ServiceInput>,
    slices: Listing<SliceInput>,
    /// The node's zone label.
    node: Listing<Option<String>>,
}

impl KubeFeed {
    /// Without a node name, there is no Node to wait for.
    pub fn new(watches_node: bool) -> Self {
        Self {
            services: Listing::default(),
            slices: Listing::default(),
            node: Listing {
                synced: !watches_node,
                buffer: None,
            },
        }
    }

    /// Whether every watch has completed its initial list, so the model holds a full view.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.node.synced
    }

    /// The model event a watch event makes, if any.
    pub fn feed(&mut self, change: Change) -> Option<Event> {
        match change {
            Change::Services(event) => match self.services.feed(*event, ServiceInput::parse) {
                Feed::Replace(all) => Some(Event::ReplaceServices(all)),
                Feed::Upsert(svc) => Some(Event::UpsertService(svc)),
                Feed::Delete(namespace, name) => {
                    Some(Event::DeleteService(ServiceKey { namespace, name }))
                }
                Feed::Pending => None,
            },
            Change::EndpointSlices(event) => match self.slices.feed(*event, SliceInput::parse) {
                Feed::Replace(all) => Some(Event::ReplaceSlices(all)),
                Feed::Upsert(slice) => Some(Event::UpsertSlice(slice)),
                Feed::Delete(namespace, name) => Some(Event::DeleteSlice(namespace, name)),
                Feed::Pending => None,
            },
            Change::Node(event) => {
                // Watched by name: a list holds this node or nothing.
                let zone = match self.node.feed(*event, |node: &Node| Some(node_zone(node))) {
                    Feed::Replace(mut all) => all.pop().flatten(),
                    Feed::Upsert(zone) => zone,
                    Feed::Delete(..) => None,
                    Feed::Pending => return None,
                };
                Some(Event::NodeZone(zone))
            }
        }
    }
}

/// Follows the watches and sends their events, until the receiver is gone or the watches end.
/// Watch failures are reported here, once per failure and once on recovery.
pub async fn follow(client: Client, node_name: Option<String>, tx: mpsc::Sender<Batch>) {
    let mut updates = watch(client, node_name.as_deref());
    let mut feed = KubeFeed::new(node_name.is_some());
    let mut failing = BTreeSet::new();
    let mut synced = false;
    while let Some(update) = updates.next().await {
        let event = match update.change {
            Ok(change) => {
                if failing.remove(&update.kind) {
                    info!(kind = update.kind.as_str(), "watch recovered");
                }
                feed.feed(change)
            }
            Err(e) => {
                if failing.insert(update.kind) {
                    warn!(
                        kind = update.kind.as_str(),
                        "watch failed: {e}; retrying with backoff; the datapath keeps the last \
                         programmed state"
                    );
                } else {
                    debug!(kind = update.kind.as_str(), "watch still failing: {e}");
                }
                None
            }
        };
        let newly_synced = feed.synced() && !synced;
        synced = feed.synced();
        if event.is_none() && !newly_synced {
            continue;
        }
        let batch = Batch {
            events: event.into_iter().collect(),
            synced,
            ..Default::default()
        };
        if tx.send(batch).await.is_err() {
            return;
        }
    }
    error!("the Kubernetes watches ended unexpectedly");
}
