//! Service and EndpointSlice manifests, written the way `kubectl get -o yaml` shows them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

/// A Service port: name, port, protocol (`TCP`/`UDP`), targetPort (a name or a number).
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub protocol: &'a str,
    pub target: Value,
}

impl<'a> Port<'a> {
    pub fn tcp(name: &'a str, port: u16, target: impl Into<Value>) -> Self {
        Self {
            name,
            port,
            protocol: "TCP",
            target: target.into(),
        }
    }

    pub fn udp(name: &'a str, port: u16, target: impl Into<Value>) -> Self {
        Self {
            name,
            port,
            protocol: "UDP",
            target: target.into(),
        }
    }
}

pub fn service(namespace: &str, name: &str, cluster_ip: Ipv4Addr, ports: &[Port]) -> String {
    to_yaml(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip.to_string(), "ports": service_ports(ports)},
    }))
}

/// A dual-stack Service: a ClusterIP of each family (`ipFamilies: [IPv4, IPv6]`).
pub fn dual_stack_service(
    namespace: &str,
    name: &str,
    cluster_ips: (Ipv4Addr, Ipv6Addr),
    ports: &[Port],
) -> String {
    let (v4, v6) = (cluster_ips.0.to_string(), cluster_ips.1.to_string());
    to_yaml(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": v4,
            "clusterIPs": [v4, v6],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": service_ports(ports),
        },
    }))
}

fn service_ports(ports: &[Port]) -> Vec<Value> {
    ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": p.protocol, "port": p.port, "targetPort": p.target}))
        .collect()
}

/// An endpoint and its conditions (`None`: left out, which the API reads as ready).
pub struct Endpoint<'a> {
    pub ip: IpAddr,
    pub pod: &'a str,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl<'a> Endpoint<'a> {
    pub fn ready(ip: impl Into<IpAddr>, pod: &'a str) -> Self {
        Self {
            ip: ip.into(),
            pod,
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
        }
    }
}

/// The two slices of a dual-stack Service `service` in `namespace`, `<service>-v4` and
/// `<service>-v6`, listing every one of `pods` ready on its IPv4 and its IPv6 address.
pub fn dual_stack_slices(
    namespace: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    pods: &[crate::testbed::PodSpec],
) -> [String; 2] {
    let v4: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(p.ip, &p.name))
        .collect();
    let v6: Vec<Endpoint> = pods
        .iter()
        .map(|p| Endpoint::ready(p.ip6(), &p.name))
        .collect();
    [
        endpoint_slice(namespace, &format!("{service}-v4"), service, ports, &v4),
        endpoint_slice(namespace, &format!("{service}-v6"), service, ports, &v6),
    ]
}

/// Slice ports: name, port, protocol. The slice's `addressType` is its endpoints' family (IPv4
/// when it has none).
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[Endpoint],
) -> String {
    let address_type = match endpoints.first().map(|e| e.ip) {
        Some(IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    };
    let ports: Vec<Value> = ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
        .collect();
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            let mut conditions = serde_json::Map::new();
            for (key, value) in [
                ("ready", e.ready),
                ("serving", e.serving),
                ("terminating", e.terminating),
            ] {
                if let Some(v) = value {
                    conditions.insert(key.into(), v.into());
                }
            }
            json!({
                "addresses": [e.ip.to_string()],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.pod},
            })
        })
        .collect();
    to_yaml(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    }))
}

/// Joins documents into one multi-document file.
pub fn documents(docs: &[String]) -> String {
    docs.iter().map(|d| format!("---\n{d}")).collect()
}

fn to_yaml(value: Value) -> String {
    yaml_serde::to_string(&value).expect("JSON values serialize as YAML")
}
