//! What the benchmark programs: its Services, their EndpointSlices (as manifests and as API
//! objects), and the same Services as kube-proxy's iptables rules.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde_json::{Value, json};
use xtask::testbed::ip6_of;

/// Backends per Service and family: the echo pods 10.244.1.1.. (fd00:244:1::1..).
pub const BACKENDS: u8 = 10;
/// Every pod echoes on this port, TCP and UDP.
pub const ECHO_PORT: u16 = 9000;
/// Every Service's port, TCP and UDP (two frontends per ClusterIP).
pub const SERVICE_PORT: u16 = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn cluster_ip(self, index: usize) -> IpAddr {
        match self {
            Family::V4 => cluster_ip(index).into(),
            Family::V6 => cluster_ip6(index).into(),
        }
    }

    pub fn pod_ip(self, index: u8) -> IpAddr {
        match self {
            Family::V4 => pod_ip(index).into(),
            Family::V6 => ip6_of(pod_ip(index)).into(),
        }
    }
}

/// Service `index`'s IPv4 ClusterIP, in 10.96.0.0/12.
pub fn cluster_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (index / 250) as u8, (index % 250 + 1) as u8)
}

/// Service `index`'s IPv6 ClusterIP, fd00:96::<index + 1> in fd00:96::/112.
pub fn cluster_ip6(index: usize) -> Ipv6Addr {
    let host = u16::try_from(index + 1).expect("at most 65 535 Services");
    Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, host)
}

pub fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 1, index + 1)
}

/// The datapath's Services: `count` dual-stack Services, each with TCP and UDP port 80 (to the
/// pods' echo port, named `echo` and `echo-udp`) on an IPv4 and an IPv6 ClusterIP, and an IPv4 and
/// an IPv6 EndpointSlice of all pods: four frontends of 10 backends per Service.
pub fn dual_stack_manifests(count: usize) -> String {
    let mut out = String::with_capacity(count * 2600);
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: {v4}, clusterIPs: [{v4}, \"{v6}\"], ipFamilies: [IPv4, IPv6], \
             ipFamilyPolicy: RequireDualStack, ports: [\
             {{name: echo, port: {SERVICE_PORT}, targetPort: echo}}, \
             {{name: echo-udp, port: {SERVICE_PORT}, protocol: UDP, targetPort: echo-udp}}]}}\n",
            v4 = cluster_ip(i),
            v6 = cluster_ip6(i),
        );
        for (suffix, family) in [("a", Family::V4), ("b", Family::V6)] {
            let _ = write!(
                out,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: svc-{i}-{suffix}, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
                 addressType: {}\nports: [{{name: echo, port: {ECHO_PORT}}}, \
                 {{name: echo-udp, port: {ECHO_PORT}, protocol: UDP}}]\nendpoints:\n",
                match family {
                    Family::V4 => "IPv4",
                    Family::V6 => "IPv6",
                }
            );
            for p in 0..BACKENDS {
                let _ = writeln!(
                    out,
                    "- {{addresses: [\"{}\"], conditions: {{ready: true}}}}",
                    family.pod_ip(p)
                );
            }
        }
    }
    out
}

/// The control plane's Services, unchanged since its targets were set: IPv4 Services (port
/// 80/TCP → targetPort `echo`), each with one slice of all pods on the echo port.
///
/// Endpoint changes replace a Service's last endpoint: [`Replaced`] holds, by Service index, the
/// address that endpoint has instead of its pod's.
pub type Replaced = std::collections::BTreeMap<usize, Ipv4Addr>;

/// The endpoints of Service `index`: every pod, the last one as `replaced` says.
fn ipv4_endpoints(index: usize, replaced: &Replaced) -> impl Iterator<Item = Ipv4Addr> + '_ {
    (0..BACKENDS).map(move |p| match replaced.get(&index) {
        Some(&ip) if p == BACKENDS - 1 => ip,
        _ => pod_ip(p),
    })
}

/// The `change`th endpoint change of the control-plane bench among `count` Services: which
/// Service (a different one each time while there are enough: 37 is coprime to the scales) and
/// the address its last endpoint gets (a new one each time, outside the pods' addresses).
pub fn endpoint_change(change: usize, count: usize) -> (usize, Ipv4Addr) {
    let index = (change * 37) % count;
    (index, Ipv4Addr::new(10, 244, 2, (change % 250) as u8 + 1))
}

