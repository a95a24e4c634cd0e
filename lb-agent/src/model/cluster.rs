//! The incremental model: Services and EndpointSlices as they come and go, and the frontends they
//! produce. A change marks the Services it touches; [`Cluster::sync`] recomputes only those and
//! returns the frontends whose programming changed.
//!
//! Objects are kept as [`ServiceInput`] and [`SliceInput`]: parsed once, on arrival, into only
//! what the rules read (a few hundred bytes, where the Kubernetes objects take kilobytes).

use std::collections::{BTreeMap, BTreeSet};

use super::{
    DesiredFrontends, Frontend, FrontendState, NodeContext, ObjectRef, Problem, SERVICE_NAME_LABEL,
    ServicePortName,
    endpoints::{ServiceEndpoints, SliceInput},
    service::ServiceInput,
};
use crate::parallel;

/// A Service's frontends and their programming, in the order computed.
type Results = Vec<(Frontend, FrontendState)>;

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

/// A change to the model's inputs, as every source states it: the Kubernetes API's watch events
/// and the manifest files' changes both arrive as these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    UpsertService(ServiceInput),
    DeleteService(ServiceKey),
    UpsertSlice(SliceInput),
    /// Namespace and name of a slice that is gone.
    DeleteSlice(String, String),
    /// A complete list: these are all the Services, except that those in `unreadable` (listed,
    /// but not in a form the model can read) keep whatever version the model has of them.
    ReplaceServices {
        all: Vec<ServiceInput>,
        unreadable: Vec<ServiceKey>,
    },
    /// A complete list: these are all the EndpointSlices, except that those in `unreadable`
    /// (namespace and name) keep whatever version the model has of them.
    ReplaceSlices {
        all: Vec<SliceInput>,
        unreadable: Vec<(String, String)>,
    },
    /// This node's zone (its Node's `topology.kubernetes.io/zone`), or none.
    NodeZone(Option<String>),
}

/// What one [`Cluster::sync`] changed.
#[derive(Debug, Default)]
pub struct Sync {
    /// Frontends whose programming changed: the new state, or `None` when gone.
    pub changed: BTreeMap<Frontend, Option<FrontendState>>,
    /// Problems of the Services recomputed.
    pub problems: Vec<Problem>,
    /// How many Services were recomputed.
    pub services: usize,
}

#[derive(Default)]
pub struct Cluster {
    node: NodeContext,
    services: BTreeMap<ServiceKey, ServiceInput>,
    /// Slices by (namespace, name).
    slices: BTreeMap<(String, String), SliceInput>,
    // Small sorted vectors, not B-tree maps, for the per-Service collections below: a Service has
    // a few slices and frontends, and a B-tree node holds room for eleven (10 000 Services × a
    // few node allocations each was most of the agent's memory).
    /// Slice names by Service, sorted.
    slices_by_service: BTreeMap<ServiceKey, Vec<String>>,
    /// Each Service's own frontends as last computed.
    computed: BTreeMap<ServiceKey, Results>,
    /// Which Services claim a frontend, sorted; the first in namespace/name order owns it.
    claims: BTreeMap<Frontend, Vec<ServiceKey>>,
    dirty: BTreeSet<ServiceKey>,
    /// Slices added or changed since the last sync that name a Service: reported at the sync if
    /// that Service does not exist.
    fresh_slices: BTreeSet<(String, String)>,
}

