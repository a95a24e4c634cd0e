//! The bad-input corpus (`lb-agent/tests/bad_input/`) dropped all at once into a running agent:
//! first into its manifest directory, then through the stand-in API server. For each source: every
//! case's error, naming its object and field, is in the agent's log; none names a good Service;
//! `lb-agent list -o json` shows the good Services' frontends exactly as before and each case's own
//! as the case says; the agent is still running and ready. The library test
//! (`lb-agent/tests/bad_input.rs`) runs the cases one by one, with the pending ones; this one leaves
//! those out, and runs the rest together, as a user's directory would hold them.

use std::{collections::BTreeSet, net::IpAddr, path::Path, thread, time::Duration};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use xtask::testbed::{
    Testbed,
    agent::http_status,
    fake_api::{ENDPOINT_SLICES, FakeApi, SERVICES},
};

#[path = "../../../lb-agent/tests/bad_input/corpus.rs"]
mod corpus;

use corpus::{Case, Frontends, Good};

/// How long the agent may take to read, report and program the whole corpus (a debug build reads
/// its 4 MB files slowly).
const TIMEOUT: Duration = Duration::from_secs(30);

fn load() -> anyhow::Result<(Good, Vec<Case>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-agent/tests/bad_input");
    corpus::load(&root).map_err(anyhow::Error::msg)
}

/// The maps, through `lb-agent list -o json` (the agent's own schema), in the corpus's notation.
fn frontends(tb: &Testbed) -> anyhow::Result<Frontends> {
    let listing = tb.listing()?;
    let mut out = Frontends::new();
    for row in listing.frontends {
        let (s, f) = (&row.service, &row.frontend);
        let address: IpAddr = f.address.parse()?;
        let mut backends = Vec::new();
        for b in &row.backends {
            backends.push(corpus::backend(b.address.parse()?, b.port));
        }
        backends.sort();
        out.insert(
            corpus::frontend(address, f.port, &f.protocol),
            (
                corpus::service_port(&s.namespace, &s.name, &s.port),
                backends,
            ),
        );
    }
    Ok(out)
}

/// The good Services are programmed exactly as `good.yaml` says.
fn check_good(good: &Good, now: &Frontends) -> anyhow::Result<()> {
    let good_now: Frontends = now
        .iter()
        .filter(|(f, _)| good.serves.contains_key(*f))
        .map(|(f, s)| (f.clone(), s.clone()))
        .collect();
    ensure!(
        good_now == good.serves,
        "the good Services at the start:\n{}",
        corpus::diff(&good.serves, &good_now)
    );
    Ok(())
}

/// What is still missing: expected errors not in the log lines, and the frontends' differences.
fn findings(cases: &[&Case], lines: &[String], expected: &Frontends, now: &Frontends) -> String {
    let mut out = Vec::new();
    for case in cases {
        let file = case.file_name();
        for expect in &case.expect {
            if !lines.iter().any(|l| expect.matches(l, &file)) {
                out.push(format!("{}: no error in the log names {expect}", case.name));
            }
        }
    }
    if now != expected {
        out.push(format!(
            "frontends (good.yaml's and every case's `serves`):\n{}",
            corpus::diff(expected, now)
        ));
    }
    out.join("\n")
}

/// Waits until every case's errors are logged (after line `mark`) and the maps hold `expected`;
/// then checks that no error names a good Service and the agent is running and ready.
fn wait_for_corpus(
    tb: &mut Testbed,
    cases: &[&Case],
    mark: usize,
    expected: &Frontends,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        ensure!(tb.agent().is_running(), "the agent stopped on bad input");
        let lines: Vec<String> = tb.agent().lines().split_off(mark);
        let missing = findings(cases, &lines, expected, &frontends(tb)?);
        if missing.is_empty() {
            let about_good: Vec<&String> = lines
                .iter()
                .filter(|l| {
                    ["Service good/", "Service good-2/", "good.yaml"]
                        .iter()
                        .any(|g| l.contains(g))
                })
                .collect();
            ensure!(
                about_good.is_empty(),
                "errors about good Services: {about_good:#?}"
            );
            break;
        }
        if std::time::Instant::now() >= deadline {
            bail!("after {TIMEOUT:?}:\n{missing}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let health = tb.agent().health_addr();
    ensure!(http_status(health, "/readyz")? == 200, "no longer ready");
    Ok(())
}

/// The good Services' frontends and every case's.
fn expected(good: &Good, cases: &[&Case]) -> Frontends {
    let mut all = good.serves.clone();
    for case in cases {
        all.extend(case.serves.clone());
    }
    all
}

/// Writes a manifest atomically (a dot-file renamed into place), bytes and all.
fn write(tb: &Testbed, name: &str, content: &[u8]) -> anyhow::Result<()> {
    let tmp = tb.manifests_dir().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, tb.manifests_dir().join(name))?;
    Ok(())
}

pub fn corpus() -> anyhow::Result<()> {
    let (good, cases) = load()?;
    let ready: Vec<&Case> = cases.iter().filter(|c| c.pending.is_none()).collect();
    through_manifests(&good, &ready)?;
    through_api(&good, &ready)
}

fn through_manifests(good: &Good, cases: &[&Case]) -> anyhow::Result<()> {
    let cases: Vec<&Case> = cases.iter().copied().filter(|c| c.manifest).collect();
    let mut tb = super::testbed(&[])?;
    tb.write_manifest("good.yaml", &good.text)?;
    for case in &cases {
        if let Some(before) = &case.before {
            tb.write_manifest(&case.file_name(), before)?;
        }
    }
    tb.start_agent()?;
    check_good(good, &frontends(&tb)?)?;

    let mark = tb.agent().mark();
    let started = std::time::Instant::now();
    for case in &cases {
        write(&tb, &case.file_name(), &case.content)?;
    }
    wait_for_corpus(&mut tb, &cases, mark, &expected(good, &cases)).context("manifest files")?;
    eprintln!(
        "manifest files: {} cases reported and programmed in {:?}",
        cases.len(),
        started.elapsed()
    );
    Ok(())
}

/// Kind, namespace and name: the API server's identity of an object.
type Key = (String, String, String);

fn resource(object: &Value) -> &'static str {
    match object["kind"].as_str() {
        Some("Service") => SERVICES,
        _ => ENDPOINT_SLICES,
    }
}

