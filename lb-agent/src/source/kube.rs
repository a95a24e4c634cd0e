//! Services, EndpointSlices and this node's Node from the Kubernetes API.
//!
//! kube-runtime watchers do the listing, watching, re-listing after an expired resourceVersion and
//! the backoff; this module only turns their events into model changes. A (re-)list is buffered
//! until it is complete, then replaces that kind's objects in one step, so the model never sees a
//! partial view.
//!
//! Objects are received as [`Lenient`]: one that does not deserialize into its k8s-openapi type (a
//! field of the wrong type) is reported with its name and field and not used, so that it neither
//! fails the whole list or watch it came in nor takes away the version the model already has.

use std::{borrow::Cow, collections::BTreeSet, path::Path, sync::Arc, time::SystemTime};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, stream::BoxStream};
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::Batch;
use crate::{
    metrics::Metrics,
    model::{Event, ObjectRef, Problem, ServiceInput, ServiceKey, SliceInput},
};

/// The EndpointSlice controller's stamp of when the Pod or Service change that a slice's latest
/// version reflects happened (kube-proxy's network programming latency starts there too).
const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

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

/// An object as a list or watch delivers it: its k8s-openapi type, or, when it does not
/// deserialize into that type, its metadata and the problem (field and message). kube-client
/// deserializes a whole list page, or a watch event, at once: with the type itself, one malformed
/// object would fail the list (and so the initial sync, forever) or drop the event without a word
/// about which object it was.
#[derive(Clone, Debug)]
pub enum Lenient<K> {
    Typed(K),
    Malformed(Box<Malformed>),
}

/// An object that did not deserialize: what the watcher needs of its metadata (name, namespace,
/// resourceVersion), and where and why it failed.
#[derive(Clone, Debug)]
pub struct Malformed {
    pub metadata: ObjectMeta,
    /// Path of the offending field, as in `kubectl explain` (`spec.ports[0].port`).
    pub field: String,
    pub message: String,
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Through a JSON value, the one form that can be read a second time: once as `K`, and,
        // if that fails, once more for the metadata that names the object.
        let value = serde_json::Value::deserialize(deserializer)?;
        match serde_path_to_error::deserialize::<_, K>(&value) {
            Ok(object) => Ok(Self::Typed(object)),
            Err(e) => {
                let path = e.path().to_string();
                let message = e.into_inner().to_string();
                let text = |field: &str| value["metadata"][field].as_str().map(str::to_owned);
                let metadata = ObjectMeta {
                    name: text("name"),
                    namespace: text("namespace"),
                    resource_version: text("resourceVersion"),
                    uid: text("uid"),
                    ..Default::default()
                };
                let (field, message) = field_and_message(&path, message);
                Ok(Self::Malformed(Box::new(Malformed {
                    metadata,
                    field,
                    message,
                })))
            }
        }
    }
}

/// The field a deserialization error is about (`.` is the object itself), and what is wrong.
fn field_and_message(path: &str, message: String) -> (String, String) {
    match path {
        "." => ("(the object)".to_owned(), message),
        _ => (path.to_owned(), message),
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Typed(object) => object.meta(),
            Self::Malformed(m) => &m.metadata,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Self::Typed(object) => object.meta_mut(),
            Self::Malformed(m) => &mut m.metadata,
        }
    }
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
    Services(Box<watcher::Event<Lenient<Service>>>),
    EndpointSlices(Box<watcher::Event<Lenient<EndpointSlice>>>),
    Node(Box<watcher::Event<Lenient<Node>>>),
}

/// One item of the merged watch streams.
pub struct Update {
    pub kind: Kind,
    pub change: Result<Change, watcher::Error>,
}

