//! Services and EndpointSlices from Kubernetes manifest files: the objects `kubectl apply -f`
//! takes (multi-document YAML or JSON, `kind: List` included), from one file or the files of a
//! directory (`*.yaml`, `*.yml`, `*.json`; not recursive; dot-files skipped, so an editor's or a
//! tool's temporary file is never read half-written).
//!
//! Bad input never takes anything away that was good: a file that does not parse keeps its
//! previous objects, and an object that does not deserialize keeps its previous version.

use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde::Deserialize as _;
use serde_yaml::Value;
use tracing::debug;

use crate::{
    model::{ObjectRef, ServiceInput, SliceInput},
    source::kube::node_zone,
};

/// A Service, EndpointSlice or Node read from a file, kept as the model keeps it.
#[derive(Clone, Debug)]
pub enum Object {
    Service(ServiceInput),
    EndpointSlice(SliceInput),
    /// A Node's zone label: with `--node-name`, this node's zone.
    Node {
        zone: Option<String>,
    },
}

/// Something in a file that could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: Option<usize>,
    pub object: Option<ObjectRef>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The objects of every file, and where each came from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub services: Vec<ServiceInput>,
    pub slices: Vec<SliceInput>,
    /// Zones of the Nodes defined, by name.
    pub zones: BTreeMap<String, Option<String>>,
    pub origins: BTreeMap<ObjectRef, PathBuf>,
    pub errors: Vec<ManifestError>,
}

/// Files' sizes and modification times: when they change, the files are read again.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

pub struct ManifestSource {
    root: PathBuf,
    /// Last good objects of each file, in file order.
    files: BTreeMap<PathBuf, Vec<(ObjectRef, Object)>>,
}

impl ManifestSource {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        fs::metadata(root).with_context(|| {
            format!(
                "manifests not found at {}: pass --manifests with a file or directory of \
                 Service and EndpointSlice manifests",
                root.display()
            )
        })?;
        Ok(Self {
            root: root.to_owned(),
            files: BTreeMap::new(),
        })
    }

    /// The manifest files, in name order.
    fn paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !self.root.is_dir() {
            return Ok(vec![self.root.clone()]);
        }
        let mut paths = Vec::new();
        for entry in
            fs::read_dir(&self.root).with_context(|| format!("listing {}", self.root.display()))?
        {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_manifest = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
            if is_manifest && !name.starts_with('.') && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths)
    }

    pub fn fingerprint(&self) -> anyhow::Result<Fingerprint> {
        let mut out = Vec::new();
        for path in self.paths()? {
            // A file removed between listing and stat simply drops out.
            if let Ok(meta) = fs::metadata(&path) {
                out.push((path, meta.len(), meta.modified().ok()));
            }
        }
        Ok(out)
    }

    /// Re-allocates the objects kept after a large load (see `Cluster::compact`).
    pub fn compact(&mut self) {
        self.files = self.files.clone();
    }

    /// Reads every file again and returns all objects.
    pub fn load(&mut self) -> anyhow::Result<Snapshot> {
        let paths = self.paths()?;
        let mut errors = Vec::new();
        self.files.retain(|p, _| paths.contains(p));
        for path in &paths {
            let previous = self.files.remove(path).unwrap_or_default();
            let objects = match fs::read_to_string(path) {
                Ok(text) => parse_file(path, &text, &previous, &mut errors),
                Err(e) => {
                    errors.push(file_error(path, format!("cannot read: {e}")));
                    previous
                }
            };
            self.files.insert(path.clone(), objects);
        }

        let mut snapshot = Snapshot {
            errors,
            ..Default::default()
        };
        // Like repeated `kubectl apply`, a later file redefining an object wins.
        let mut latest: BTreeMap<ObjectRef, (&PathBuf, &Object)> = BTreeMap::new();
        for (path, objects) in &self.files {
            for (key, object) in objects {
                if let Some((earlier, _)) = latest.insert(key.clone(), (path, object)) {
                    snapshot.errors.push(ManifestError {
                        file: path.clone(),
                        document: None,
                        object: Some(key.clone()),
                        message: format!("also defined in {}; using this one", earlier.display()),
                    });
                }
            }
        }
        for (key, (path, object)) in latest {
            match object {
                Object::Service(s) => snapshot.services.push(s.clone()),
                Object::EndpointSlice(s) => snapshot.slices.push(s.clone()),
                Object::Node { zone } => {
                    drop(snapshot.zones.insert(key.name.clone(), zone.clone()))
                }
            }
            snapshot.origins.insert(key, path.clone());
        }
        Ok(snapshot)
    }
}