impl Cluster {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            ..Default::default()
        }
    }

    /// Every frontend as of the last [`sync`](Self::sync), as one copy, for tests to compare
    /// (the agent reads the model through [`DesiredFrontends`], without copying it).
    pub fn state(&self) -> super::DesiredState {
        let frontends = self
            .claims
            .keys()
            .filter_map(|f| Some((*f, self.output(f)?.clone())))
            .collect();
        super::DesiredState { frontends }
    }

    /// Re-allocates everything the model keeps, after a large sync: the copies fill the holes the
    /// sync's short-lived allocations left, and dropping the originals frees whole pages, which
    /// the allocator can then return to the system.
    pub fn compact(&mut self) {
        self.services = self.services.clone();
        self.slices = self.slices.clone();
        self.slices_by_service = self.slices_by_service.clone();
        self.computed = self.computed.clone();
        self.claims = self.claims.clone();
    }

    /// Services that have frontends, by family (IPv4, IPv6): a dual-stack Service counts in
    /// both.
    pub fn services_by_family(&self) -> [usize; 2] {
        let mut counts = [0; 2];
        for results in self.computed.values() {
            let has = |ipv6: bool| results.iter().any(|(f, _)| f.address.is_ipv6() == ipv6);
            for (i, ipv6) in [false, true].into_iter().enumerate() {
                counts[i] += usize::from(has(ipv6));
            }
        }
        counts
    }

    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// Services waiting for [`sync`](Self::sync).
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.dirty.len()
    }

    pub fn set_node(&mut self, node: NodeContext) {
        if node != self.node {
            self.node = node;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// Adds or replaces a Service; one that parses the same as before touches nothing.
    pub fn upsert_service(&mut self, input: ServiceInput) {
        if self.services.get(&input.key) != Some(&input) {
            self.dirty.insert(input.key.clone());
            self.services.insert(input.key.clone(), input);
        }
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = ServiceKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if self.services.remove(&key).is_some() {
            self.dirty.insert(key);
        }
    }

    /// Adds or replaces a slice; one that parses the same as before touches nothing.
    pub fn upsert_slice(&mut self, input: SliceInput) {
        let id = (input.namespace.clone(), input.name.clone());
        if self.slices.get(&id) == Some(&input) {
            return;
        }
        self.forget_slice(&id);
        if let Some(owner) = &input.owner {
            insert_sorted(
                self.slices_by_service.entry(owner.clone()).or_default(),
                &id.1,
            );
            self.dirty.insert(owner.clone());
            self.fresh_slices.insert(id.clone());
        }
        self.slices.insert(id, input);
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        self.forget_slice(&(namespace.to_owned(), name.to_owned()));
    }

    fn forget_slice(&mut self, id: &(String, String)) {
        let Some(owner) = self.slices.remove(id).and_then(|s| s.owner) else {
            return;
        };
        if let Some(names) = self.slices_by_service.get_mut(&owner) {
            names.retain(|name| *name != id.1);
            if names.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
        self.dirty.insert(owner);
    }

    /// Applies one event: only the Services it touches are marked for the next
    /// [`sync`](Self::sync).
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::UpsertService(svc) => self.upsert_service(svc),
            Event::DeleteService(key) => self.delete_service(&key.namespace, &key.name),
            Event::UpsertSlice(slice) => self.upsert_slice(slice),
            Event::DeleteSlice(namespace, name) => self.delete_slice(&namespace, &name),
            Event::ReplaceServices { all, unreadable } => self.replace_services(all, &unreadable),
            Event::ReplaceSlices { all, unreadable } => self.replace_slices(all, &unreadable),
            Event::NodeZone(zone) => {
                let mut node = self.node.clone();
                node.zone = zone;
                self.set_node(node);
            }
        }
    }

    /// Replaces all Services with `services` (after a full list), marking only what changed.
    /// Those in `unreadable` were listed but could not be read: they stay as they are.
    pub fn replace_services(&mut self, services: Vec<ServiceInput>, unreadable: &[ServiceKey]) {
        let keep: BTreeSet<&ServiceKey> =
            services.iter().map(|s| &s.key).chain(unreadable).collect();
        let gone: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !keep.contains(k))
            .cloned()
            .collect();
        for key in gone {
            self.delete_service(&key.namespace, &key.name);
        }
        for svc in services {
            self.upsert_service(svc);
        }
    }

    /// Replaces all EndpointSlices with `slices` (after a full list), marking only what changed.
    /// Those in `unreadable` (namespace, name) were listed but could not be read: they stay as
    /// they are.
    pub fn replace_slices(&mut self, slices: Vec<SliceInput>, unreadable: &[(String, String)]) {
        let keep: BTreeSet<(&str, &str)> = slices
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .chain(unreadable.iter().map(|(ns, n)| (ns.as_str(), n.as_str())))
            .collect();
        let gone: Vec<(String, String)> = self
            .slices
            .keys()
            .filter(|(ns, name)| !keep.contains(&(ns.as_str(), name.as_str())))
            .cloned()
            .collect();
        for id in gone {
            self.forget_slice(&id);
        }
        for slice in slices {
            self.upsert_slice(slice);
        }
    }

    /// Recomputes the Services touched since the last sync.
    pub fn sync(&mut self) -> Sync {
        self.recompute(true)
    }

    /// [`sync`](Self::sync) without the list of changed frontends: for the first programming of
    /// the maps, which reads every frontend from the model anyway (at 10 000 Services the list
    /// would be a copy of all of them).
    pub fn sync_all(&mut self) -> Sync {
        self.recompute(false)
    }

    fn recompute(&mut self, list_changes: bool) -> Sync {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Sync {
            services: dirty.len(),
            ..Default::default()
        };
        self.report_orphans(&mut out.problems);

        // The dirty Services' new results, computed before anything changes: on every core when
        // there are many (a cold start), each Service's alone being pure.
        let dirty_keys: Vec<&ServiceKey> = dirty.iter().collect();
        let translated = parallel::map(&dirty_keys, |key| {
            let mut problems = Vec::new();
            let frontends = self
                .services
                .get(*key)
                .map(|svc| self.translate_service(svc, &mut problems));
            ((*key).clone(), frontends, problems)
        });
        let mut results: Vec<(ServiceKey, Option<Results>)> = Vec::with_capacity(translated.len());
        for (key, frontends, problems) in translated {
            out.problems.extend(problems);
            results.push((key, frontends));
        }
        // Every frontend they had or have, and what it was.
        let mut affected: Vec<Frontend> = Vec::new();
        for (key, frontends) in &results {
            let old = self.computed.get(key).into_iter().flatten();
            let new = frontends.iter().flatten();
            affected.extend(old.chain(new).map(|(f, _)| *f));
        }
        affected.sort_unstable();
        affected.dedup();
        let before: Vec<(Frontend, Option<FrontendState>)> = affected
            .into_iter()
            .map(|f| (f, list_changes.then(|| self.output(&f).cloned()).flatten()))
            .collect();

        if self.computed.is_empty() {
            self.load(results);
        } else {
            self.store(results);
        }

        for (frontend, old) in before {
            let claimants = self
                .claims
                .get(&frontend)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if let Some(owner) = claimants.first() {
                for loser in claimants.iter().skip(1).filter(|k| dirty.contains(*k)) {
                    out.problems.push(Problem::new(
                        ObjectRef {
                            kind: "Service",
                            namespace: loser.namespace.clone(),
                            name: loser.name.clone(),
                        },
                        "spec.clusterIP",
                        format!(
                            "frontend {frontend} is already used by Service {}/{}",
                            owner.namespace, owner.name
                        ),
                    ));
                }
            }
            if list_changes {
                let new = self.output(&frontend);
                if new != old.as_ref() {
                    out.changed.insert(frontend, new.cloned());
                }
            }
        }
        out
    }

    /// Replaces the results and claims of the Services in `results` (sorted by key, as
    /// `recompute` makes them): one Service at a time.
    fn store(&mut self, results: Vec<(ServiceKey, Option<Results>)>) {
        for (key, frontends) in results {
            for (frontend, _) in self.computed.remove(&key).into_iter().flatten() {
                if let Some(claimants) = self.claims.get_mut(&frontend) {
                    claimants.retain(|k| *k != key);
                    if claimants.is_empty() {
                        self.claims.remove(&frontend);
                    }
                }
            }
            if let Some(frontends) = frontends {
                for (frontend, _) in &frontends {
                    insert_sorted(self.claims.entry(*frontend).or_default(), &key);
                }
                self.computed.insert(key, frontends);
            }
        }
    }

    /// [`store`](Self::store) into an empty model (a cold start): both maps are built in one go
    /// from sorted lists, without a search by name per Service.
    fn load(&mut self, results: Vec<(ServiceKey, Option<Results>)>) {
        debug_assert!(self.computed.is_empty() && self.claims.is_empty());
        let mut claims: Vec<(Frontend, &ServiceKey)> = results
            .iter()
            .flat_map(|(key, frontends)| frontends.iter().flatten().map(move |(f, _)| (*f, key)))
            .collect();
        // By frontend, then by Service: each frontend's claimants in the order that makes the
        // first one its owner.
        claims.sort_unstable();
        claims.dedup();
        self.claims = claims
            .chunk_by(|a, b| a.0 == b.0)
            .map(|run| {
                (
                    run[0].0,
                    run.iter().map(|(_, key)| (*key).clone()).collect(),
                )
            })
            .collect();
        self.computed = results
            .into_iter()
            .filter_map(|(key, frontends)| Some((key, frontends?)))
            .collect();
    }

    /// Reports the slices added or changed since the last sync whose Service does not exist: their
    /// endpoints serve nothing (a slice serves the Service of its own namespace only), and their
    /// own problems would otherwise go unreported until it does. A slice that outlives its
    /// Service unchanged is not reported: the API deletes it moments later.
    fn report_orphans(&mut self, problems: &mut Vec<Problem>) {
        for id in std::mem::take(&mut self.fresh_slices) {
            let Some(slice) = self.slices.get(&id) else {
                continue;
            };
            let Some(owner) = slice.owner.as_ref() else {
                continue;
            };
            if self.services.contains_key(owner) {
                continue;
            }
            let message = if owner.name.is_empty() {
                "empty: the slice belongs to no Service".to_owned()
            } else {
                let elsewhere: Vec<&str> = self
                    .services
                    .keys()
                    .filter(|k| k.name == owner.name)
                    .map(|k| k.namespace.as_str())
                    .collect();
                let mut message = format!(
                    "no Service {}/{}; its endpoints are not used until there is one",
                    owner.namespace, owner.name
                );
                if !elsewhere.is_empty() {
                    message.push_str(&format!(
                        " (a slice serves the Service of its own namespace; there is one in {})",
                        elsewhere.join(", ")
                    ));
                }
                message
            };
            problems.push(Problem::new(
                ObjectRef {
                    kind: "EndpointSlice",
                    namespace: id.0.clone(),
                    name: id.1.clone(),
                },
                format!("metadata.labels.{SERVICE_NAME_LABEL}"),
                message,
            ));
            problems.extend_from_slice(slice.problems());
        }
    }

    /// A frontend's programming: its owner's result for it.
    fn output(&self, frontend: &Frontend) -> Option<&FrontendState> {
        let owner = self.claims.get(frontend)?.first()?;
        let results = self.computed.get(owner)?;
        results.iter().find(|(f, _)| f == frontend).map(|(_, s)| s)
    }

    fn translate_service(&self, svc: &ServiceInput, problems: &mut Vec<Problem>) -> Results {
        let mut frontends = Vec::new();
        if !svc.ours(&self.node) {
            return frontends; // another proxy's: its problems are not ours to report either
        }
        problems.extend_from_slice(svc.problems());
        let key = &svc.key;
        let slices: Vec<&SliceInput> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.namespace.clone(), name.clone())))
            .collect();
        let endpoints = ServiceEndpoints::collect(&slices, problems);
        let Some(service) = svc.frontends() else {
            return frontends;
        };
        // A ClusterIP of a family that no slice has, while the other family's slices list
        // endpoints (a ClusterIP that changed family, an IPv6 Service over IPv4 slices): its
        // connects are refused, and the Service should say why.
        let addresses = service.ports.first().map(|p| p.frontends.as_slice());
        for (i, frontend) in addresses.unwrap_or_default().iter().enumerate() {
            let ipv6 = frontend.address.is_ipv6();
            let family = |ipv6: bool| if ipv6 { "IPv6" } else { "IPv4" };
            if endpoints.family(ipv6).0 || !endpoints.family(!ipv6).1 {
                continue;
            }
            problems.push(Problem::new(
                ObjectRef {
                    kind: "Service",
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                },
                match i {
                    0 => "spec.clusterIP".to_owned(),
                    i => format!("spec.clusterIPs[{i}]"),
                },
                format!(
                    "{} is {}, but the Service's EndpointSlices are {}: its connects are refused",
                    frontend.address,
                    family(ipv6),
                    family(!ipv6)
                ),
            ));
        }
        for port in &service.ports {
            let name = ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port.name.clone(),
            };
            for &frontend in &port.frontends {
                let (backends, still_serving) =
                    endpoints.backends_for(port, frontend.address, service.policy, &self.node);
                frontends.push((
                    frontend,
                    FrontendState {
                        service: name.clone(),
                        backends,
                        still_serving,
                        affinity_timeout_s: service.affinity_timeout_s,
                    },
                ));
            }
        }
        frontends
    }
}