/// A case's objects as the API serves them; the agent watches only its own Node, so Nodes are left
/// out (their cases then have nothing left to send).
fn api_objects(text: &str) -> anyhow::Result<Vec<Value>> {
    Ok(corpus::api_objects(text)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|o| o["kind"] != "Node")
        .collect())
}

fn through_api(good: &Good, cases: &[&Case]) -> anyhow::Result<()> {
    let mut sent = Vec::new();
    let mut changes: Vec<(Key, &'static str, Value)> = Vec::new();
    let api = FakeApi::start()?;
    for object in api_objects(&good.text)? {
        api.put(resource(&object), object);
    }
    for case in cases.iter().filter(|c| c.api) {
        let text = case.text().context("an API case that is not text")?;
        let objects = api_objects(text)?;
        if objects.is_empty() {
            continue;
        }
        let before = api_objects(case.before.as_deref().unwrap_or_default())?;
        let keys: BTreeSet<Key> = objects.iter().map(corpus::object_key).collect();
        for object in &before {
            api.put(resource(object), object.clone());
            if !keys.contains(&corpus::object_key(object)) {
                changes.push((corpus::object_key(object), "DELETED", object.clone()));
            }
        }
        let had: BTreeSet<Key> = before.iter().map(corpus::object_key).collect();
        for object in objects {
            let kind = if had.contains(&corpus::object_key(&object)) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            changes.push((corpus::object_key(&object), kind, object));
        }
        sent.push(*case);
    }
    // A Service that goes while nobody watches: once it is gone from the maps, the agent has
    // taken a re-list holding every case's objects.
    let marker = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "marker", "namespace": "bad-input-e2e"},
        "spec": {"clusterIP": "10.96.0.99", "ports": [{"name": "http", "port": 80}]}});
    api.put(SERVICES, marker);

    let mut tb = super::testbed(&[])?;
    tb.use_api(&api, None)?;
    tb.start_agent()?;
    let start = frontends(&tb)?;
    check_good(good, &start)?;
    ensure!(
        start.contains_key("10.96.0.99:80/TCP"),
        "the marker Service is not programmed: {start:#?}"
    );

    let mark = tb.agent().mark();
    let started = std::time::Instant::now();
    for (_, kind, object) in &changes {
        api.push_event(resource(object), &json!({"type": kind, "object": object}));
    }
    let mut expected = expected(good, &sent);
    expected.insert(
        "10.96.0.99:80/TCP".into(),
        ("bad-input-e2e/marker:http".into(), Vec::new()),
    );
    wait_for_corpus(&mut tb, &sent, mark, &expected).context("API watch events")?;
    let watched = started.elapsed();

    // The watches drop and the server has compacted past them (410): the agent re-lists, and the
    // lists hold every malformed object at once.
    api.remove(SERVICES, "bad-input-e2e", "marker");
    api.expire_next_watch(SERVICES);
    api.expire_next_watch(ENDPOINT_SLICES);
    api.drop_watches();
    expected.remove("10.96.0.99:80/TCP");
    let started = std::time::Instant::now();
    let deadline = started + TIMEOUT;
    loop {
        ensure!(tb.agent().is_running(), "the agent stopped on a re-list");
        let now = frontends(&tb)?;
        if now == expected {
            break;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "after the re-list, within {TIMEOUT:?}:\n{}",
                corpus::diff(&expected, &now)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    let health = tb.agent().health_addr();
    ensure!(http_status(health, "/readyz")? == 200, "no longer ready");
    eprintln!(
        "API: {} cases, {} watch events, reported and programmed in {watched:?}; re-listed in {:?}",
        sent.len(),
        changes.len(),
        started.elapsed()
    );
    Ok(())
}
