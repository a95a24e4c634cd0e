//! The bad-input corpus (`tests/bad_input/`), fed through both sources into the model the way the
//! agent feeds it: manifest files through [`ManifestSource`]; API objects through kube-client's own
//! deserialization (a watch event, and a list page) and [`KubeFeed`]. Each case starts from the
//! good Services (and its own previous version, if it has one), then its file is written, or its
//! objects arrive. For each case and each source:
//! - the errors are exactly the ones the case expects, each naming its object and field (or the
//!   file, when no object can be named), and none is reported twice;
//! - nothing panics, and the manifest source still has a complete view (the agent stays ready);
//! - the frontends are exactly the good Services' and the case's own: nothing else moved.
//!
//! A case marked `pending` (a known bug, or left for a later issue) must still fail: whoever fixes
//! it is told to remove the mark.

#[path = "bad_input/corpus.rs"]
mod corpus;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use corpus::{Case, Frontends, Good};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    core::{ObjectList, WatchEvent},
    runtime::watcher,
};
use lb_agent::{
    model::{Cluster, Event, NodeContext, Problem},
    source::{
        kube::{Change, KubeFeed, Lenient},
        manifest::ManifestSource,
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn load() -> (Good, Vec<Case>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_input");
    corpus::load(&root).unwrap_or_else(|e| panic!("the corpus: {e}"))
}

/// What a source made of a case.
struct Outcome {
    /// Every error reported, as displayed.
    errors: Vec<String>,
    /// The frontends afterwards.
    frontends: Frontends,
    /// Problems with the run itself (an error reported twice, an incomplete view).
    faults: Vec<String>,
}

fn frontends(cluster: &Cluster) -> Frontends {
    cluster
        .state()
        .frontends
        .iter()
        .map(|(f, s)| {
            let mut backends: Vec<String> = s
                .backends
                .iter()
                .map(|b| corpus::backend(b.address, b.port))
                .collect();
            backends.sort();
            let service =
                corpus::service_port(&s.service.namespace, &s.service.name, &s.service.port);
            (
                corpus::frontend(f.address, f.port, f.protocol.as_str()),
                (service, backends),
            )
        })
        .collect()
}

fn shown(problems: &[Problem]) -> Vec<String> {
    problems.iter().map(ToString::to_string).collect()
}

/// The good Services and the case's previous version must load without a word, and give the good
/// frontends exactly.
fn check_start(good: &Good, errors: &[String], start: &Frontends) -> Result<(), String> {
    if !errors.is_empty() {
        return Err(format!(
            "good.yaml or the case's .before.yaml reported errors: {errors:#?}"
        ));
    }
    let good_now: Frontends = start
        .iter()
        .filter(|(f, _)| good.serves.contains_key(*f))
        .map(|(f, s)| (f.clone(), s.clone()))
        .collect();
    if good_now != good.serves {
        return Err(format!(
            "the good Services at the start:\n{}",
            corpus::diff(&good.serves, &good_now)
        ));
    }
    Ok(())
}

// --- Manifest files.

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("lb-bad-input-{name}-"))
            .tempdir()
            .unwrap();
        Self(dir)
    }

    /// Writes atomically, as the README asks: a dot-file renamed into place.
    fn write(&self, name: &str, content: &[u8]) {
        let tmp = self.0.path().join(format!(".{name}.tmp"));
        fs::write(&tmp, content).unwrap();
        fs::rename(tmp, self.0.path().join(name)).unwrap();
    }
}

fn through_manifests(good: &Good, case: &Case) -> Result<Outcome, String> {
    let dir = TempDir::new(&case.name);
    dir.write("good.yaml", good.text.as_bytes());
    if let Some(before) = &case.before {
        dir.write(&case.file_name(), before.as_bytes());
    }
    let mut source = ManifestSource::new(dir.0.path(), None).map_err(|e| format!("{e:#}"))?;
    let mut cluster = Cluster::new(NodeContext::default());
    let poll = source.poll();
    let mut errors: Vec<String> = poll.errors.iter().map(ToString::to_string).collect();
    if !poll.complete {
        errors.push("not complete".into());
    }
    poll.events.into_iter().for_each(|e| cluster.apply(e));
    errors.extend(shown(&cluster.sync().problems));
    check_start(good, &errors, &frontends(&cluster))?;

    dir.write(&case.file_name(), &case.content);
    let poll = source.poll();
    let mut errors: Vec<String> = poll.errors.iter().map(ToString::to_string).collect();
    errors.extend(poll.listing_error);
    let mut faults = Vec::new();
    if poll.files_read != 1 {
        faults.push(format!("{} files read, not the 1 written", poll.files_read));
    }
    poll.events.into_iter().for_each(|e| cluster.apply(e));
    errors.extend(shown(&cluster.sync().problems));

    // Nothing more happens at the next poll: each error is reported once per change.
    let again = source.poll();
    if !again.errors.is_empty() || !again.events.is_empty() {
        faults.push(format!(
            "the next poll reported again: {:?}, {} events",
            again
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            again.events.len()
        ));
    }
    if !again.complete {
        faults.push(
            "the manifest source no longer has a complete view (an agent starting now would \
             never be ready)"
                .into(),
        );
    }
    Ok(Outcome {
        errors,
        frontends: frontends(&cluster),
        faults,
    })
}

