//! A Service's endpoints, from its EndpointSlices.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    Backend, HEADLESS_LABEL, NodeContext, ObjectRef, Problem, Protocol, SERVICE_NAME_LABEL,
    ServiceKey,
    service::{PortFrontends, port_number},
    topology::{self, Candidate, Policy},
};

/// The API server's limit on endpoints per slice; a larger slice is malformed.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 1000;

/// The hints of an endpoint that has none.
static NO_HINTS: BTreeSet<String> = BTreeSet::new();

/// An EndpointSlice as the model keeps it: parsed once, when it arrives, into what the rules
/// read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SliceInput {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to; none when unlabelled or labelled headless.
    pub owner: Option<ServiceKey>,
    /// `None` when nothing in it is usable (FQDN, malformed).
    slice: Option<Slice>,
    problems: Vec<Problem>,
}

impl SliceInput {
    /// `None` for an object without namespace or name: nothing can refer to it.
    pub fn parse(slice: &EndpointSlice) -> Option<Self> {
        let namespace = slice.metadata.namespace.clone()?;
        let name = slice.metadata.name.clone()?;
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .filter(|l| !l.contains_key(HEADLESS_LABEL))
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|service| ServiceKey {
                namespace: namespace.clone(),
                name: service.clone(),
            });
        let mut problems = Vec::new();
        let parsed = Slice::parse(slice, &mut problems);
        Some(Self {
            namespace,
            name,
            owner,
            slice: parsed,
            problems,
        })
    }

    /// What could not be used, to report whenever its Service is recomputed.
    pub(super) fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