fn file_error(path: &Path, message: String) -> ManifestError {
    ManifestError {
        file: path.to_owned(),
        document: None,
        object: None,
        message,
    }
}

/// Parses one file. On a syntax error the file keeps `previous`; an object that does not
/// deserialize keeps its version in `previous`, if any.
fn parse_file(
    path: &Path,
    text: &str,
    previous: &[(ObjectRef, Object)],
    errors: &mut Vec<ManifestError>,
) -> Vec<(ObjectRef, Object)> {
    // Each document is parsed into the model's form before the next is read, so a large file
    // never exists as a tree of YAML values all at once.
    let mut objects = Vec::new();
    let mut file_errors = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                let consequence = if previous.is_empty() {
                    "nothing in it is used until it parses"
                } else {
                    "keeping what this file defined before"
                };
                errors.push(file_error(
                    path,
                    format!("not valid YAML ({e}); {consequence}"),
                ));
                return previous.to_vec();
            }
        };
        let mut error = |object: Option<ObjectRef>, message: String| {
            file_errors.push(ManifestError {
                file: path.to_owned(),
                document: Some(index + 1),
                object,
                message,
            })
        };
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        let items = match value.get("kind").and_then(Value::as_str) {
            Some("List") => match value.get("items") {
                Some(Value::Sequence(items)) => items.clone(),
                _ => {
                    error(None, "kind List without an items list".into());
                    continue;
                }
            },
            _ => vec![value],
        };
        for item in items {
            match parse_object(item) {
                Ok(Some(parsed)) => objects.push(parsed),
                Ok(None) => {}
                Err((key, message)) => {
                    let kept = key
                        .as_ref()
                        .and_then(|k| previous.iter().find(|(p, _)| p == k));
                    let message = match kept {
                        Some(_) => format!("{message}; keeping its previous version"),
                        None => format!("{message}; skipped"),
                    };
                    error(key, message);
                    objects.extend(kept.cloned());
                }
            }
        }
    }
    errors.append(&mut file_errors);
    objects
}

type ObjectError = (Option<ObjectRef>, String);

/// One object: `Ok(None)` for kinds lb does not use.
fn parse_object(value: Value) -> Result<Option<(ObjectRef, Object)>, ObjectError> {
    let text = |field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err((
            None,
            "not a Kubernetes object: apiVersion and kind are required".into(),
        ));
    };
    let meta = value.get("metadata");
    let meta_text = |field: &str| {
        meta.and_then(|m| m.get(field))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let name = meta_text("name");
    let kind: &'static str = match kind.as_str() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Node" => "Node",
        other => {
            debug!(
                kind = other,
                ?name,
                "ignoring object of a kind lb does not use"
            );
            return Ok(None);
        }
    };
    // kubectl's default; the objects in a manifest usually leave it out. Nodes have none.
    let namespace = match kind {
        "Node" => String::new(),
        _ => meta_text("namespace").unwrap_or_else(|| "default".to_owned()),
    };
    let key = name.as_ref().map(|name| ObjectRef {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
    });
    let expected_version = match kind {
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => "v1",
    };
    if api_version != expected_version {
        return Err((
            key,
            format!(
                "apiVersion: {api_version} is not supported for {kind}; use {expected_version}"
            ),
        ));
    }
    let Some(key) = key else {
        return Err((None, format!("{kind} without metadata.name")));
    };

    // Parsed once into what the model reads; the Kubernetes object is dropped here.
    let object = match kind {
        "Service" => deserialize::<Service>(value).map(|mut s| {
            s.metadata.namespace = Some(namespace);
            ServiceInput::parse(&s).map(Object::Service)
        }),
        "Node" => deserialize::<Node>(value).map(|n| {
            Some(Object::Node {
                zone: node_zone(&n),
            })
        }),
        _ => deserialize::<EndpointSlice>(value).map(|mut s| {
            s.metadata.namespace = Some(namespace);
            SliceInput::parse(&s).map(Object::EndpointSlice)
        }),
    };
    match object {
        Ok(object) => Ok(object.map(|object| (key, object))),
        Err(message) => Err((Some(key), message)),
    }
}