/// All watches, merged: Services and EndpointSlices of every namespace, and this node's Node.
pub fn watch(client: Client, node_name: Option<&str>) -> BoxStream<'static, Update> {
    let services = watch_kind(
        Api::<Lenient<Service>>::all(client.clone()),
        watcher::Config::default(),
    )
    .map(|r| Update {
        kind: Kind::Services,
        change: r.map(|e| Change::Services(Box::new(e))),
    });
    let slices = watch_kind(
        Api::<Lenient<EndpointSlice>>::all(client.clone()),
        watcher::Config::default(),
    )
    .map(|r| Update {
        kind: Kind::EndpointSlices,
        change: r.map(|e| Change::EndpointSlices(Box::new(e))),
    });
    let mut streams: Vec<BoxStream<'static, Update>> = vec![services.boxed(), slices.boxed()];
    if let Some(name) = node_name {
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let node = watch_kind(Api::<Lenient<Node>>::all(client), config).map(|r| Update {
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
    /// Namespace and name of the objects of the list in progress that could not be read.
    unreadable: Vec<(String, String)>,
}

impl<I> Default for Listing<I> {
    fn default() -> Self {
        Self {
            synced: false,
            buffer: None,
            unreadable: Vec::new(),
        }
    }
}

/// What a watch event means for the model.
enum Feed<I> {
    /// Part of a list still coming in, or an object the model cannot use.
    Pending,
    /// A list is complete: these are all the objects, and (namespace, name) of those listed but
    /// unreadable, which keep the version the model has.
    Replace(Vec<I>, Vec<(String, String)>),
    Upsert(I),
    /// Namespace and name of an object that is gone.
    Delete(String, String),
}

impl<I> Listing<I> {
    /// Turns a watch event into a model change, parsing objects as they arrive. An object that
    /// does not deserialize goes to `problems` and changes nothing.
    fn feed<K: Resource<DynamicType = ()>>(
        &mut self,
        event: watcher::Event<Lenient<K>>,
        parse: fn(&K) -> Option<I>,
        problems: &mut Vec<Problem>,
    ) -> Feed<I> {
        let mut typed = |object: Lenient<K>| match object {
            Lenient::Typed(object) => Ok(object),
            Lenient::Malformed(m) => {
                let object = ObjectRef {
                    kind: kind_of::<K>(),
                    namespace: m.metadata.namespace.clone().unwrap_or_default(),
                    name: m.metadata.name.clone().unwrap_or_default(),
                };
                let id = (object.namespace.clone(), object.name.clone());
                problems.push(Problem::new(
                    object,
                    m.field,
                    format!(
                        "{}; this version is not used (the one in use before, if any, stays)",
                        m.message
                    ),
                ));
                Err(id)
            }
        };
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                self.unreadable.clear();
                Feed::Pending
            }
            watcher::Event::InitApply(object) => {
                match typed(object) {
                    Ok(object) => {
                        let buffer = self.buffer.get_or_insert_with(Vec::new);
                        buffer.extend(parse(&object));
                    }
                    Err(id) => self.unreadable.push(id),
                }
                Feed::Pending
            }
            watcher::Event::InitDone => {
                self.synced = true;
                Feed::Replace(
                    self.buffer.take().unwrap_or_default(),
                    std::mem::take(&mut self.unreadable),
                )
            }
            watcher::Event::Apply(object) => match typed(object) {
                Ok(object) => parse(&object).map_or(Feed::Pending, Feed::Upsert),
                Err(_) => Feed::Pending,
            },
            watcher::Event::Delete(object) => {
                Feed::Delete(object.namespace().unwrap_or_default(), object.name_any())
            }
        }
    }
}

/// The kind of `K`, as problems name it.
fn kind_of<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Node" => "Node",
        _ => "object",
    }
}

/// Turns the watches' events into model events. A (re-)list is buffered until complete and then
/// replaces that kind's objects in one step.
pub struct KubeFeed {
    services: Listing<ServiceInput>,
    slices: Listing<SliceInput>,
    /// The node's zone label.
    node: Listing<Option<String>>,
    /// Objects that could not be read, since the last [`take_problems`](Self::take_problems).
    problems: Vec<Problem>,
}

impl KubeFeed {
    /// Without a node name, there is no Node to wait for.
    pub fn new(watches_node: bool) -> Self {
        Self {
            services: Listing::default(),
            slices: Listing::default(),
            node: Listing {
                synced: !watches_node,
                ..Default::default()
            },
            problems: Vec::new(),
        }
    }

    /// The objects that could not be read since the last call: each names the object and field.
    pub fn take_problems(&mut self) -> Vec<Problem> {
        std::mem::take(&mut self.problems)
    }

    /// Whether every watch has completed its initial list, so the model holds a full view.
    pub fn synced(&self) -> bool {
        self.services.synced && self.slices.synced && self.node.synced
    }