// --- The Kubernetes API.

/// A list page of `objects`, read the way kube-client reads one.
fn list_page<K: DeserializeOwned + Clone>(objects: &[&Value]) -> Result<Vec<Lenient<K>>, String> {
    let text = json!({"metadata": {"resourceVersion": "1"}, "items": objects}).to_string();
    serde_json::from_str::<ObjectList<Lenient<K>>>(&text)
        .map(|list| list.items)
        .map_err(|e| format!("the list page failed to deserialize: {e}"))
}

/// A watch event line, read the way kube-client reads one.
fn watch_line<K: DeserializeOwned + Clone>(
    kind: &str,
    object: &Value,
) -> Result<watcher::Event<Lenient<K>>, String> {
    let line = json!({"type": kind, "object": object}).to_string();
    match serde_json::from_str::<WatchEvent<Lenient<K>>>(&line) {
        Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => Ok(watcher::Event::Apply(o)),
        Ok(WatchEvent::Deleted(o)) => Ok(watcher::Event::Delete(o)),
        Ok(other) => Err(format!("unexpected watch event {other:?}")),
        Err(e) => Err(format!("the watch event failed to deserialize: {e}")),
    }
}

/// A complete list of each kind, as the watcher delivers it after a (re-)list.
fn relist(objects: &[Value]) -> Result<Vec<Change>, String> {
    let of = |kind: &str| -> Vec<&Value> {
        objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    };
    fn framed<K>(items: Vec<Lenient<K>>) -> Vec<watcher::Event<Lenient<K>>> {
        let mut events = vec![watcher::Event::Init];
        events.extend(items.into_iter().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        events
    }
    let mut changes = Vec::new();
    for event in framed(list_page::<Service>(&of("Service"))?) {
        changes.push(Change::Services(Box::new(event)));
    }
    for event in framed(list_page::<EndpointSlice>(&of("EndpointSlice"))?) {
        changes.push(Change::EndpointSlices(Box::new(event)));
    }
    for event in framed(list_page::<Node>(&of("Node"))?) {
        changes.push(Change::Node(Box::new(event)));
    }
    Ok(changes)
}

fn watch_change(kind: &str, object: &Value) -> Result<Change, String> {
    Ok(match object["kind"].as_str() {
        Some("Service") => Change::Services(Box::new(watch_line(kind, object)?)),
        Some("EndpointSlice") => Change::EndpointSlices(Box::new(watch_line(kind, object)?)),
        _ => Change::Node(Box::new(watch_line(kind, object)?)),
    })
}

#[derive(Clone, Copy, Debug)]
enum ApiPath {
    /// The case's objects arrive as watch events (ADDED, MODIFIED; DELETED for objects only its
    /// previous version had).
    Watch,
    /// The case's objects arrive in a re-list (after a 410 Expired, say) with the good ones.
    List,
}

fn through_api(good: &Good, case: &Case, path: ApiPath) -> Result<Outcome, String> {
    let text = case
        .text()
        .ok_or("not text: give the case `sources: manifest`")?;
    let objects =
        corpus::api_objects(text).map_err(|e| format!("{e}: give the case `sources: manifest`"))?;
    let good_objects = corpus::api_objects(&good.text)?;
    let before = match &case.before {
        Some(before) => corpus::api_objects(before)?,
        None => Vec::new(),
    };

    let mut feed = KubeFeed::new(true);
    let mut cluster = Cluster::new(NodeContext::default());
    let apply = |feed: &mut KubeFeed, cluster: &mut Cluster, changes: Vec<Change>| {
        let events: Vec<Event> = changes.into_iter().filter_map(|c| feed.feed(c)).collect();
        let mut errors = shown(&feed.take_problems());
        events.into_iter().for_each(|e| cluster.apply(e));
        errors.extend(shown(&cluster.sync().problems));
        errors
    };
    let start: Vec<Value> = good_objects.iter().chain(&before).cloned().collect();
    let errors = apply(&mut feed, &mut cluster, relist(&start)?);
    if !feed.synced() {
        return Err("the initial lists did not sync the feed".into());
    }
    check_start(good, &errors, &frontends(&cluster))?;

    let changes = match path {
        ApiPath::Watch => {
            let keys: BTreeSet<_> = objects.iter().map(corpus::object_key).collect();
            let mut changes = Vec::new();
            for object in &before {
                if !keys.contains(&corpus::object_key(object)) {
                    changes.push(watch_change("DELETED", object)?);
                }
            }
            for object in &objects {
                changes.push(watch_change("MODIFIED", object)?);
            }
            changes
        }
        ApiPath::List => {
            let all: Vec<Value> = good_objects.iter().chain(&objects).cloned().collect();
            relist(&all)?
        }
    };
    let errors = apply(&mut feed, &mut cluster, changes);
    Ok(Outcome {
        errors,
        frontends: frontends(&cluster),
        faults: Vec::new(),
    })
}

// --- Judging.

/// What is wrong with an outcome; nothing when the case holds.
fn judge(good: &Good, case: &Case, outcome: &Outcome) -> Vec<String> {
    let file = case.file_name();
    let mut wrong = outcome.faults.clone();
    for expect in &case.expect {
        if !outcome.errors.iter().any(|e| expect.matches(e, &file)) {
            wrong.push(format!("no error names {expect}"));
        }
    }
    for error in &outcome.errors {
        if !case.expect.iter().any(|x| x.matches(error, &file)) {
            wrong.push(format!("unexpected error: {error}"));
        }
    }
    let mut expected = good.serves.clone();
    expected.extend(case.serves.clone());
    if outcome.frontends != expected {
        wrong.push(format!(
            "frontends (good.yaml's and the case's `serves`):\n{}",
            corpus::diff(&expected, &outcome.frontends)
        ));
    }
    wrong
}

/// Runs every case of `source` and fails with a report of all that do not hold (and of the pending
/// ones that now do).
fn run(
    source: &str,
    applies: fn(&Case) -> bool,
    through: impl Fn(&Good, &Case) -> Result<Outcome, String>,
) {
    let (good, cases) = load();
    let mut report = Vec::new();
    let mut ran = 0;
    for case in cases.iter().filter(|c| applies(c)) {
        ran += 1;
        let name = format!("{}/{}", case.category, case.name);
        let wrong = match through(&good, case) {
            Ok(outcome) => {
                // LB_CORPUS_SHOW=1 (with --nocapture) shows what a user would read for each case.
                if std::env::var_os("LB_CORPUS_SHOW").is_some() {
                    eprintln!("{source}: {name}");
                    for error in &outcome.errors {
                        eprintln!("    {}", error.chars().take(300).collect::<String>());
                    }
                }
                judge(&good, case, &outcome)
            }
            Err(e) => vec![format!("could not run: {e}")],
        };
        match (&case.pending, wrong.is_empty()) {
            (None, false) => {
                report.push(format!("{name}: {}\n  {}", case.title, wrong.join("\n  ")))
            }
            (Some(why), true) => report.push(format!(
                "{name} holds now: remove its `pending: {why}` line"
            )),
            _ => {}
        }
    }
    assert!(ran > 0, "no case for {source}");
    assert!(
        report.is_empty(),
        "{} of {ran} cases through {source}:\n\n{}",
        report.len(),
        report.join("\n\n")
    );
}

#[test]
fn every_case_through_manifest_files() {
    run("manifest files", |c| c.manifest, through_manifests);
}

#[test]
fn every_case_through_api_watch_events() {
    run(
        "API watch events",
        |c| c.api,
        |g, c| through_api(g, c, ApiPath::Watch),
    );
}

#[test]
fn every_case_through_an_api_relist() {
    run(
        "an API re-list",
        |c| c.api,
        |g, c| through_api(g, c, ApiPath::List),
    );
}

#[test]
fn the_corpus_has_at_least_100_independent_cases() {
    let (_, cases) = load();
    let mut by_category: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        *by_category.entry(&case.category).or_default() += 1;
        assert!(case.manifest || case.api, "{}: no source", case.name);
        // Its objects are its own: in its namespace, or named after it when cluster-scoped or in
        // `default`, so that all cases can be dropped in at once.
        let Some(objects) = case.text().and_then(|t| corpus::api_objects(t).ok()) else {
            continue;
        };
        for object in objects {
            let (kind, namespace, name) = corpus::object_key(&object);
            let own = match namespace.to_lowercase().as_str() {
                _ if name.is_empty() => true, // nothing can refer to it
                "" | "default" => name.starts_with(&case.name),
                ns => ns.starts_with(&case.name),
            };
            assert!(
                own,
                "{}: {kind} {namespace}/{name} is not the case's own",
                case.name
            );
        }
    }
    eprintln!("{} cases: {by_category:?}", cases.len());
    assert!(cases.len() >= 100, "{} cases", cases.len());
}
