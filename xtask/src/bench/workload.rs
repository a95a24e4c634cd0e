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

/// The control plane's Services, unchanged since its targets were set: `count` IPv4 Services
/// (port 80/TCP → targetPort `echo`), each with a slice of all pods on the echo port.
pub fn ipv4_manifests(count: usize) -> String {
    let mut out = String::with_capacity(count * 1400);
    for i in 0..count {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
             spec: {{clusterIP: {}, ports: [{{name: echo, port: {SERVICE_PORT}, targetPort: echo}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: svc-{i}-a, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
             addressType: IPv4\nports: [{{name: echo, port: {ECHO_PORT}}}]\nendpoints:\n",
            cluster_ip(i)
        );
        for p in 0..BACKENDS {
            let _ = writeln!(
                out,
                "- {{addresses: [{}], conditions: {{ready: true}}}}",
                pod_ip(p)
            );
        }
    }
    out
}

/// [`ipv4_manifests`] as the API server would send them.
pub fn ipv4_api_objects(count: usize) -> (Vec<Value>, Vec<Value>) {
    let services = (0..count)
        .map(|i| {
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
                   "spec": {"clusterIP": cluster_ip(i).to_string(),
                            "ports": [{"name": "echo", "port": SERVICE_PORT, "targetPort": "echo", "protocol": "TCP"}]}})
        })
        .collect();
    let slices = (0..count)
        .map(|i| {
            let endpoints: Vec<Value> = (0..BACKENDS)
                .map(|p| json!({"addresses": [pod_ip(p).to_string()], "conditions": {"ready": true}}))
                .collect();
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": format!("svc-{i}-a"), "namespace": "bench",
                                "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                   "addressType": "IPv4",
                   "ports": [{"name": "echo", "port": ECHO_PORT, "protocol": "TCP"}],
                   "endpoints": endpoints})
        })
        .collect();
    (services, slices)
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
}