/// Deserializes with the path of the offending field in the error (`spec.ports[0].port: …`).
fn deserialize<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
                       spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    const API: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: api}\n\
                       spec: {clusterIP: 10.96.0.11, ports: [{port: 443}]}\n";

    fn write(dir: &Path, name: &str, text: &str) {
        fs::write(dir.join(name), text).unwrap();
    }

    fn service_names(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .services
            .iter()
            .map(|s| format!("{}/{}", s.key.namespace, s.key.name))
            .collect()
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "lb-manifest-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn reads_multi_document_files_lists_and_skips_other_kinds() {
        let dir = tempdir();
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_json::to_string(&serde_yaml::from_str::<serde_json::Value>(API).unwrap())
                .unwrap()
        );
        write(
            &dir,
            "a.yaml",
            &format!(
                "{WEB}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n"
            ),
        );
        write(&dir, "b.yml", &list);
        write(&dir, ".b.yml.swp", "junk: [");
        write(&dir, "notes.txt", "junk: [");
        let snapshot = ManifestSource::new(&dir).unwrap().load().unwrap();
        assert_eq!(service_names(&snapshot), ["default/api", "shop/web"]);
        assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
        assert_eq!(
            snapshot.origins[&ObjectRef {
                kind: "Service",
                namespace: "shop".into(),
                name: "web".into()
            }],
            dir.join("a.yaml")
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn junk_yaml_keeps_the_files_previous_objects() {
        let dir = tempdir();
        write(&dir, "a.yaml", WEB);
        write(&dir, "b.yaml", API);
        let mut source = ManifestSource::new(&dir).unwrap();
        assert_eq!(source.load().unwrap().services.len(), 2);

        write(
            &dir,
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        );
        let snapshot = source.load().unwrap();
        assert_eq!(service_names(&snapshot), ["default/api", "shop/web"]);
        assert_eq!(snapshot.errors.len(), 1);
        let message = snapshot.errors[0].to_string();
        assert!(
            message.starts_with(&format!("{}: not valid YAML", dir.join("a.yaml").display())),
            "{message}"
        );
        assert!(
            message.contains("keeping what this file defined before"),
            "{message}"
        );

        // A file that never parsed has nothing to keep, and says so.
        write(&dir, "c.yaml", "kind: [");
        let snapshot = source.load().unwrap();
        let new_file = snapshot
            .errors
            .iter()
            .find(|e| e.file.ends_with("c.yaml"))
            .unwrap();
        assert!(
            new_file
                .to_string()
                .ends_with("nothing in it is used until it parses"),
            "{new_file}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bad_field_names_file_document_object_and_field_and_keeps_the_old_version() {
        let dir = tempdir();
        write(&dir, "a.yaml", &format!("{API}---\n{WEB}"));
        let mut source = ManifestSource::new(&dir).unwrap();
        source.load().unwrap();

        let bad = WEB.replace("port: 80", "port: eighty");
        write(&dir, "a.yaml", &format!("{API}---\n{bad}"));
        let snapshot = source.load().unwrap();
        assert_eq!(service_names(&snapshot), ["default/api", "shop/web"]);
        let original: Service = serde_yaml::from_str(WEB).unwrap();
        assert_eq!(
            snapshot.services[1],
            ServiceInput::parse(&original).unwrap(),
            "the previous version stays"
        );
        let message = snapshot.errors[0].to_string();
        assert!(
            message.starts_with(&format!(
                "{}: document 2 (Service shop/web): spec.ports[0].port: invalid type",
                dir.join("a.yaml").display()
            )),
            "{message}"
        );
        assert!(
            message.ends_with("keeping its previous version"),
            "{message}"
        );

        // A new object that is bad from the start is skipped.
        let bad_new = bad.replace("name: web", "name: fresh");
        write(&dir, "b.yaml", &bad_new);
        let snapshot = source.load().unwrap();
        assert_eq!(snapshot.services.len(), 2);
        assert!(
            snapshot
                .errors
                .iter()
                .any(|e| e.to_string().contains("(Service shop/fresh)")
                    && e.to_string().ends_with("skipped"))
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_api_version_and_missing_kind_are_errors() {
        let dir = tempdir();
        write(
            &dir,
            "a.yaml",
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n\
             addressType: IPv4\nendpoints: []\n---\nfoo: bar\n",
        );
        let snapshot = ManifestSource::new(&dir).unwrap().load().unwrap();
        let messages: Vec<String> = snapshot.errors.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(
            messages[0].contains(
                "(EndpointSlice default/s): apiVersion: discovery.k8s.io/v1beta1 is not supported"
            ),
            "{messages:?}"
        );
        assert!(
            messages[1].contains("document 2: not a Kubernetes object"),
            "{messages:?}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fingerprint_changes_when_a_file_is_added_or_rewritten() {
        let dir = tempdir();
        write(&dir, "a.yaml", WEB);
        let source = ManifestSource::new(&dir).unwrap();
        let first = source.fingerprint().unwrap();
        write(&dir, "b.yaml", API);
        let second = source.fingerprint().unwrap();
        assert_ne!(first, second);
        write(&dir, "a.yaml", &format!("{WEB}# a comment\n"));
        assert_ne!(second, source.fingerprint().unwrap());
        fs::remove_dir_all(dir).unwrap();
    }
}