/// Services `range` of the control plane's as a manifest: each Service, then its slice.
pub fn ipv4_manifests(range: std::ops::Range<usize>, replaced: &Replaced) -> String {
    let mut out = String::with_capacity(range.len() * 1400);
    for i in range {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: {}, ports: [{{name: echo, port: {SERVICE_PORT}, targetPort: echo}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: echo, port: {ECHO_PORT}}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for ip in ipv4_endpoints(i, replaced) {
            let _ = writeln!(out, "- {{addresses: [{ip}], conditions: {{ready: true}}}}");
        }
    }
    out
}

/// Service `index` of [`ipv4_manifests`] as the API server would send it.
pub fn ipv4_api_service(index: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{index}"), "namespace": "bench"},
           "spec": {"clusterIP": cluster_ip(index).to_string(),
                    "ports": [{"name": "echo", "port": SERVICE_PORT, "targetPort": "echo", "protocol": "TCP"}]}})
}

/// Service `index`'s slice of [`ipv4_manifests`] as the API server would send it.
pub fn ipv4_api_slice(index: usize, replaced: &Replaced) -> Value {
    let endpoints: Vec<Value> = ipv4_endpoints(index, replaced)
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("svc-{index}-a"), "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": format!("svc-{index}")}},
           "addressType": "IPv4",
           "ports": [{"name": "echo", "port": ECHO_PORT, "protocol": "TCP"}],
           "endpoints": endpoints})
}

/// Rules [`iptables_rules`] makes for `count` Services.
pub fn iptables_rule_count(count: usize) -> usize {
    1 + count * (1 + 3 * BACKENDS as usize)
}

/// kube-proxy's iptables shape for the IPv4 TCP frontends of `count` Services (its
/// `iptables-save` layout, nat table).
pub fn iptables_rules(count: usize) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
    let mut rules = String::from(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for i in 0..count {
        let svc = format!("KUBE-SVC-{:016X}", hash(&format!("svc-{i}")));
        let name = format!("bench/svc-{i}:echo");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {SERVICE_PORT} -j {svc}",
            cluster_ip(i)
        );
        for p in 0..BACKENDS {
            let sep = format!("KUBE-SEP-{:016X}", hash(&format!("svc-{i}-{p}")));
            let pod = pod_ip(p);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let remaining = BACKENDS - p;
            let statistic = if remaining > 1 {
                format!(
                    "-m statistic --mode random --probability {:.11} ",
                    1.0 / f64::from(remaining)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {pod}:{ECHO_PORT}\" {statistic}-j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {pod}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {pod}:{ECHO_PORT}"
            );
        }
    }
    chains + &rules + "COMMIT\n"
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_stay_in_the_service_cidrs() {
        assert_eq!(cluster_ip6(0).to_string(), "fd00:96::1");
        assert_eq!(cluster_ip6(9_999).to_string(), "fd00:96::2710");
        assert_eq!(cluster_ip(9_999), Ipv4Addr::new(10, 96, 39, 250));
        assert_eq!(Family::V6.pod_ip(0).to_string(), "fd00:244:1::1");
    }

    #[test]
    fn a_dual_stack_service_has_two_ports_and_two_slices() {
        let yaml = dual_stack_manifests(1);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 2);
        assert!(yaml.contains("clusterIPs: [10.96.0.1, \"fd00:96::1\"]"));
        assert!(yaml.contains("protocol: UDP, targetPort: echo-udp"));
        assert!(yaml.contains("addressType: IPv6"));
        assert!(yaml.contains("[\"fd00:244:1::a\"]"));
    }

    #[test]
    fn an_endpoint_change_replaces_the_last_endpoint_of_one_service() {
        let (index, ip) = endpoint_change(3, 10_000);
        assert_eq!((index, ip), (111, Ipv4Addr::new(10, 244, 2, 4)));
        let replaced = Replaced::from([(index, ip)]);
        let yaml = ipv4_manifests(110..112, &replaced);
        assert_eq!(yaml.matches("kind: EndpointSlice").count(), 2);
        assert_eq!(yaml.matches("10.244.1.10]").count(), 1, "{yaml}");
        assert!(yaml.ends_with("- {addresses: [10.244.2.4], conditions: {ready: true}}\n"));
        let slice = ipv4_api_slice(index, &replaced);
        assert_eq!(slice["endpoints"][9]["addresses"][0], "10.244.2.4");
        assert_eq!(
            ipv4_api_slice(110, &replaced)["endpoints"][9]["addresses"][0],
            "10.244.1.10"
        );
    }
}
