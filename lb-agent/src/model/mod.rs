//! The model: Kubernetes Services and EndpointSlices in, frontends and backend sets out.
//!
//! Pure: no I/O, no BPF. Every source (manifest files, the Kubernetes API) sends the same
//! [`Event`]s into one long-lived [`Cluster`]; each [`Cluster::sync`] returns the frontends that
//! changed, and the reconciler programs them.
//!
//! Rules, after kube-proxy:
//! - ClusterIP, NodePort and LoadBalancer Services contribute each ClusterIP × each port;
//!   headless (`clusterIP: None`) and ExternalName Services contribute nothing.
//! - A Service's endpoints come from the EndpointSlices labelled `kubernetes.io/service-name` in
//!   its namespace. A Service port takes its target port, per slice, from the slice port of the
//!   same name and protocol (this is how named targetPorts work), and an endpoint listed by several
//!   slices counts once.
//! - Services labelled `service.kubernetes.io/service-proxy-name` belong to that proxy (unless it
//!   is ours), and slices labelled `service.kubernetes.io/headless` are skipped.
//! - `sessionAffinity: ClientIP` gives each frontend of the Service its timeout
//!   (`sessionAffinityConfig.clientIP.timeoutSeconds`, 10 800 s unless set, 1–86 400).
//! - Which endpoints this node uses follows kube-proxy's topology rules ([`topology`]):
//!   `internalTrafficPolicy: Local`, topology hints and `trafficDistribution`, ready endpoints
//!   first and serving+terminating ones when none is ready.
//!
//! [`Cluster`] is the incremental form the agent keeps; `translate`, in tests, the one-shot form.

mod cluster;
mod endpoints;
mod problem;
mod service;
mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

pub use cluster::{Cluster, Event, ServiceKey};
pub use endpoints::SliceInput;
pub use problem::{ObjectRef, Problem};
pub use service::ServiceInput;

/// Where the model runs: which node (for `internalTrafficPolicy: Local` and topology) and which
/// proxy name it answers to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name (`spec.nodeName` of its Pods, `nodeName` of its endpoints).
    pub name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Services labelled `service.kubernetes.io/service-proxy-name` with this value are ours too.
    pub service_proxy_name: Option<String>,
}

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes `protocol` field; absent means TCP.
    pub fn from_k8s(value: Option<&str>) -> Option<Self> {
        match value {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    /// Parses a `protocol` field, or says what is wrong with it.
    fn parse_field(value: Option<&str>) -> Result<Self, String> {
        Self::from_k8s(value).ok_or_else(|| {
            format!(
                "{:?} is not a protocol; expected TCP, UDP or SCTP",
                value.unwrap_or_default()
            )
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }

    /// IANA protocol number, as the datapath sees it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::protocol::TCP,
            Self::Udp => lb_common::protocol::UDP,
            Self::Sctp => lb_common::protocol::SCTP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Sctp]
            .into_iter()
            .find(|p| p.number() == number)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client connects to: a ClusterIP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Where a connect goes: a Pod IP and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub address: IpAddr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A Service port, as `kubectl` and kube-proxy name it: `namespace/name:port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for a Service's single unnamed port.
    pub port: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// One frontend's programming: whose it is and where its connects go. An empty backend set means
/// connects are refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendState {
    pub service: ServicePortName,
    pub backends: BTreeSet<Backend>,
    /// Endpoints a slice lists as serving this port that are not among `backends`: terminating
    /// Pods draining their connections, or endpoints topology or `internalTrafficPolicy` leaves
    /// out. New connects do not go to them, but the sockets already connected to them are theirs
    /// to finish: they are not ended.
    pub still_serving: BTreeSet<Backend>,
    /// `sessionAffinity: ClientIP`: how long a client keeps its backend after its last connect,
    /// in seconds (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout_s: Option<u32>,
}

/// Everything the dataplane should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendState>,
}

/// What every frontend should be, as the reconciler reads it: from the model itself
/// ([`Cluster`]), so the agent keeps no second copy, or from a [`DesiredState`].
pub trait DesiredFrontends {
    fn frontend(&self, frontend: &Frontend) -> Option<&FrontendState>;
    /// Every frontend, in no particular order.
    fn frontends(&self) -> impl Iterator<Item = (&Frontend, &FrontendState)>;
}

impl DesiredFrontends for DesiredState {
    fn frontend(&self, frontend: &Frontend) -> Option<&FrontendState> {
        self.frontends.get(frontend)
    }

    fn frontends(&self) -> impl Iterator<Item = (&Frontend, &FrontendState)> {
        self.frontends.iter()
    }
}

/// The result of [`translate`]: the state to program, and what had to be skipped and why.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub problems: Vec<Problem>,
}

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label of the slices the control plane keeps for headless Services; proxies skip them.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Translates Services and EndpointSlices into frontends and backend sets, all at once.
///
/// Objects that cannot be used in full are used as far as they can (a bad port skips that port, a
/// bad endpoint skips that endpoint) and reported in [`Translation::problems`]; nothing about one
/// Service affects another, except that a frontend claimed by two Services goes to the first in
/// namespace/name order.
#[cfg(test)]
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a k8s_openapi::api::core::v1::Service>,
    slices: impl IntoIterator<Item = &'a k8s_openapi::api::discovery::v1::EndpointSlice>,
    node: &NodeContext,
) -> Translation {
    translate_inputs(
        services
            .into_iter()
            .filter_map(ServiceInput::parse)
            .collect(),
        slices.into_iter().filter_map(SliceInput::parse).collect(),
        node,
    )
}

/// [`translate`] for objects already parsed.
#[cfg(test)]
fn translate_inputs(
    services: Vec<ServiceInput>,
    slices: Vec<SliceInput>,
    node: &NodeContext,
) -> Translation {
    let mut cluster = Cluster::new(node.clone());
    cluster.replace_services(services, &[]);
    cluster.replace_slices(slices, &[]);
    let problems = cluster.sync().problems;
    Translation {
        state: cluster.state(),
        problems,
    }
}

#[cfg(test)]
mod tests;