    /// The model event a watch event makes, if any. Objects that cannot be read make none, and
    /// are reported through [`take_problems`](Self::take_problems).
    pub fn feed(&mut self, change: Change) -> Option<Event> {
        let problems = &mut self.problems;
        match change {
            Change::Services(event) => {
                match self.services.feed(*event, ServiceInput::parse, problems) {
                    Feed::Replace(all, unreadable) => Some(Event::ReplaceServices {
                        all,
                        unreadable: unreadable
                            .into_iter()
                            .map(|(namespace, name)| ServiceKey { namespace, name })
                            .collect(),
                    }),
                    Feed::Upsert(svc) => Some(Event::UpsertService(svc)),
                    Feed::Delete(namespace, name) => {
                        Some(Event::DeleteService(ServiceKey { namespace, name }))
                    }
                    Feed::Pending => None,
                }
            }
            Change::EndpointSlices(event) => {
                match self.slices.feed(*event, SliceInput::parse, problems) {
                    Feed::Replace(all, unreadable) => {
                        Some(Event::ReplaceSlices { all, unreadable })
                    }
                    Feed::Upsert(slice) => Some(Event::UpsertSlice(slice)),
                    Feed::Delete(namespace, name) => Some(Event::DeleteSlice(namespace, name)),
                    Feed::Pending => None,
                }
            }
            Change::Node(event) => {
                // Watched by name: a list holds this node or nothing.
                let zone =
                    match self
                        .node
                        .feed(*event, |node: &Node| Some(node_zone(node)), problems)
                    {
                        // An unreadable Node keeps the zone the model has.
                        Feed::Replace(all, unreadable)
                            if all.is_empty() && !unreadable.is_empty() =>
                        {
                            return None;
                        }
                        Feed::Replace(mut all, _) => all.pop().flatten(),
                        Feed::Upsert(zone) => zone,
                        Feed::Delete(..) => None,
                        Feed::Pending => return None,
                    };
                Some(Event::NodeZone(zone))
            }
        }
    }
}

/// When the change an event carries happened: an updated slice's trigger time (unless it is
/// from before `since`, the source's start: kube-proxy ignores those too), else now; `None` for
/// the events of a (re-)list, which carry no change of their own. A deleted slice's trigger time
/// is that of its last update, not of the deletion.
fn changed_at(change: &Change, since: SystemTime) -> Option<SystemTime> {
    fn is_change<K>(event: &watcher::Event<K>) -> bool {
        matches!(event, watcher::Event::Apply(_) | watcher::Event::Delete(_))
    }
    let now = SystemTime::now();
    let trigger = match change {
        Change::EndpointSlices(event) => match &**event {
            watcher::Event::Apply(slice) => slice
                .meta()
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .filter(|t| *t >= since),
            watcher::Event::Delete(_) => None,
            _ => return None,
        },
        Change::Services(event) if is_change(event) => None,
        Change::Node(event) if is_change(event) => None,
        _ => return None,
    };
    // A trigger time ahead of this node's clock would make a negative latency.
    Some(trigger.map_or(now, |t| t.min(now)))
}

