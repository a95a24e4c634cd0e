//! Table tests: each case in `testdata/translate.yaml` lists Kubernetes objects and the frontends
//! (`ClusterIP:port/PROTO` → `service` and `backends`) and problems (`Kind ns/name: field`) that
//! [`translate`] must produce from them, exactly.

use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use super::{NodeContext, translate};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    objects: Vec<yaml_serde::Value>,
    #[serde(default)]
    expect: BTreeMap<String, ExpectedFrontend>,
    #[serde(default)]
    problems: Vec<String>,
    /// The node the model runs on.
    #[serde(default)]
    node: NodeSpec,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeSpec {
    name: Option<String>,
    zone: Option<String>,
    service_proxy_name: Option<String>,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct ExpectedFrontend {
    service: String,
    backends: Vec<String>,
    /// Session affinity's timeout in seconds; absent: none.
    #[serde(default)]
    affinity: Option<u32>,
}

#[test]
fn translate_table() {
    let cases: Vec<Case> = yaml_serde::from_str(include_str!("testdata/translate.yaml"))
        .expect("testdata/translate.yaml parses");
    assert!(cases.len() >= 10, "the table lost its cases");

    let mut failures = Vec::new();
    for case in &cases {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for object in &case.objects {
            match object["kind"].as_str() {
                Some("Service") => services.push(
                    yaml_serde::from_value::<Service>(object.clone())
                        .unwrap_or_else(|e| panic!("{}: bad Service in case: {e}", case.name)),
                ),
                Some("EndpointSlice") => slices.push(
                    yaml_serde::from_value::<EndpointSlice>(object.clone())
                        .unwrap_or_else(|e| panic!("{}: bad slice in case: {e}", case.name)),
                ),
                other => panic!("{}: unexpected kind {other:?}", case.name),
            }
        }

        let node = NodeContext {
            name: case.node.name.clone(),
            zone: case.node.zone.clone(),
            service_proxy_name: case.node.service_proxy_name.clone(),
        };
        let translation = translate(&services, &slices, &node);
        let got: BTreeMap<String, ExpectedFrontend> = translation
            .state
            .frontends
            .iter()
            .map(|(frontend, state)| {
                (
                    frontend.to_string(),
                    ExpectedFrontend {
                        service: state.service.to_string(),
                        backends: state.backends.iter().map(ToString::to_string).collect(),
                        affinity: state.affinity_timeout_s,
                    },
                )
            })
            .collect();
        let got_problems: Vec<String> = translation
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.field))
            .collect();

        if got != case.expect {
            failures.push(format!(
                "{}:\n  expected {:#?}\n  got      {:#?}",
                case.name, case.expect, got
            ));
        }
        if got_problems != case.problems {
            failures.push(format!(
                "{}: problems\n  expected {:?}\n  got      {:?}\n  messages {:?}",
                case.name,
                case.problems,
                got_problems,
                translation
                    .problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn problems_say_what_is_wrong() {
    let svc: Service = yaml_serde::from_str(
        "metadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 70000}]}",
    )
    .unwrap();
    let translation = translate([&svc], [], &NodeContext::default());
    assert_eq!(
        translation.problems[0].to_string(),
        "Service shop/web: spec.ports[0].port: 70000 is not a port number (1-65535)"
    );
}

#[test]
fn too_large_slice_is_skipped_and_the_rest_of_the_service_kept() {
    let svc: Service = yaml_serde::from_str(
        "metadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
    )
    .unwrap();
    let slice = |name: &str, count: usize| -> EndpointSlice {
        let endpoints: Vec<String> = (0..count)
            .map(|i| format!("{{addresses: [10.{}.{}.1]}}", i / 256, i % 256))
            .collect();
        yaml_serde::from_str(&format!(
            "metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap()
    };
    let (huge, small) = (slice("web-huge", 1001), slice("web-small", 2));
    let translation = translate([&svc], [&huge, &small], &NodeContext::default());

    let frontend = translation.state.frontends.values().next().unwrap();
    assert_eq!(frontend.backends.len(), 2, "the valid slice still counts");
    assert_eq!(translation.problems.len(), 1);
    assert_eq!(
        translation.problems[0].to_string(),
        "EndpointSlice shop/web-huge: endpoints: 1001 endpoints; a slice holds at most 1000"
    );
}

/// The real API server's lists, per node, against `testdata/fixtures.yaml`.
#[test]
fn real_api_server_objects_per_node() {
    #[derive(Deserialize)]
    struct Expected {
        nodes: Vec<NodeCase>,
    }
    #[derive(Deserialize)]
    struct NodeCase {
        node: NodeSpec,
        expect: BTreeMap<String, ExpectedFrontend>,
    }
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/k8s-api");
    let list = |file: &str| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(format!("{fixtures}/{file}")).unwrap();
        let list: serde_json::Value = serde_json::from_str(&text).unwrap();
        list["items"].as_array().unwrap().clone()
    };
    let services: Vec<Service> = list("services-list.json")
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let slices: Vec<EndpointSlice> = list("endpointslices-list.json")
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(
        (services.len(), slices.len()),
        (9, 7),
        "the capture changed"
    );

    let mut expected: yaml_serde::Value =
        yaml_serde::from_str(include_str!("testdata/fixtures.yaml")).unwrap();
    expected.apply_merge().unwrap(); // the file shares entries with `<<: *common`
    let expected: Expected = yaml_serde::from_value(expected).unwrap();
    for case in expected.nodes {
        let node = NodeContext {
            name: case.node.name.clone(),
            zone: case.node.zone.clone(),
            service_proxy_name: None,
        };
        let translation = translate(&services, &slices, &node);
        assert!(
            translation.problems.is_empty(),
            "{:?}",
            translation.problems
        );
        let got: BTreeMap<String, ExpectedFrontend> = translation
            .state
            .frontends
            .iter()
            .map(|(f, s)| {
                let backends = s.backends.iter().map(ToString::to_string).collect();
                (
                    f.to_string(),
                    ExpectedFrontend {
                        service: s.service.to_string(),
                        backends,
                        affinity: s.affinity_timeout_s,
                    },
                )
            })
            .collect();
        assert_eq!(got, case.expect, "node {:?}", case.node.name);
    }
}