/// Inserts `value` into a sorted vector unless it is there already.
fn insert_sorted<T: Ord + Clone>(sorted: &mut Vec<T>, value: &T) {
    if let Err(at) = sorted.binary_search(value) {
        sorted.insert(at, value.clone());
    }
}

/// The frontends as of the last [`Cluster::sync`].
impl DesiredFrontends for Cluster {
    fn frontend(&self, frontend: &Frontend) -> Option<&FrontendState> {
        self.output(frontend)
    }

    /// By Service: each Service's results, less the frontends another Service owns (finding
    /// each frontend's owner's results would be a lookup by name per frontend).
    fn frontends(&self) -> impl Iterator<Item = (&Frontend, &FrontendState)> {
        self.computed.iter().flat_map(move |(key, results)| {
            results
                .iter()
                .filter(move |(frontend, _)| {
                    let owner = self.claims.get(frontend).and_then(|c| c.first());
                    owner == Some(key)
                })
                .map(|(frontend, state)| (frontend, state))
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;

    fn svc(name: &str, ip: &str) -> ServiceInput {
        let svc: Service = yaml_serde::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap();
        ServiceInput::parse(&svc).unwrap()
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> SliceInput {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        let slice: EndpointSlice = yaml_serde::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap();
        SliceInput::parse(&slice).unwrap()
    }

    fn backends(cluster: &Cluster, ip: &str) -> Vec<String> {
        let frontend = cluster
            .state()
            .frontends
            .iter()
            .find(|(f, _)| f.address.to_string() == ip)
            .map(|(_, s)| s.backends.iter().map(|b| b.address.to_string()).collect());
        frontend.unwrap_or_default()
    }

    #[test]
    fn an_event_recomputes_only_the_services_it_touches() {
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_service(svc("a", "10.96.0.1"));
        c.upsert_service(svc("b", "10.96.0.2"));
        c.upsert_slice(slice("a-1", "a", &["10.0.0.1"]));
        let first = c.sync();
        assert_eq!((first.services, first.changed.len()), (2, 2));

        c.upsert_slice(slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]));
        let sync = c.sync();
        assert_eq!(sync.services, 1, "only a is recomputed");
        assert_eq!(sync.changed.len(), 1);
        assert_eq!(backends(&c, "10.96.0.1"), ["10.0.0.1", "10.0.0.2"]);

        // Re-sending an unchanged object (a resync, a re-list) touches nothing.
        c.upsert_service(svc("b", "10.96.0.2"));
        c.upsert_slice(slice("a-1", "a", &["10.0.0.1", "10.0.0.2"]));
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn endpoints_serving_outside_the_set_are_listed_as_still_serving() {
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_service(svc("a", "10.96.0.1"));
        let slice: EndpointSlice = yaml_serde::from_str(
            "metadata: {name: a-1, namespace: ns, labels: {kubernetes.io/service-name: a}}\n\
             addressType: IPv4\nports: [{port: 8080}]\nendpoints:\n\
             - {addresses: [10.0.0.1]}\n\
             - {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}\n\
             - {addresses: [10.0.0.3], conditions: {ready: false, serving: false}}",
        )
        .unwrap();
        c.upsert_slice(SliceInput::parse(&slice).unwrap());
        c.sync();
        let state = c.state();
        let state = state.frontends.values().next().unwrap();
        let addresses = |set: &BTreeSet<crate::model::Backend>| -> Vec<String> {
            set.iter().map(|b| b.address.to_string()).collect()
        };
        assert_eq!(addresses(&state.backends), ["10.0.0.1"]);
        // The terminating one drains; the one that is not serving is gone for good.
        assert_eq!(addresses(&state.still_serving), ["10.0.0.2"]);
    }

    #[test]
    fn a_slice_relabelled_to_another_service_moves_its_endpoints() {
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_service(svc("a", "10.96.0.1"));
        c.upsert_service(svc("b", "10.96.0.2"));
        c.upsert_slice(slice("s", "a", &["10.0.0.1"]));
        c.sync();
        c.upsert_slice(slice("s", "b", &["10.0.0.1"]));
        let sync = c.sync();
        assert_eq!(sync.services, 2);
        assert!(backends(&c, "10.96.0.1").is_empty());
        assert_eq!(backends(&c, "10.96.0.2"), ["10.0.0.1"]);

        c.delete_slice("ns", "s");
        c.sync();
        assert!(backends(&c, "10.96.0.2").is_empty());
    }

    #[test]
    fn deleting_a_service_removes_its_frontends_and_hands_a_shared_one_over() {
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_service(svc("a", "10.96.0.1"));
        c.upsert_service(svc("b", "10.96.0.1")); // same frontend: a owns it
        c.upsert_slice(slice("b-1", "b", &["10.0.0.9"]));
        let sync = c.sync();
        assert_eq!(sync.problems.len(), 1, "b is told its frontend is taken");
        assert_eq!(
            c.state().frontends.values().next().unwrap().service.name,
            "a"
        );

        c.delete_service("ns", "a");
        let sync = c.sync();
        let (_, state) = sync.changed.iter().next().unwrap();
        assert_eq!(state.as_ref().unwrap().service.name, "b");
        assert_eq!(backends(&c, "10.96.0.1"), ["10.0.0.9"]);

        c.delete_service("ns", "b");
        let sync = c.sync();
        assert_eq!(sync.changed.values().next(), Some(&None));
        assert!(c.state().frontends.is_empty());
    }

    #[test]
    fn replacing_after_a_relist_deletes_what_is_gone_and_keeps_the_rest_untouched() {
        let mut c = Cluster::new(NodeContext::default());
        c.replace_services(vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")], &[]);
        c.replace_slices(
            vec![
                slice("a-1", "a", &["10.0.0.1"]),
                slice("b-1", "b", &["10.0.0.2"]),
            ],
            &[],
        );
        c.sync();
        c.replace_services(vec![svc("a", "10.96.0.1")], &[]);
        c.replace_slices(vec![slice("a-1", "a", &["10.0.0.1"])], &[]);
        let sync = c.sync();
        assert_eq!(sync.services, 1, "only b, which is gone");
        assert_eq!(sync.changed.len(), 1);
        assert_eq!(c.state().frontends.len(), 1);
    }

    #[test]
    fn a_slice_without_its_service_is_reported_when_it_changes_not_when_its_service_goes() {
        let orphans = |sync: &Sync| -> Vec<String> {
            sync.problems
                .iter()
                .map(|p| format!("{}: {}", p.object, p.message))
                .collect()
        };
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_slice(slice("b-1", "b", &["10.0.0.1"]));
        c.upsert_service(svc("a", "10.96.0.1"));
        let sync = c.sync();
        assert_eq!(
            orphans(&sync),
            [
                "EndpointSlice ns/b-1: no Service ns/b; its endpoints are not used until there is one"
            ]
        );
        assert!(c.sync().problems.is_empty(), "reported once");

        // Its Service arrives: served, nothing to report.
        c.upsert_service(svc("b", "10.96.0.2"));
        assert!(c.sync().problems.is_empty());
        assert_eq!(backends(&c, "10.96.0.2"), ["10.0.0.1"]);

        // Its Service goes, the slice stays a moment (the API deletes it next): not reported.
        c.delete_service("ns", "b");
        assert!(c.sync().problems.is_empty());
        // But a change to the slice while its Service is missing is.
        c.upsert_slice(slice("b-1", "b", &["10.0.0.2"]));
        assert_eq!(c.sync().problems.len(), 1);
    }

    #[test]
    fn a_node_change_recomputes_every_service() {
        let mut c = Cluster::new(NodeContext::default());
        c.upsert_service(svc("a", "10.96.0.1"));
        c.upsert_service(svc("b", "10.96.0.2"));
        c.sync();
        c.set_node(NodeContext {
            zone: Some("z".into()),
            ..Default::default()
        });
        assert_eq!(c.pending(), 2);
    }
}