/// Follows the watches and sends their events, until the receiver is gone or the watches end.
/// Watch failures are reported here, once per failure and once on recovery, and counted in
/// `metrics` at every attempt.
pub async fn follow(
    client: Client,
    node_name: Option<String>,
    tx: mpsc::Sender<Batch>,
    metrics: Arc<Metrics>,
) {
    let started = SystemTime::now();
    let mut updates = watch(client, node_name.as_deref());
    let mut feed = KubeFeed::new(node_name.is_some());
    let mut failing = BTreeSet::new();
    let mut synced = false;
    while let Some(update) = updates.next().await {
        let changed = update
            .change
            .as_ref()
            .ok()
            .and_then(|c| changed_at(c, started));
        let event = match update.change {
            Ok(change) => {
                if failing.remove(&update.kind) {
                    info!(kind = update.kind.as_str(), "watch recovered");
                }
                let event = feed.feed(change);
                for problem in feed.take_problems() {
                    warn!("{problem}");
                }
                event
            }
            Err(e) => {
                metrics.watch_failed(update.kind.as_str());
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
            changed_at: changed.filter(|_| event.is_some()),
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

#[cfg(test)]
mod tests {
    use kube::core::{ObjectList, WatchEvent};
    use serde_json::json;

    use super::*;
    use crate::model::{Cluster, NodeContext};

    fn service(name: &str, port: serde_json::Value) -> serde_json::Value {
        json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "7"},
            "spec": {"clusterIP": format!("10.96.0.{}", name.len()), "ports": [{"port": port}]},
        })
    }

    /// A list page as kube-client reads it: one malformed item among good ones.
    fn list(items: Vec<serde_json::Value>) -> Vec<Lenient<Service>> {
        let text = json!({"metadata": {"resourceVersion": "9"}, "items": items}).to_string();
        serde_json::from_str::<ObjectList<Lenient<Service>>>(&text)
            .expect("one malformed item must not fail the list")
            .items
    }

    fn relist(feed: &mut KubeFeed, items: Vec<Lenient<Service>>) -> Option<Event> {
        feed.feed(Change::Services(Box::new(watcher::Event::Init)));
        for item in items {
            feed.feed(Change::Services(Box::new(watcher::Event::InitApply(item))));
        }
        feed.feed(Change::Services(Box::new(watcher::Event::InitDone)))
    }

    fn ports(cluster: &Cluster) -> Vec<String> {
        let state = cluster.state();
        state.frontends.keys().map(ToString::to_string).collect()
    }

    #[test]
    fn a_malformed_object_is_named_with_its_field_and_takes_nothing_away() {
        let mut feed = KubeFeed::new(false);
        let mut cluster = Cluster::new(NodeContext::default());
        let first = relist(
            &mut feed,
            list(vec![service("a", json!(80)), service("web", json!(80))]),
        );
        cluster.apply(first.unwrap());
        cluster.sync();
        assert_eq!(ports(&cluster), ["10.96.0.1:80/TCP", "10.96.0.3:80/TCP"]);

        // web turns malformed in a watch event: reported by name and field, and nothing changes.
        let line = json!({"type": "MODIFIED", "object": service("web", json!("eighty"))});
        let event: WatchEvent<Lenient<Service>> = serde_json::from_str(&line.to_string()).unwrap();
        let WatchEvent::Modified(object) = event else {
            panic!("not a MODIFIED event")
        };
        let change = Change::Services(Box::new(watcher::Event::Apply(object)));
        assert!(feed.feed(change).is_none());
        let problems: Vec<String> = feed
            .take_problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "Service shop/web: spec.ports[0].port: invalid type: string \"eighty\""
            ),
            "{problems:?}"
        );

        // A re-list with web still malformed and a gone: web keeps its version, a goes.
        let event = relist(&mut feed, list(vec![service("web", json!("eighty"))])).unwrap();
        assert_eq!(feed.take_problems().len(), 1);
        cluster.apply(event);
        cluster.sync();
        assert_eq!(ports(&cluster), ["10.96.0.3:80/TCP"]);
    }

    #[test]
    fn malformed_metadata_still_names_the_object() {
        let mut object = service("web", json!(80));
        object["metadata"]["labels"] = json!(["not", "a", "map"]);
        let item = list(vec![object]).pop().unwrap();
        let Lenient::Malformed(m) = item else {
            panic!("labels given as a list deserialized")
        };
        assert_eq!(
            (m.field.as_str(), m.metadata.name.as_deref()),
            ("metadata.labels", Some("web"))
        );
        assert_eq!(m.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(m.metadata.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn an_unreadable_node_keeps_the_zone() {
        let mut feed = KubeFeed::new(true);
        let node = |labels: serde_json::Value| -> Lenient<Node> {
            serde_json::from_value(json!({"metadata": {"name": "n", "labels": labels}})).unwrap()
        };
        let apply = |feed: &mut KubeFeed, node| {
            feed.feed(Change::Node(Box::new(watcher::Event::Apply(node))))
        };
        let zone = apply(&mut feed, node(json!({ZONE_LABEL: "z1"})));
        assert_eq!(zone, Some(Event::NodeZone(Some("z1".into()))));
        assert_eq!(apply(&mut feed, node(json!({ZONE_LABEL: 1}))), None);
        let problems = feed.take_problems();
        assert_eq!(
            problems[0].field,
            format!("metadata.labels.{ZONE_LABEL}"),
            "{problems:?}"
        );
    }
}
