//! The bad-input corpus: each case is a manifest file as a user would drop it beside working
//! Services, and the comment lines at its top say what must happen. Read by lb-agent's library
//! test (`lb-agent/tests/bad_input.rs`) and by xtask's end-to-end test
//! (`xtask/tests/e2e/bad_input.rs`); README.md beside this file describes the format.

// Each of the two tests uses its own part of this file.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_json::Value;

/// Frontend (`10.96.0.10:80/TCP`, `[fd00:96::60]:443/TCP`) → (Service port as `ns/name:port`,
/// backends sorted, empty when connects are refused).
pub type Frontends = BTreeMap<String, (String, Vec<String>)>;

/// What a case requires of the errors reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// An error that names this object (`Service ns/name`, `Node name`) and field (none for an
    /// error about the whole object, written `-`), and contains `fragment` if given.
    Object {
        object: String,
        field: String,
        fragment: Option<String>,
    },
    /// An error about the file (or one of its documents) that names no object: it contains the
    /// file's name and `fragment`.
    File { fragment: String },
}

impl Expect {
    /// Whether `line` (an error as displayed or logged) is this error, for the case file `file`.
    pub fn matches(&self, line: &str, file: &str) -> bool {
        match self {
            Expect::Object {
                object,
                field,
                fragment,
            } => {
                (line.contains(&format!("{object}:")) || line.contains(&format!("{object})")))
                    && (field.is_empty() || line.contains(&format!("{field}:")))
                    && fragment.as_ref().is_none_or(|f| line.contains(f.as_str()))
            }
            Expect::File { fragment } => line.contains(file) && line.contains(fragment.as_str()),
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Object {
                object,
                field,
                fragment,
            } => {
                write!(f, "{object} {}", if field.is_empty() { "-" } else { field })?;
                if let Some(fragment) = fragment {
                    write!(f, " {fragment}")?;
                }
                Ok(())
            }
            Expect::File { fragment } => write!(f, "file {fragment}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Case {
    /// The file's name without `.yaml`; also its objects' namespace (or their names' prefix).
    pub name: String,
    /// The directory it is in.
    pub category: String,
    /// The first comment lines: what the case is.
    pub title: String,
    /// The file as the user drops it in (with `@REPEAT …@` expanded, or generated).
    pub content: Vec<u8>,
    /// `<name>.before.yaml`: the file's previous version, in force when the case is written.
    pub before: Option<String>,
    /// Every error the case must produce; no other may be reported.
    pub expect: Vec<Expect>,
    /// The case's own frontends afterwards, exactly; every other frontend is as it was.
    pub serves: Frontends,
    pub manifest: bool,
    pub api: bool,
    /// Why the case does not hold yet (a known bug, or left for a later issue): the tests check
    /// that it still fails, so that whoever fixes it also removes this line.
    pub pending: Option<String>,
}

impl Case {
    /// The name the case is written under in a manifest directory.
    pub fn file_name(&self) -> String {
        format!("{}.yaml", self.name)
    }

    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.content).ok()
    }
}

/// The good Services (`good.yaml`) and what they serve.
pub struct Good {
    pub text: String,
    pub serves: Frontends,
}

/// Reads the corpus under `root` (this directory): the good Services and every case, by name.
pub fn load(root: &Path) -> Result<(Good, Vec<Case>), String> {
    let read = |path: &Path| {
        fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
    };
    let good_text = read(&root.join("good.yaml"))?;
    let good = parse_header(&good_text).map_err(|e| format!("good.yaml: {e}"))?;
    let good = Good {
        serves: good.serves,
        text: good_text,
    };

    let mut cases = Vec::new();
    let mut categories: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| e.to_string())?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    for dir in categories {
        let category = file_name(&dir);
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        files.sort();
        for path in &files {
            let file = file_name(path);
            if file.ends_with(".before.yaml") {
                continue;
            }
            let Some(name) = file.strip_suffix(".yaml") else {
                return Err(format!("{}: not a .yaml case", path.display()));
            };
            let text = read(path)?;
            let header = parse_header(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let before_path = dir.join(format!("{name}.before.yaml"));
            let before = before_path
                .exists()
                .then(|| read(&before_path))
                .transpose()?;
            let content = match &header.generate {
                Some(generate) => generate_bytes(generate)
                    .map_err(|e| format!("{}: generate: {e}", path.display()))?,
                None => expand(&text)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .into_bytes(),
            };
            cases.push(Case {
                name: name.to_owned(),
                category: category.clone(),
                title: header.title,
                content,
                before,
                expect: header.expect,
                serves: header.serves,
                manifest: header.sources.0,
                api: header.sources.1,
                pending: header.pending,
            });
        }
    }
    check(&good, &cases)?;
    Ok((good, cases))
}

/// Cases must be independent of each other and of the good Services, so that the end-to-end test
/// can drop them all in at once: unique names, and no frontend served twice.
fn check(good: &Good, cases: &[Case]) -> Result<(), String> {
    let mut names = BTreeMap::new();
    let mut frontends: BTreeMap<&String, &str> =
        good.serves.keys().map(|f| (f, "good.yaml")).collect();
    for case in cases {
        if let Some(other) = names.insert(&case.name, &case.category) {
            return Err(format!(
                "case {} is in both {other}/ and {}/",
                case.name, case.category
            ));
        }
        for frontend in case.serves.keys() {
            if let Some(other) = frontends.insert(frontend, &case.name) {
                return Err(format!(
                    "{frontend} is served by both {other} and {}: cases must not share frontends",
                    case.name
                ));
            }
        }
    }
    Ok(())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct Header {
    title: String,
    expect: Vec<Expect>,
    serves: Frontends,
    /// (manifest, api)
    sources: (bool, bool),
    pending: Option<String>,
    generate: Option<String>,
}

/// The comment lines at the top of a case.
fn parse_header(text: &str) -> Result<Header, String> {
    let mut header = Header {
        title: String::new(),
        expect: Vec::new(),
        serves: Frontends::new(),
        sources: (true, true),
        pending: None,
        generate: None,
    };
    let (mut said_expect, mut said_serves) = (false, false);
    for line in text.lines() {
        let Some(comment) = line.strip_prefix('#') else {
            break;
        };
        let comment = comment.trim();
        let (key, value) = match comment.split_once(':') {
            Some((key, value))
                if ["expect", "serves", "sources", "pending", "generate"].contains(&key) =>
            {
                (key, value.trim())
            }
            _ => {
                if !comment.is_empty() {
                    if !header.title.is_empty() {
                        header.title.push(' ');
                    }
                    header.title.push_str(comment);
                }
                continue;
            }
        };
        match key {
            "expect" => {
                said_expect = true;
                if value != "nothing" {
                    header.expect.push(parse_expect(value)?);
                }
            }
            "serves" => {
                said_serves = true;
                if value != "nothing" {
                    let (frontend, served) = parse_serves(value)?;
                    if header.serves.insert(frontend.clone(), served).is_some() {
                        return Err(format!("serves: {frontend} twice"));
                    }
                }
            }
            "sources" => {
                let words: Vec<&str> = value.split_whitespace().collect();
                if words.iter().any(|w| !["manifest", "api"].contains(w)) {
                    return Err(format!("sources: {value:?}: expected manifest and/or api"));
                }
                header.sources = (words.contains(&"manifest"), words.contains(&"api"));
            }
            "pending" => header.pending = Some(value.to_owned()),
            _ => header.generate = Some(value.to_owned()),
        }
    }
    if !said_expect {
        return Err("no `expect:` line (say `expect: nothing` if none)".into());
    }
    if !said_serves {
        return Err("no `serves:` line (say `serves: nothing` if none)".into());
    }
    Ok(header)
}

/// `Service ns/name field [fragment…]`, `Node name field [fragment…]` (field `-`: the whole
/// object), or `file fragment…`.
fn parse_expect(value: &str) -> Result<Expect, String> {
    if let Some(fragment) = value.strip_prefix("file ") {
        return Ok(Expect::File {
            fragment: fragment.trim().to_owned(),
        });
    }
    let mut words = value.splitn(4, ' ');
    let (Some(kind), Some(object), Some(field)) = (words.next(), words.next(), words.next()) else {
        return Err(format!(
            "expect: {value:?}: expected `Kind ns/name field [text]`"
        ));
    };
    if !["Service", "EndpointSlice", "Node"].contains(&kind) {
        return Err(format!("expect: unknown kind {kind:?}"));
    }
    Ok(Expect::Object {
        object: format!("{kind} {object}"),
        field: if field == "-" { "" } else { field }.to_owned(),
        fragment: words.next().map(|f| f.trim().to_owned()),
    })
}

/// `10.97.0.1:80/TCP ns/name:port -> 10.244.0.1:8080 10.244.0.2:8080` (or `-> refused`).
fn parse_serves(value: &str) -> Result<(String, (String, Vec<String>)), String> {
    let bad = || format!("serves: {value:?}: expected `frontend ns/name[:port] -> backends…`");
    let (left, right) = value.split_once("->").ok_or_else(bad)?;
    let mut left = left.split_whitespace();
    let (Some(frontend), Some(service), None) = (left.next(), left.next(), left.next()) else {
        return Err(bad());
    };
    let mut backends: Vec<String> = match right.trim() {
        "refused" => Vec::new(),
        list => list.split_whitespace().map(str::to_owned).collect(),
    };
    if backends.is_empty() && right.trim() != "refused" {
        return Err(bad());
    }
    backends.sort();
    Ok((frontend.to_owned(), (service.to_owned(), backends)))
}

/// Expands `@REPEAT <count> "<JSON string>"@` into the string repeated `count` times.
fn expand(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("@REPEAT ") {
        out.push_str(&rest[..at]);
        let spec = &rest[at + "@REPEAT ".len()..];
        let end = spec.find("\"@").ok_or("@REPEAT without its closing \"@")? + 1;
        let (count, unit) = spec[..end]
            .split_once(' ')
            .ok_or("@REPEAT <count> \"<text>\"@")?;
        let count: usize = count
            .parse()
            .map_err(|_| format!("@REPEAT count {count:?}"))?;
        let unit: String =
            serde_json::from_str(unit).map_err(|e| format!("@REPEAT text {unit}: {e}"))?;
        out.push_str(&unit.repeat(count));
        rest = &spec[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `binary <bytes>`: bytes that are not text (every byte value, over and over).
fn generate_bytes(spec: &str) -> Result<Vec<u8>, String> {
    match spec.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["binary", size] => {
            let size: usize = size.parse().map_err(|_| format!("size {size:?}"))?;
            Ok((0..size).map(|i| (i * 7 % 256) as u8).collect())
        }
        _ => Err(format!("{spec:?}: expected `binary <bytes>`")),
    }
}

/// The Services, EndpointSlices and Nodes in a manifest text, as the API server would send them
/// (JSON; `kind: List` expanded; a namespaced object without a namespace in `default`). Other
/// kinds are left out: the agent watches only those three.
pub fn api_objects(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for document in yaml_serde::Deserializer::from_str(text) {
        let value = Value::deserialize(document).map_err(|e| format!("not YAML for JSON: {e}"))?;
        let items = match value["kind"].as_str() {
            Some("List") => value["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        };
        for mut item in items {
            let kind = item["kind"].as_str().unwrap_or_default().to_owned();
            if !["Service", "EndpointSlice", "Node"].contains(&kind.as_str()) {
                continue;
            }
            let metadata = item.get_mut("metadata").and_then(Value::as_object_mut);
            if let (Some(metadata), false) = (metadata, kind == "Node") {
                metadata
                    .entry("namespace")
                    .or_insert_with(|| Value::from("default"));
            }
            out.push(item);
        }
    }
    Ok(out)
}

/// The kind, namespace and name of an API object.
pub fn object_key(object: &Value) -> (String, String, String) {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (
        text(&object["kind"]),
        text(&object["metadata"]["namespace"]),
        text(&object["metadata"]["name"]),
    )
}

/// A frontend as the corpus writes it: `10.96.0.10:80/TCP`, `[fd00:96::60]:443/TCP`.
pub fn frontend(address: IpAddr, port: u16, protocol: &str) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}/{protocol}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{protocol}"),
    }
}

/// A backend as the corpus writes it: `10.244.1.1:8080`, `[fd00:244::1]:8080`.
pub fn backend(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A Service port as the corpus writes it: `ns/name:port`, or `ns/name` when the port is unnamed.
pub fn service_port(namespace: &str, name: &str, port: &str) -> String {
    if port.is_empty() {
        format!("{namespace}/{name}")
    } else {
        format!("{namespace}/{name}:{port}")
    }
}

/// The differences between two sets of frontends, for a failure message.
pub fn diff(expected: &Frontends, got: &Frontends) -> String {
    let mut out = Vec::new();
    for (frontend, want) in expected {
        match got.get(frontend) {
            None => out.push(format!("  missing {frontend} {} -> {:?}", want.0, want.1)),
            Some(have) if have != want => out.push(format!(
                "  {frontend}: expected {} -> {:?}, got {} -> {:?}",
                want.0, want.1, have.0, have.1
            )),
            Some(_) => {}
        }
    }
    for (frontend, have) in got {
        if !expected.contains_key(frontend) {
            out.push(format!(
                "  unexpected {frontend} {} -> {:?}",
                have.0, have.1
            ));
        }
    }
    out.join("\n")
}
