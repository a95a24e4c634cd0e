//! Table tests: each case in `testdata/translate.yaml` lists Kubernetes objects and the frontends
//! (`ClusterIP:port/PROTO` → `service` and `backends`) and problems (`Kind ns/name: field`) that
//! [`translate`] must produce from them, exactly.

use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Deserialize;

use super::translate;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    objects: Vec<serde_yaml::Value>,
    #[serde(default)]
    expect: BTreeMap<String, ExpectedFrontend>,
    #[serde(default)]
    problems: Vec<String>,
}

#[derive(Deserialize, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct ExpectedFrontend {
    service: String,
    backends: Vec<String>,
}

#[test]
fn translate_table() {
    let cases: Vec<Case> = serde_yaml::from_str(include_str!("testdata/translate.yaml"))
        .expect("testdata/translate.yaml parses");
    assert!(cases.len() >= 10, "the table lost its cases");

    let mut failures = Vec::new();
    for case in &cases {
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for object in &case.objects {
            match object["kind"].as_str() {
                Some("Service") => services.push(
                    serde_yaml::from_value::<Service>(object.clone())
                        .unwrap_or_else(|e| panic!("{}: bad Service in case: {e}", case.name)),
                ),
                Some("EndpointSlice") => slices.push(
                    serde_yaml::from_value::<EndpointSlice>(object.clone())
                        .unwrap_or_else(|e| panic!("{}: bad slice in case: {e}", case.name)),
                ),
                other => panic!("{}: unexpected kind {other:?}", case.name),
            }
        }

        let translation = translate(&services, &slices);
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
    let svc: Service = serde_yaml::from_str(
        "metadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 70000}]}",
    )
    .unwrap();
    let translation = translate([&svc], []);
    assert_eq!(
        translation.problems[0].to_string(),
        "Service shop/web: spec.ports[0].port: 70000 is not a port number (1-65535)"
    );
}

#[test]
fn too_large_slice_is_skipped_and_the_rest_of_the_service_kept() {
    let svc: Service = serde_yaml::from_str(
        "metadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
    )
    .unwrap();
    let slice = |name: &str, count: usize| -> EndpointSlice {
        let endpoints: Vec<String> = (0..count)
            .map(|i| format!("{{addresses: [10.{}.{}.1]}}", i / 256, i % 256))
            .collect();
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]",
            endpoints.join(",")
        ))
        .unwrap()
    };
    let (huge, small) = (slice("web-huge", 1001), slice("web-small", 2));
    let translation = translate([&svc], [&huge, &small]);

    let frontend = translation.state.frontends.values().next().unwrap();
    assert_eq!(frontend.backends.len(), 2, "the valid slice still counts");
    assert_eq!(translation.problems.len(), 1);
    assert_eq!(
        translation.problems[0].to_string(),
        "EndpointSlice shop/web-huge: endpoints: 1001 endpoints; a slice holds at most 1000"
    );
}