/// The usable content of a Service's slices, in slice-name order.
pub(super) struct ServiceEndpoints<'a> {
    slices: Vec<&'a Slice>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Slice {
    ipv6: bool,
    ports: Vec<SlicePort>,
    endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SlicePort {
    name: String,
    protocol: Protocol,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Endpoint {
    address: IpAddr,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// Where it runs and which zones or nodes it is hinted for; boxed and absent when none of it
    /// is set, which keeps an endpoint at 32 bytes (a slice holds up to 1 000).
    topology: Option<Box<EndpointTopology>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct EndpointTopology {
    node_name: Option<String>,
    zone_hints: BTreeSet<String>,
    node_hints: BTreeSet<String>,
}

impl<'a> ServiceEndpoints<'a> {
    /// The usable slices (given in slice-name order); their problems go to `problems`.
    pub(super) fn collect(slices: &[&'a SliceInput], problems: &mut Vec<Problem>) -> Self {
        let slices = slices
            .iter()
            .filter_map(|input| {
                problems.extend_from_slice(&input.problems);
                input.slice.as_ref()
            })
            .collect();
        Self { slices }
    }

    /// Whether a usable slice of this family exists (`ipv6`), and whether one lists endpoints.
    pub(super) fn family(&self, ipv6: bool) -> (bool, bool) {
        let mut of_family = self.slices.iter().filter(|s| s.ipv6 == ipv6).peekable();
        let any = of_family.peek().is_some();
        (any, of_family.any(|s| !s.endpoints.is_empty()))
    }

    /// The backends for one frontend of `port`: endpoints of the frontend's IP family, at the
    /// target port their slice gives for the Service port's name and protocol, chosen by
    /// [`topology::select`].
    /// The backends of `port` for connects to `frontend`, and the endpoints listed as serving
    /// that are not among them (see [`FrontendState::still_serving`](super::FrontendState)).
    pub(super) fn backends_for(
        &self,
        port: &PortFrontends,
        frontend: IpAddr,
        policy: Policy,
        node: &NodeContext,
    ) -> (BTreeSet<Backend>, BTreeSet<Backend>) {
        // An address listed by several slices (a Pod moving between slices, or a new Pod that
        // reuses a terminating Pod's IP) counts once: the listing on this node wins, then one
        // that is not terminating, then the first in slice-name order (kube-proxy's
        // endpointslicecache.go).
        let mut candidates: Vec<Candidate> = Vec::new();
        for slice in self.slices.iter().filter(|s| s.ipv6 == frontend.is_ipv6()) {
            let Some(slice_port) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            candidates.extend(slice.endpoints.iter().map(|endpoint| {
                let topology = endpoint.topology.as_deref();
                Candidate {
                    backend: Backend {
                        address: endpoint.address,
                        port: slice_port.port,
                    },
                    ready: endpoint.ready,
                    serving: endpoint.serving,
                    terminating: endpoint.terminating,
                    node_name: topology.and_then(|t| t.node_name.as_deref()),
                    zone_hints: topology.map_or(&NO_HINTS, |t| &t.zone_hints),
                    node_hints: topology.map_or(&NO_HINTS, |t| &t.node_hints),
                }
            }));
        }
        // One candidate per backend: of several listings (the same address in several slices),
        // the first unless a later one is preferred. A stable sort keeps listings in order.
        candidates.sort_by_key(|c| c.backend);
        let mut unique: Vec<Candidate> = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            match unique.last_mut() {
                Some(listed) if listed.backend == candidate.backend => {
                    if preferred(&candidate, listed, node) {
                        *listed = candidate;
                    }
                }
                _ => unique.push(candidate),
            }
        }
        let backends = topology::select(&unique, policy, node);
        let still_serving = unique
            .iter()
            .filter(|c| (c.ready || c.serving) && !backends.contains(&c.backend))
            .map(|c| c.backend)
            .collect();
        (backends, still_serving)
    }
}

fn preferred(new: &Candidate, listed: &Candidate, node: &NodeContext) -> bool {
    match (new.is_on(node), listed.is_on(node)) {
        (true, false) => true,
        (false, true) => false,
        _ => listed.terminating && !new.terminating,
    }
}

impl Slice {
    fn parse(slice: &EndpointSlice, problems: &mut Vec<Problem>) -> Option<Self> {
        let object = ObjectRef::endpoint_slice(slice);
        let mut problem = |field: String, message: String| {
            problems.push(Problem::new(object.clone(), field, message));
        };

        let ipv6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            "FQDN" => return None, // not proxied, as in kube-proxy
            other => {
                problem(
                    "addressType".into(),
                    format!("{other:?} is not an address type; expected IPv4, IPv6 or FQDN"),
                );
                return None;
            }
        };
        let slice_endpoints = slice.endpoints.as_deref().unwrap_or_default();
        if slice_endpoints.len() > MAX_ENDPOINTS_PER_SLICE {
            problem(
                "endpoints".into(),
                format!(
                    "{} endpoints; a slice holds at most {MAX_ENDPOINTS_PER_SLICE}",
                    slice_endpoints.len()
                ),
            );
            return None;
        }

        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            let protocol = match Protocol::parse_field(port.protocol.as_deref()) {
                Ok(p) => p,
                Err(message) => {
                    problem(format!("ports[{i}].protocol"), message);
                    continue;
                }
            };
            // A port without a number means "all ports", which a ClusterIP cannot proxy.
            let Some(number) = port.port else { continue };
            let number = match port_number(number) {
                Ok(n) => n,
                Err(message) => {
                    problem(format!("ports[{i}].port"), message);
                    continue;
                }
            };
            let name = port.name.clone().unwrap_or_default();
            // A Service port takes the first slice port of its name and protocol; a second one
            // would never be used.
            if let Some(first) = ports
                .iter()
                .position(|p: &SlicePort| p.name == name && p.protocol == protocol)
            {
                problem(
                    format!("ports[{i}]"),
                    format!(
                        "port {name:?}/{protocol} is listed twice; using the first (ports[{first}])"
                    ),
                );
                continue;
            }
            ports.push(SlicePort {
                name,
                protocol,
                port: number,
            });
        }

        let mut endpoints = Vec::new();
        for (i, endpoint) in slice_endpoints.iter().enumerate() {
            // kube-proxy uses the first address; the others are for other consumers.
            let Some(text) = endpoint.addresses.first() else {
                problem(format!("endpoints[{i}].addresses"), "empty".into());
                continue;
            };
            let address = match text.parse::<IpAddr>() {
                Ok(a) if a.is_ipv6() == ipv6 => a,
                Ok(_) => {
                    problem(
                        format!("endpoints[{i}].addresses[0]"),
                        format!("{text} does not match addressType {}", slice.address_type),
                    );
                    continue;
                }
                Err(_) => {
                    problem(
                        format!("endpoints[{i}].addresses[0]"),
                        format!("{text:?} is not an IP address"),
                    );
                    continue;
                }
            };
            let conditions = endpoint.conditions.as_ref();
            // Absent conditions have the API's documented meaning: ready unless said otherwise,
            // serving like ready, not terminating.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let hints = endpoint.hints.as_ref();
            let topology = EndpointTopology {
                node_name: endpoint.node_name.clone(),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
            };
            endpoints.push(Endpoint {
                address,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                topology: (topology != EndpointTopology::default()).then(|| Box::new(topology)),
            });
        }
        Some(Self {
            ipv6,
            ports,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_topology_stays_small() {
        // 100 000 endpoints at 10 000 Services: every byte here is 100 kB of agent memory.
        assert!(
            std::mem::size_of::<Endpoint>() <= 32,
            "{}",
            std::mem::size_of::<Endpoint>()
        );
    }
}
