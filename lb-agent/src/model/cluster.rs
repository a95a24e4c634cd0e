//! The incremental model: Services and EndpointSlices as they come and go, and the frontends they
//! produce. A change marks the Services it touches; [`Cluster::sync`] recomputes only those and
//! returns the frontends whose programming changed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    DesiredState, Frontend, FrontendState, NodeContext, ObjectRef, Problem, SERVICE_NAME_LABEL,
    ServicePortName, endpoints::ServiceEndpoints, service,
};

/// Label of the slices the control plane keeps for headless Services; proxies skip them.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
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
    services: BTreeMap<ServiceKey, Service>,
    /// Slices by (namespace, name), and which Service each belongs to.
    slices: BTreeMap<(String, String), (Option<ServiceKey>, EndpointSlice)>,
    slices_by_service: BTreeMap<ServiceKey, BTreeSet<String>>,
    /// Each Service's own frontends as last computed.
    computed: BTreeMap<ServiceKey, BTreeMap<Frontend, FrontendState>>,
    /// Which Services claim a frontend; the first in namespace/name order owns it.
    claims: BTreeMap<Frontend, BTreeSet<ServiceKey>>,
    state: DesiredState,
    dirty: BTreeSet<ServiceKey>,
}

impl Cluster {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            ..Default::default()
        }
    }

    /// The frontends as of the last [`sync`](Self::sync).
    pub fn state(&self) -> &DesiredState {
        &self.state
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

    pub fn upsert_service(&mut self, svc: Service) {
        let Some(key) = service_key(&svc.metadata.namespace, &svc.metadata.name) else {
            return;
        };
        if self.services.get(&key) != Some(&svc) {
            self.services.insert(key.clone(), svc);
            self.dirty.insert(key);
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

    pub fn upsert_slice(&mut self, slice: EndpointSlice) {
        let (Some(namespace), Some(name)) = (
            slice.metadata.namespace.clone(),
            slice.metadata.name.clone(),
        ) else {
            return;
        };
        let labels = slice.metadata.labels.as_ref();
        let owner = labels
            .filter(|l| !l.contains_key(HEADLESS_LABEL))
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|service| ServiceKey {
                namespace: namespace.clone(),
                name: service.clone(),
            });
        let id = (namespace, name);
        if self
            .slices
            .get(&id)
            .is_some_and(|(o, s)| *o == owner && *s == slice)
        {
            return;
        }
        self.forget_slice(&id);
        if let Some(owner) = &owner {
            self.slices_by_service
                .entry(owner.clone())
                .or_default()
                .insert(id.1.clone());
            self.dirty.insert(owner.clone());
        }
        self.slices.insert(id, (owner, slice));
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        self.forget_slice(&(namespace.to_owned(), name.to_owned()));
    }

    fn forget_slice(&mut self, id: &(String, String)) {
        if let Some((Some(owner), _)) = self.slices.remove(id) {
            if let Some(names) = self.slices_by_service.get_mut(&owner) {
                names.remove(&id.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    /// Replaces all Services with `services` (after a full list), marking only what changed.
    pub fn replace_services(&mut self, services: Vec<Service>) {
        let keep: BTreeSet<ServiceKey> = services
            .iter()
            .filter_map(|s| service_key(&s.metadata.namespace, &s.metadata.name))
            .collect();
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
    pub fn replace_slices(&mut self, slices: Vec<EndpointSlice>) {
        let keep: BTreeSet<(String, String)> = slices
            .iter()
            .filter_map(|s| Some((s.metadata.namespace.clone()?, s.metadata.name.clone()?)))
            .collect();
        let gone: Vec<(String, String)> = self
            .slices
            .keys()
            .filter(|k| !keep.contains(k))
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
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Sync {
            services: dirty.len(),
            ..Default::default()
        };
        let mut affected: BTreeSet<Frontend> = BTreeSet::new();

        for key in &dirty {
            for frontend in self
                .computed
                .remove(key)
                .into_iter()
                .flat_map(|f| f.into_keys())
            {
                if let Some(claimants) = self.claims.get_mut(&frontend) {
                    claimants.remove(key);
                    if claimants.is_empty() {
                        self.claims.remove(&frontend);
                    }
                }
                affected.insert(frontend);
            }
            let Some(svc) = self.services.get(key) else {
                continue;
            };
            let frontends = self.translate_service(key, svc, &mut out.problems);
            for frontend in frontends.keys() {
                self.claims
                    .entry(*frontend)
                    .or_default()
                    .insert(key.clone());
                affected.insert(*frontend);
            }
            self.computed.insert(key.clone(), frontends);
        }

        for frontend in affected {
            let owner = self.claims.get(&frontend).and_then(|c| c.first());
            let new = owner.and_then(|k| self.computed.get(k)?.get(&frontend).cloned());
            if let (Some(owner), Some(claimants)) = (owner, self.claims.get(&frontend)) {
                for loser in claimants.iter().skip(1).filter(|k| dirty.contains(*k)) {
                    let svc = &self.services[loser];
                    out.problems.push(Problem::new(
                        ObjectRef::service(svc),
                        "spec.clusterIP",
                        format!(
                            "frontend {frontend} is already used by Service {}/{}",
                            owner.namespace, owner.name
                        ),
                    ));
                }
            }
            if self.state.frontends.get(&frontend) != new.as_ref() {
                match &new {
                    Some(state) => self.state.frontends.insert(frontend, state.clone()),
                    None => self.state.frontends.remove(&frontend),
                };
                out.changed.insert(frontend, new);
            }
        }
        out
    }

    fn translate_service(
        &self,
        key: &ServiceKey,
        svc: &Service,
        problems: &mut Vec<Problem>,
    ) -> BTreeMap<Frontend, FrontendState> {
        let mut frontends = BTreeMap::new();
        let Some(service) = service::frontends(svc, &self.node, problems) else {
            return frontends;
        };
        let slices: Vec<&EndpointSlice> = self
            .slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| Some(&self.slices.get(&(key.namespace.clone(), name.clone()))?.1))
            .collect();
        let endpoints = ServiceEndpoints::collect(&slices, problems);
        for port in &service.ports {
            let name = ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port: port.name.clone(),
            };
            for &frontend in &port.frontends {
                let backends =
                    endpoints.backends_for(port, frontend.address, service.policy, &self.node);
                frontends.insert(
                    frontend,
                    FrontendState {
                        service: name.clone(),
                        backends,
                    },
                );
            }
        }
        frontends
    }
}

fn service_key(namespace: &Option<String>, name: &Option<String>) -> Option<ServiceKey> {
    Some(ServiceKey {
        namespace: namespace.clone()?,
        name: name.clone()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ip: &str) -> Service {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
        ))
        .unwrap()
    }

    fn slice(name: &str, service: &str, ips: &[&str]) -> EndpointSlice {
        let endpoints: Vec<String> = ips
            .iter()
            .map(|ip| format!("{{addresses: [{ip}]}}"))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap()
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
        c.replace_services(vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")]);
        c.replace_slices(vec![
            slice("a-1", "a", &["10.0.0.1"]),
            slice("b-1", "b", &["10.0.0.2"]),
        ]);
        c.sync();
        c.replace_services(vec![svc("a", "10.96.0.1")]);
        c.replace_slices(vec![slice("a-1", "a", &["10.0.0.1"])]);
        let sync = c.sync();
        assert_eq!(sync.services, 1, "only b, which is gone");
        assert_eq!(sync.changed.len(), 1);
        assert_eq!(c.state().frontends.len(), 1);
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
