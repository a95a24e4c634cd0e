//! deploy/ stays in step with the agent: the flags the DaemonSet passes exist, the probes hit the
//! health endpoints, and RBAC grants what the agent watches.

use std::{path::Path, process::Command};

use yaml_serde::Value;

fn deploy(file: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_serde::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn kustomization_lists_existing_files() {
    let kustomization = &deploy("kustomization.yaml")[0];
    for resource in kustomization["resources"].as_sequence().unwrap() {
        let file = resource.as_str().unwrap();
        assert!(!deploy(file).is_empty(), "{file} is empty");
    }
}

#[test]
fn daemonset_passes_only_flags_the_agent_has_and_probes_its_health_port() {
    let docs = deploy("daemonset.yaml");
    let container = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args[0], "run");

    let agent = xtask::testbed::agent::default_bin();
    let help = Command::new(&agent)
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build it first (`xtask/run test` does)",
                agent.display()
            )
        });
    let help = String::from_utf8_lossy(&help.stdout);
    let mut health_port = None;
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")),
            "lb-agent run has no {flag}:\n{help}"
        );
        if flag == "--health-addr" {
            health_port = arg.rsplit(':').next().and_then(|p| p.parse::<u64>().ok());
        }
    }
    assert!(
        help.contains("[env: NODE_NAME="),
        "NODE_NAME must feed --node-name:\n{help}"
    );
    let env: Vec<&str> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(env.contains(&"NODE_NAME"));

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path));
        assert_eq!(get["port"].as_u64(), health_port, "{probe} port");
    }
    assert_eq!(
        container["securityContext"]["privileged"].as_bool(),
        Some(true)
    );
    // Beside kube-proxy on a hostNetwork node: none of its ports (healthz, metrics).
    assert!(
        !matches!(health_port, Some(10256 | 10249)),
        "--health-addr takes kube-proxy's port {health_port:?}"
    );
    // Sockets to removed backends are ended in the namespaces of the node's processes, which
    // the agent finds through /proc: the host's PID namespace.
    let pod = &kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true));
    assert!(!args.contains(&"--destroy-sockets=false"));
}

#[test]
fn rbac_grants_every_watch_the_agent_makes() {
    let docs = deploy("rbac.yaml");
    let role = kind(&docs, "ClusterRole");
    let allows = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_sequence().unwrap().iter().any(|rule| {
            let has = |field: &str, want: &str| {
                rule[field]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|v| v.as_str() == Some(want))
            };
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for (group, resource) in [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ] {
        for verb in ["list", "watch"] {
            assert!(
                allows(group, resource, verb),
                "{verb} {resource} is not granted"
            );
        }
    }
    // And nothing else: no other resource or verb, no wildcard, no URL.
    for rule in role["rules"].as_sequence().unwrap() {
        let list = |field: &str| -> Vec<&str> {
            rule[field]
                .as_sequence()
                .map(|s| s.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default()
        };
        assert!(
            rule["nonResourceURLs"].is_null() && rule["resourceNames"].is_null(),
            "{rule:?}"
        );
        for group in list("apiGroups") {
            for resource in list("resources") {
                assert!(
                    matches!(
                        (group, resource),
                        ("", "services" | "nodes") | ("discovery.k8s.io", "endpointslices")
                    ),
                    "the ClusterRole grants {resource} in {group:?}"
                );
            }
        }
        for verb in list("verbs") {
            assert!(
                matches!(verb, "get" | "list" | "watch"),
                "the ClusterRole grants {verb}"
            );
        }
    }
    let binding = kind(&docs, "ClusterRoleBinding");
    let account = kind(&docs, "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    let daemonset = &deploy("daemonset.yaml")[0];
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
}
