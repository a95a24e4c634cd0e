//! A Service's frontends: each ClusterIP × each port.

use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::Service;

use super::{Frontend, NodeContext, ObjectRef, Problem, Protocol, ServiceKey, topology::Policy};

/// Label naming the proxy that should serve a Service; other proxies leave it alone.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// A Service as the model keeps it: parsed once, when it arrives, into what the rules read.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceInput {
    pub key: ServiceKey,
    proxy_name: Option<String>,
    /// `None` when it has none by design (headless, ExternalName) or cannot be used at all.
    frontends: Option<ServiceFrontends>,
    problems: Vec<Problem>,
}

impl ServiceInput {
    /// `None` for an object without namespace or name: nothing can refer to it.
    pub fn parse(svc: &Service) -> Option<Self> {
        let key = ServiceKey {
            namespace: svc.metadata.namespace.clone()?,
            name: svc.metadata.name.clone()?,
        };
        let proxy_name = svc
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
            .cloned();
        let mut problems = Vec::new();
        let frontends = parse_frontends(svc, &mut problems);
        Some(Self {
            key,
            proxy_name,
            frontends,
            problems,
        })
    }

    /// Whether this node's proxy serves it: unlabelled, or labelled with our proxy name.
    pub(super) fn ours(&self, node: &NodeContext) -> bool {
        self.proxy_name.is_none() || self.proxy_name == node.service_proxy_name
    }

    pub(super) fn frontends(&self) -> Option<&ServiceFrontends> {
        self.frontends.as_ref()
    }

    /// What could not be used, to report whenever the Service is recomputed.
    pub(super) fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

/// A Service's frontends by port, the policy its endpoints are chosen by, and its session
/// affinity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ServiceFrontends {
    pub policy: Policy,
    pub ports: Vec<PortFrontends>,
    /// `sessionAffinity: ClientIP`'s timeout in seconds; `None` without affinity.
    pub affinity_timeout_s: Option<u32>,
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when not set (three hours), and the most the
/// API server allows (a day).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// The frontends of one Service port (one per ClusterIP, so two on a dual-stack Service).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct PortFrontends {
    /// The port's name; empty when unnamed.
    pub name: String,
    pub protocol: Protocol,
    pub frontends: Vec<Frontend>,
}

/// Returns the Service's frontends by port, or `None` when it has none by design (headless,
/// ExternalName) or cannot be used at all. Skipped parts are added to `problems`.
fn parse_frontends(svc: &Service, problems: &mut Vec<Problem>) -> Option<ServiceFrontends> {
    let object = ObjectRef::service(svc);
    let mut problem = |field: String, message: String| {
        problems.push(Problem::new(object.clone(), field, message));
    };

    if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
        problem("metadata.name".into(), "missing".into());
        return None;
    }
    let Some(spec) = &svc.spec else {
        problem("spec".into(), "missing".into());
        return None;
    };
    match spec.type_.as_deref() {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some("ExternalName") => return None, // resolved by DNS, not by a proxy
        Some(other) => {
            problem(
                "spec.type".into(),
                format!(
                    "unknown type {other:?}; expected ClusterIP, NodePort, LoadBalancer or ExternalName"
                ),
            );
            return None;
        }
    }

    // clusterIPs (dual-stack) wins over clusterIP, as in the API: its first entry equals clusterIP.
    let cluster_ips: Vec<(String, &str)> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips
            .iter()
            .enumerate()
            .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()))
            .collect(),
        _ => spec
            .cluster_ip
            .as_deref()
            .map(|ip| vec![("spec.clusterIP".to_owned(), ip)])
            .unwrap_or_default(),
    };
    match cluster_ips.first() {
        Some((_, "None")) => return None, // headless: clients reach the Pods directly
        None | Some((_, "")) => {
            problem(
                "spec.clusterIP".into(),
                "not set; give the Service a ClusterIP (manifest files have no IP allocator)"
                    .into(),
            );
            return None;
        }
        Some(_) => {}
    }
    let mut addresses = Vec::new();
    for (field, ip) in cluster_ips {
        match ip.parse::<IpAddr>() {
            Ok(address) => addresses.push(address),
            Err(_) => problem(field, format!("{ip:?} is not an IP address")),
        }
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        problem("spec.ports".into(), "no ports".into());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let protocol = match Protocol::parse_field(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(message) => {
                problem(format!("spec.ports[{i}].protocol"), message);
                continue;
            }
        };
        let number = match port_number(port.port) {
            Ok(n) => n,
            Err(message) => {
                problem(format!("spec.ports[{i}].port"), message);
                continue;
            }
        };
        if !seen.insert((number, protocol)) {
            problem(
                format!("spec.ports[{i}]"),
                format!("port {number}/{protocol} is listed twice"),
            );
            continue;
        }
        out.push(PortFrontends {
            name: port.name.clone().unwrap_or_default(),
            protocol,
            frontends: addresses
                .iter()
                .map(|&address| Frontend {
                    address,
                    port: number,
                    protocol,
                })
                .collect(),
        });
    }
    let local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            problem(
                "spec.internalTrafficPolicy".into(),
                format!("{other:?} is not a policy; expected Cluster or Local; using Cluster"),
            );
            false
        }
    };
    let policy = Policy { local };
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t @ 1..=MAX_AFFINITY_TIMEOUT_S) => Some(t as u32),
                Some(t) => {
                    problem(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                        format!(
                            "{t} is not a timeout; must be greater than 0 and less than \
                             {MAX_AFFINITY_TIMEOUT_S}; using {DEFAULT_AFFINITY_TIMEOUT_S}"
                        ),
                    );
                    Some(DEFAULT_AFFINITY_TIMEOUT_S)
                }
            }
        }
        Some(other) => {
            problem(
                "spec.sessionAffinity".into(),
                format!(
                    "{other:?} is not a session affinity; expected ClientIP or None; using None"
                ),
            );
            None
        }
    };
    Some(ServiceFrontends {
        policy,
        ports: out,
        affinity_timeout_s,
    })
}

/// A port number as Kubernetes allows it (1-65535), or what is wrong with it.
pub(super) fn port_number(port: i32) -> Result<u16, String> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{port} is not a port number (1-65535)"))
}
