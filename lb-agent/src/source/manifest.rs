//! Services and EndpointSlices from Kubernetes manifest files: the objects `kubectl apply -f`
//! takes (multi-document YAML or JSON, `kind: List` included), from one file or the files of a
//! directory (`*.yaml`, `*.yml`, `*.json`; not recursive; dot-files skipped, so an editor's or a
//! tool's temporary file is never read half-written).
//!
//! Incremental: each poll looks at every file's identity, size and modification time, re-reads
//! only the files that changed, and turns only the objects that changed into model events. A file
//! renamed into place (a new inode: the atomic write) is complete and is read at once; a file
//! rewritten in place is read once its size and modification time have held still for one poll
//! interval.
//!
//! Polls come every `--poll-interval`, and also as soon as inotify says the directory changed, so
//! a file renamed into place is read within milliseconds; the timed poll stays as the fallback
//! (inotify unavailable or out of watches, a filesystem without it).
//!
//! Bad input never takes anything away that was good: a file that does not parse keeps its
//! previous objects, and an object that does not deserialize keeps its previous version. A file
//! that cannot be read at all keeps its objects too; until every file has been read once, the
//! source is not synced (nothing is programmed and the agent is not ready).
//!
//! The objects themselves live in the model: the source keeps only which objects each file
//! defines and a digest of each, enough to tell what a new read changed. When the file that wins
//! an object (the last in name order) stops defining it, the object comes back from an earlier
//! file, which is read again for it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use notify::{
    EventKind, RecursiveMode, Watcher as _,
    event::{ModifyKind, RenameMode},
};
use serde::Deserialize as _;
use tokio::{
    sync::{Notify, mpsc},
    time::{MissedTickBehavior, interval},
};
use tracing::{debug, error, info, warn};
use yaml_serde::Value;

use super::{Batch, Origins};
use crate::{
    model::{Event, ObjectRef, ServiceInput, ServiceKey, SliceInput},
    source::kube::node_zone,
};

/// A Service, EndpointSlice or Node read from a file, as the model keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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

/// A file's identity, size and modification time: when they change, the file is read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }

    /// Another file now has this name: it was renamed into place (or created), not written in
    /// place.
    fn replaced(&self, other: &Self) -> bool {
        (self.dev, self.ino) != (other.dev, other.ino)
    }
}

/// A file parsed: its objects (`None` when it does not parse) and its errors.
type Parsed = (Option<Vec<(ObjectRef, Read)>>, Vec<ManifestError>);

/// Text beyond which the files read in one poll are parsed on two threads.
const PARALLEL_PARSE_BYTES: usize = 1 << 20;

/// A digest of an [`Object`]: equal digests, the same object (to 1 in 2^64).
type Digest = u64;

/// Stands for a version the source could not read back (see [`ManifestSource::read_back`]): no
/// object's digest is expected to equal it, so the file's next read reports the object again.
const UNKNOWN: Digest = 0;

fn digest(object: &Object) -> Digest {
    // DefaultHasher::new() has fixed keys: the same object always has the same digest.
    let mut hasher = DefaultHasher::new();
    object.hash(&mut hasher);
    hasher.finish()
}

/// An object as a read found it: parsed anew, or kept as it was (it did not deserialize this
/// time, and had a good version before).
type Read = Option<Object>;

/// One file: what it defined when last read successfully.
#[derive(Default)]
struct File {
    /// The fingerprint of the last read (successful or not); `None` before the first.
    read: Option<Fingerprint>,
    /// A change seen at the last poll, read when it holds still.
    pending: Option<Fingerprint>,
    /// Whether the file has been read (its text, whether or not it parsed) at least once.
    ever_read: bool,
    /// The last read error, reported once until it changes.
    failure: Option<String>,
    objects: BTreeMap<ObjectRef, Digest>,
}

/// What one [`ManifestSource::poll`] found.
#[derive(Debug, Default)]
pub struct Poll {
    pub events: Vec<Event>,
    pub errors: Vec<ManifestError>,
    /// Files read in this poll.
    pub files_read: usize,
    /// Every file has been read at least once and the directory could be listed.
    pub complete: bool,
    /// The directory could not be listed (reported once until the error changes).
    pub listing_error: Option<String>,
}

pub struct ManifestSource {
    root: PathBuf,
    /// With `--node-name`: the Node whose zone is this node's.
    node_name: Option<String>,
    files: BTreeMap<Arc<Path>, File>,
    /// Which files define each object, in name order: the last one wins (like repeated
    /// `kubectl apply`).
    defined_in: Origins,
    /// The last listing error, reported once until it changes.
    listing_failure: Option<String>,
}

impl ManifestSource {
    pub fn new(root: &Path, node_name: Option<&str>) -> anyhow::Result<Self> {
        fs::metadata(root).with_context(|| {
            format!(
                "manifests not found at {}: pass --manifests with a file or directory of \
                 Service and EndpointSlice manifests",
                root.display()
            )
        })?;
        Ok(Self {
            root: root.to_owned(),
            node_name: node_name.map(str::to_owned),
            files: BTreeMap::new(),
            defined_in: Origins::default(),
            listing_failure: None,
        })
    }

    /// The manifest files, in name order.
    fn paths(&self) -> anyhow::Result<Vec<PathBuf>> {
        if !fs::metadata(&self.root)
            .with_context(|| format!("reading {}", self.root.display()))?
            .is_dir()
        {
            return Ok(vec![self.root.clone()]);
        }
        let mut paths = Vec::new();
        for entry in
            fs::read_dir(&self.root).with_context(|| format!("listing {}", self.root.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", self.root.display()))?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let is_manifest = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
            if is_manifest && !name.starts_with('.') && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths)
    }

    /// Re-allocates what the source keeps after a large load (see `Cluster::compact`).
    pub fn compact(&mut self) {
        for file in self.files.values_mut() {
            file.objects = file.objects.clone();
        }
        let mut defined_in = self.defined_in.lock();
        *defined_in = defined_in.clone();
    }

    /// Which files define each object, for messages about it.
    pub fn origins(&self) -> Origins {
        self.defined_in.clone()
    }

    /// The manifest file or directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Looks at every file and reads those that are new, replaced, or changed in place and then
    /// held still since the last poll: the events are the objects that changed.
    pub fn poll(&mut self) -> Poll {
        self.poll_files(None)
    }

    /// A poll woken by a change notification, which may come in the middle of an edit: only the
    /// files named in `moved_in` (file names, renamed into place: complete) are read. Everything
    /// else (a file written in place, a new file still being written, a file gone, perhaps only
    /// for the moment an editor renames its backup) waits for the next timed [`poll`].
    ///
    /// [`poll`]: Self::poll
    pub fn poll_changes(&mut self, moved_in: &BTreeSet<PathBuf>) -> Poll {
        self.poll_files(Some(moved_in))
    }

    /// `moved_in` is `Some` for a poll woken by a notification (see [`Self::poll_changes`]).
    fn poll_files(&mut self, moved_in: Option<&BTreeSet<PathBuf>>) -> Poll {
        let mut poll = Poll::default();
        let paths = match self.paths() {
            Ok(paths) => {
                self.listing_failure = None;
                paths
            }
            Err(e) => {
                let message = format!("{e:#}");
                if self.listing_failure.as_ref() != Some(&message) {
                    poll.listing_error = Some(message.clone());
                }
                self.listing_failure = Some(message);
                return poll;
            }
        };
        // Objects whose version now comes from a file other than the one being read.
        let mut read_back = Vec::new();

        // Files gone: what they defined goes too (unless another file defines it). Only timed
        // polls look: an editor may have renamed the file away for a moment.
        let listed: BTreeSet<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let gone: Vec<Arc<Path>> = self
            .files
            .keys()
            .filter(|p| moved_in.is_none() && !listed.contains(p.as_ref()))
            .cloned()
            .collect();
        for path in gone {
            debug!(file = %path.display(), "manifest removed");
            self.replace_objects(&path, BTreeMap::new(), &mut poll, &mut read_back);
            self.files.remove(&path);
        }

        // The text of every file due, read in name order, then parsed (on both cores when there
        // is much of it) and applied in name order.
        let mut texts: Vec<(Arc<Path>, String)> = Vec::new();
        for path in paths {
            // A file removed between listing and stat simply drops out at the next poll.
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let now = Fingerprint::of(&meta);
            let path: Arc<Path> = match self.files.get_key_value(path.as_path()) {
                Some((known, _)) => known.clone(),
                None => path.into(),
            };
            let file = self.files.entry(path.clone()).or_default();
            let renamed_in = moved_in.map(|moved_in| {
                path.file_name()
                    .is_some_and(|name| moved_in.contains(Path::new(name)))
            });
            let due = match (file.read, renamed_in) {
                (Some(read), _) if read == now => false,
                (_, Some(renamed_in)) => renamed_in,
                (None, None) => true,
                (Some(read), None) => read.replaced(&now) || file.pending == Some(now),
            };
            if !due {
                // Only timed polls, an interval apart, tell whether a file held still.
                if moved_in.is_none() {
                    file.pending = (file.read != Some(now)).then_some(now);
                }
                continue;
            }
            file.pending = None;
            file.read = Some(now);
            let bytes = match read_bytes(&path) {
                Ok(bytes) => bytes,
                Err(message) => {
                    // Read again at every poll until it works; reported once.
                    file.read = None;
                    if file.failure.as_ref() != Some(&message) {
                        let consequence = if file.ever_read {
                            "keeping what this file defined before"
                        } else {
                            "nothing is programmed until every file has been read"
                        };
                        poll.errors
                            .push(file_error(&path, format!("{message}; {consequence}")));
                    }
                    file.failure = Some(message);
                    continue;
                }
            };
            if file.failure.take().is_some() {
                info!(file = %path.display(), "manifest readable again");
            }
            file.ever_read = true;
            poll.files_read += 1;
            // Not text: like a file that does not parse, it keeps what it defined.
            match text_of(bytes) {
                Ok(text) => texts.push((path, text)),
                Err(message) => {
                    let consequence = if file.objects.is_empty() {
                        "nothing in it is used until it is text"
                    } else {
                        "keeping what this file defined before"
                    };
                    poll.errors
                        .push(file_error(&path, format!("{message}; {consequence}")));
                }
            }
        }

        let parsed = self.parse_all(&texts);
        drop(texts);
        for (path, (objects, mut errors)) in parsed {
            poll.errors.append(&mut errors);
            // A file that does not parse keeps what it defined: nothing changes.
            let Some(objects) = objects else {
                continue;
            };
            let mut by_key = BTreeMap::new();
            for (key, object) in objects {
                if by_key.insert(key.clone(), object).is_some() {
                    poll.errors.push(ManifestError {
                        file: path.to_path_buf(),
                        document: None,
                        object: Some(key),
                        message: "defined twice in this file; using the later one".into(),
                    });
                }
            }
            self.replace_objects(&path, by_key, &mut poll, &mut read_back);
        }
        self.read_back(read_back, &mut poll);
        poll.complete = self.files.values().all(|f| f.ever_read);
        poll
    }

    /// Parses the files' texts, each with its objects (`None`: it does not parse) and its errors,
    /// in the order given. Much text is split between two threads by size: parsing is most of a
    /// cold start from manifests.
    fn parse_all(&self, texts: &[(Arc<Path>, String)]) -> Vec<(Arc<Path>, Parsed)> {
        let parse = |(path, text): &(Arc<Path>, String)| {
            let previous = self.files.get(path).map(|f| &f.objects);
            let empty = BTreeMap::new();
            let mut errors = Vec::new();
            let objects = parse_file(path, text, previous.unwrap_or(&empty), &mut errors);
            (path.clone(), (objects, errors))
        };
        let total: usize = texts.iter().map(|(_, t)| t.len()).sum();
        if texts.len() < 2 || total < PARALLEL_PARSE_BYTES {
            return texts.iter().map(parse).collect();
        }
        // The first files up to half the text on a thread of their own; the rest here.
        let mut half = 0;
        let split = texts
            .iter()
            .position(|(_, t)| {
                half += t.len();
                half >= total / 2
            })
            .map_or(texts.len(), |i| i + 1)
            .min(texts.len() - 1);
        let (first, second) = texts.split_at(split);
        std::thread::scope(|scope| {
            let first = scope.spawn(|| first.iter().map(parse).collect::<Vec<_>>());
            let second: Vec<_> = second.iter().map(parse).collect();
            let mut all = first.join().expect("a parsing thread panicked");
            all.extend(second);
            all
        })
    }

    /// The file whose version of `key` is in effect (the last in name order), and its digest.
    fn effective(&self, key: &ObjectRef) -> Option<(&Arc<Path>, Digest)> {
        let path = self.defined_in.of(key)?;
        let (path, file) = self.files.get_key_value(&path)?;
        Some((path, *file.objects.get(key)?))
    }

    /// Sets what `path` defines, and adds an event for every object whose effective version
    /// changed. Objects whose version now comes from another file are added to `read_back`.
    fn replace_objects(
        &mut self,
        path: &Arc<Path>,
        mut objects: BTreeMap<ObjectRef, Read>,
        poll: &mut Poll,
        read_back: &mut Vec<(ObjectRef, Arc<Path>)>,
    ) {
        let old = self.files.get(path).map(|f| &f.objects);
        // A kept object keeps its digest.
        let digests: BTreeMap<ObjectRef, Digest> = objects
            .iter()
            .filter_map(|(key, read)| {
                let digest = match read {
                    Some(object) => digest(object),
                    None => *old?.get(key)?,
                };
                Some((key.clone(), digest))
            })
            .collect();
        let keys: BTreeSet<ObjectRef> = old
            .into_iter()
            .flat_map(|o| o.keys())
            .chain(digests.keys())
            .cloned()
            .collect();
        let before: Vec<Option<Digest>> = keys
            .iter()
            .map(|k| self.effective(k).map(|(_, d)| d))
            .collect();
        let mut defined_in = self.defined_in.lock();
        for key in &keys {
            let files = defined_in.entry(key.clone()).or_default();
            let at = files.binary_search_by(|p| p.as_ref().cmp(path.as_ref()));
            match (digests.contains_key(key), at) {
                (true, Err(at)) => files.insert(at, path.clone()),
                (false, Ok(at)) => drop(files.remove(at)),
                _ => {}
            }
            if files.is_empty() {
                defined_in.remove(key);
            }
        }
        for (key, files) in digests.keys().filter_map(|k| Some((k, defined_in.get(k)?))) {
            if let [.., earlier, last] = files.as_slice() {
                let other = if last == path { earlier } else { last };
                let using = if last == path {
                    "using this one".to_owned()
                } else {
                    format!("using the one in {}", last.display())
                };
                poll.errors.push(ManifestError {
                    file: path.to_path_buf(),
                    document: None,
                    object: Some(key.clone()),
                    message: format!("also defined in {}; {using}", other.display()),
                });
            }
        }
        drop(defined_in);
        self.files.entry(path.clone()).or_default().objects = digests;
        for (key, before) in keys.into_iter().zip(before) {
            let after = self.effective(&key).map(|(p, d)| (p.clone(), d));
            if after.as_ref().map(|(_, d)| *d) == before {
                continue;
            }
            let object = match &after {
                None => None,
                Some((from, _)) if from == path => match objects.remove(&key).flatten() {
                    Some(object) => Some(object),
                    None => {
                        read_back.push((key, from.clone()));
                        continue;
                    }
                },
                Some((from, _)) => {
                    read_back.push((key, from.clone()));
                    continue;
                }
            };
            if let Some(event) = event(self.node_name.as_deref(), &key, object) {
                poll.events.push(event);
            }
        }
    }

    /// Reads objects back from the files that now define them (an object whose winning file
    /// stopped defining it, while an earlier file still does), each file once. If a file cannot
    /// give its object back (unreadable, or changed meanwhile into something that does not
    /// parse), the model keeps the version it has, and the file is read again at the next poll,
    /// which reports the object whatever it then holds.
    fn read_back(&mut self, wanted: Vec<(ObjectRef, Arc<Path>)>, poll: &mut Poll) {
        let mut by_file: BTreeMap<Arc<Path>, Vec<ObjectRef>> = BTreeMap::new();
        for (key, path) in wanted {
            by_file.entry(path).or_default().push(key);
        }
        for (path, keys) in by_file {
            let Some(file) = self.files.get_mut(&path) else {
                continue;
            };
            // Problems in it were reported when it was read; this read only fetches objects.
            let mut ignored = Vec::new();
            let mut found: BTreeMap<ObjectRef, Object> = read_bytes(&path)
                .and_then(text_of)
                .ok()
                .and_then(|text| parse_file(&path, &text, &file.objects, &mut ignored))
                .into_iter()
                .flatten()
                .filter_map(|(key, object)| Some((key, object?)))
                .collect();
            for key in keys {
                match found.remove(&key) {
                    Some(object) => {
                        file.objects.insert(key.clone(), digest(&object));
                        if let Some(event) = event(self.node_name.as_deref(), &key, Some(object)) {
                            poll.events.push(event);
                        }
                    }
                    None => {
                        warn!(
                            file = %path.display(),
                            object = %key,
                            "could not read this object back from the file that now defines \
                             it; keeping the version in use until the file is read again"
                        );
                        file.objects.insert(key, UNKNOWN);
                        file.read = None;
                    }
                }
            }
        }
    }
}

/// The model event for `key` now being `object` (`None`: gone); a Node only when it is this
/// node (`node_name`).
fn event(node_name: Option<&str>, key: &ObjectRef, object: Option<Object>) -> Option<Event> {
    Some(match (key.kind, object) {
        (_, Some(Object::Service(svc))) => Event::UpsertService(svc),
        (_, Some(Object::EndpointSlice(slice))) => Event::UpsertSlice(slice),
        (_, Some(Object::Node { zone })) => {
            (node_name == Some(key.name.as_str())).then_some(())?;
            Event::NodeZone(zone)
        }
        ("Service", None) => Event::DeleteService(ServiceKey {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
        }),
        ("EndpointSlice", None) => Event::DeleteSlice(key.namespace.clone(), key.name.clone()),
        (_, None) => {
            (node_name == Some(key.name.as_str())).then_some(())?;
            Event::NodeZone(None)
        }
    })
}

/// How long a notification waits for more: a tool that renames several files in a row gets one
/// poll.
const SETTLE: Duration = Duration::from_millis(2);

/// Polls the manifests every `poll_interval`, and whenever inotify reports a change, and sends
/// what changed, until the receiver is gone.
pub async fn follow(mut source: ManifestSource, poll_interval: Duration, tx: mpsc::Sender<Batch>) {
    let mut ticker = interval(poll_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let changes = Arc::new(Changes::default());
    let _watcher = match watch(source.root(), changes.clone()) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            warn!(
                "cannot watch {} for changes ({e}); reading changes every {} instead",
                source.root().display(),
                humantime::format_duration(poll_interval)
            );
            None
        }
    };
    let mut synced = false;
    loop {
        let moved_in = tokio::select! {
            _ = ticker.tick() => None,
            () = changes.wake.notified() => {
                tokio::time::sleep(SETTLE).await;
                Some(std::mem::take(&mut *changes.moved_in.lock().unwrap()))
            }
        };
        // When a change was noticed (a notification, or the poll that found it): where its
        // programming latency starts, give or take the settling delay.
        let noticed = SystemTime::now()
            - if moved_in.is_some() {
                SETTLE
            } else {
                Duration::ZERO
            };
        let started = Instant::now();
        let poll = match &moved_in {
            None => source.poll(),
            Some(moved_in) => source.poll_changes(moved_in),
        };
        let read = started.elapsed();
        if let Some(e) = &poll.listing_error {
            error!("reading manifests: {e}; keeping the current state");
        }
        for problem in &poll.errors {
            warn!("{problem}");
        }
        let newly_synced = poll.complete && !synced;
        synced |= poll.complete;
        if poll.files_read == 0 && poll.events.is_empty() && !newly_synced {
            continue;
        }
        let batch = Batch {
            changed_at: (synced && !newly_synced && !poll.events.is_empty()).then_some(noticed),
            events: poll.events,
            synced,
            read: Some(read),
        };
        if tx.send(batch).await.is_err() {
            return;
        }
        if newly_synced {
            source.compact();
        }
    }
}

/// What inotify reported since the last poll.
#[derive(Default)]
struct Changes {
    /// Names of the files renamed into place: complete, read at once.
    moved_in: Mutex<BTreeSet<PathBuf>>,
    wake: Notify,
}

/// Watches the manifest directory (for a single file, its directory: a rename replaces the file's
/// inode, which a watch on the file itself would lose).
fn watch(root: &Path, changes: Arc<Changes>) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else {
            // An overflow or a watch that went away: look at everything.
            changes.wake.notify_one();
            return;
        };
        // By file name: notify reports absolute paths, the source lists them as given.
        if let EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) = event.kind
            && let Some(name) = event.paths.last().and_then(|to| to.file_name())
        {
            changes.moved_in.lock().unwrap().insert(PathBuf::from(name));
        }
        if !matches!(event.kind, EventKind::Access(_)) {
            changes.wake.notify_one();
        }
    })?;
    let dir = if root.is_dir() {
        root
    } else {
        root.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// A file's bytes, or why they cannot be had.
fn read_bytes(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

/// A file's text; `Err` when it is not UTF-8 (a binary file), with where it stops being text.
fn text_of(bytes: Vec<u8>) -> Result<String, String> {
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {}): not a manifest",
            e.utf8_error().valid_up_to()
        )
    })
}

fn file_error(path: &Path, message: String) -> ManifestError {
    ManifestError {
        file: path.to_owned(),
        document: None,
        object: None,
        message,
    }
}

/// Parses one file: `None` on a syntax error (the file keeps what it had). An object that does
/// not deserialize keeps its version in `previous`, if any (a `None` [`Read`]).
fn parse_file(
    path: &Path,
    text: &str,
    previous: &BTreeMap<ObjectRef, Digest>,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<(ObjectRef, Read)>> {
    // Each document is parsed into the model's form before the next is read, so a large file
    // never exists as a tree of YAML values all at once.
    let mut objects = Vec::new();
    let mut file_errors = Vec::new();
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
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
                return None;
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
                Ok(Some((key, object))) => objects.push((key, Some(object))),
                Ok(None) => {}
                Err((key, message)) => {
                    // A version this file could not give back before (see `read_back`) is not
                    // one to keep.
                    let kept = key
                        .as_ref()
                        .filter(|k| previous.get(*k).is_some_and(|d| *d != UNKNOWN))
                        .cloned();
                    let message = match kept {
                        Some(_) => format!("{message}; keeping its previous version"),
                        None => format!("{message}; skipped"),
                    };
                    error(key, message);
                    objects.extend(kept.map(|k| (k, None)));
                }
            }
        }
    }
    errors.append(&mut file_errors);
    Some(objects)
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
    if kind.is_empty() {
        return Err((None, "not a Kubernetes object: kind is empty".into()));
    }
    let meta = value.get("metadata");
    // A metadata string field: absent, or a string; anything else is an error naming the field.
    let meta_text = |field: &str| -> Result<Option<String>, ObjectError> {
        match meta.and_then(|m| m.get(field)) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err((
                None,
                format!(
                    "metadata.{field}: invalid type: {}, expected a string",
                    describe(other)
                ),
            )),
        }
    };
    let name = meta_text("name")?;
    let kind: &'static str = match kind.as_str() {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Node" => "Node",
        other => {
            if let Some(meant) = misspelt_kind(other) {
                return Err((
                    None,
                    format!(
                        "kind: {other} is not a Kubernetes kind; did you mean {meant}? (the \
                         object is skipped)"
                    ),
                ));
            }
            debug!(
                kind = other,
                ?name,
                "ignoring object of a kind lb does not use"
            );
            return Ok(None);
        }
    };
    // kubectl's default, for a namespace left out or empty. Nodes have none.
    let namespace = match kind {
        "Node" => Ok(None),
        _ => meta_text("namespace"),
    };
    // A namespace of the wrong type is reported under the namespace kubectl would use.
    let (namespace, bad_namespace) = match namespace {
        Ok(namespace) => (namespace, None),
        Err((_, message)) => (None, Some(message)),
    };
    let namespace = match kind {
        "Node" => String::new(),
        _ => namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_owned()),
    };
    let key = name.as_ref().map(|name| ObjectRef {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
    });
    if let Some(message) = bad_namespace {
        return Err((key, message));
    }
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

/// The kind lb uses that `kind` was likely meant to be: the same but for letter case, or one
/// letter added, left out, changed or two swapped (`Servcie`, `service`, `Endpointslice`).
fn misspelt_kind(kind: &str) -> Option<&'static str> {
    ["Service", "EndpointSlice", "Node"]
        .into_iter()
        .find(|known| {
            let (a, b) = (kind.to_ascii_lowercase(), known.to_ascii_lowercase());
            a == b || one_edit_apart(a.as_bytes(), b.as_bytes())
        })
}

/// Whether one insertion, deletion, substitution or swap of neighbours turns `a` into `b`.
fn one_edit_apart(a: &[u8], b: &[u8]) -> bool {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[prefix..], &b[prefix..]);
    match a.len() as isize - b.len() as isize {
        0 => a[1..] == b[1..] || (a.len() >= 2 && a[0] == b[1] && a[1] == b[0] && a[2..] == b[2..]),
        1 => a[1..] == *b,
        -1 => *a == b[1..],
        _ => false,
    }
}

/// A YAML value's type, as serde words it in errors.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) => format!("number `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Sequence(_) => "sequence".into(),
        Value::Mapping(_) => "map".into(),
        Value::Tagged(_) => "tagged value".into(),
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

    fn slice(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]\n"
        )
    }

    /// Writes atomically: a dot-file renamed into place.
    fn write(dir: &Path, name: &str, text: &str) {
        let tmp = dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text).unwrap();
        fs::rename(tmp, dir.join(name)).unwrap();
    }

    /// The events as short strings: `+Service shop/web`, `-EndpointSlice shop/s`, `zone=…`.
    fn events(poll: &Poll) -> Vec<String> {
        poll.events
            .iter()
            .map(|e| match e {
                Event::UpsertService(s) => format!("+Service {}/{}", s.key.namespace, s.key.name),
                Event::DeleteService(k) => format!("-Service {}/{}", k.namespace, k.name),
                Event::UpsertSlice(s) => format!("+EndpointSlice {}/{}", s.namespace, s.name),
                Event::DeleteSlice(ns, n) => format!("-EndpointSlice {ns}/{n}"),
                Event::NodeZone(z) => format!("zone={z:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("lb-manifest-test-")
            .tempdir()
            .unwrap()
    }

    fn web_ref() -> ObjectRef {
        ObjectRef {
            kind: "Service",
            namespace: "shop".into(),
            name: "web".into(),
        }
    }

    #[test]
    fn reads_multi_document_files_lists_and_skips_other_kinds() {
        let tmp = tempdir();
        let dir = tmp.path();
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_json::to_string(&yaml_serde::from_str::<serde_json::Value>(API).unwrap())
                .unwrap()
        );
        write(
            dir,
            "a.yaml",
            &format!(
                "{WEB}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n"
            ),
        );
        write(dir, "b.yml", &list);
        write(dir, ".b.yml.swp", "junk: [");
        write(dir, "notes.txt", "junk: [");
        let mut source = ManifestSource::new(dir, None).unwrap();
        let poll = source.poll();
        assert_eq!(events(&poll), ["+Service shop/web", "+Service default/api"]);
        assert!(poll.errors.is_empty(), "{:?}", poll.errors);
        assert!(poll.complete);
        assert_eq!(
            source.origins().of(&web_ref()).as_deref(),
            Some(dir.join("a.yaml").as_path())
        );
    }

    #[test]
    fn a_changed_file_yields_only_its_changed_objects() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(
            dir,
            "a.yaml",
            &format!("{WEB}---\n{}", slice("web-1", "10.0.0.1")),
        );
        write(dir, "b.yaml", API);
        let mut source = ManifestSource::new(dir, None).unwrap();
        assert_eq!(source.poll().events.len(), 3);
        assert!(source.poll().events.is_empty(), "nothing changed");

        // Only the slice changed: one event, and b.yaml is not read.
        write(
            dir,
            "a.yaml",
            &format!("{WEB}---\n{}", slice("web-1", "10.0.0.2")),
        );
        let poll = source.poll();
        assert_eq!(events(&poll), ["+EndpointSlice shop/web-1"]);
        assert_eq!(poll.files_read, 1);

        // Rewritten with the same objects: read, but nothing changed.
        write(
            dir,
            "a.yaml",
            &format!("{WEB}---\n{}", slice("web-1", "10.0.0.2")),
        );
        let poll = source.poll();
        assert_eq!((poll.files_read, poll.events.len()), (1, 0));

        // An object dropped from a file is deleted.
        write(dir, "a.yaml", WEB);
        assert_eq!(events(&source.poll()), ["-EndpointSlice shop/web-1"]);
    }

    #[test]
    fn a_deleted_file_deletes_its_objects_unless_another_file_defines_them() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", &format!("{WEB}---\n{API}"));
        write(dir, "b.yaml", API);
        let mut source = ManifestSource::new(dir, None).unwrap();
        let poll = source.poll();
        assert!(
            poll.errors.iter().any(|e| e
                .to_string()
                .contains("(Service default/api): also defined in")),
            "{:?}",
            poll.errors
        );

        fs::remove_file(dir.join("b.yaml")).unwrap();
        let poll = source.poll();
        assert!(
            poll.events.is_empty(),
            "a.yaml still defines api the same way"
        );
        fs::remove_file(dir.join("a.yaml")).unwrap();
        let poll = source.poll();
        assert_eq!(events(&poll), ["-Service default/api", "-Service shop/web"]);
        assert_eq!(source.origins().of(&web_ref()), None);
    }

    #[test]
    fn an_object_a_later_file_stops_defining_comes_back_from_an_earlier_one() {
        let tmp = tempdir();
        let dir = tmp.path();
        let web_81 = WEB.replace("port: 80", "port: 81");
        write(dir, "a.yaml", WEB);
        write(dir, "b.yaml", &format!("{web_81}---\n{API}"));
        let mut source = ManifestSource::new(dir, None).unwrap();
        let poll = source.poll();
        let port = |poll: &Poll| match &poll.events[..] {
            [Event::UpsertService(svc)] => format!("{svc:?}").contains("port: 81"),
            other => panic!("{other:?}"),
        };
        assert!(
            poll.events
                .iter()
                .any(|e| format!("{e:?}").contains("port: 81"))
        );

        // b.yaml drops web: a.yaml's version (read back, not kept in memory) is in effect again.
        write(dir, "b.yaml", API);
        let poll = source.poll();
        assert!(!port(&poll), "a.yaml's port 80 is back: {:?}", poll.events);
        assert_eq!(
            source.origins().of(&web_ref()).as_deref(),
            Some(dir.join("a.yaml").as_path())
        );

        // b.yaml takes it over again, then goes: the same, through a removed file.
        write(dir, "b.yaml", &format!("{web_81}---\n{API}"));
        assert!(port(&source.poll()));
        fs::remove_file(dir.join("b.yaml")).unwrap();
        let poll = source.poll();
        assert_eq!(
            events(&poll),
            ["-Service default/api", "+Service shop/web"],
            "{:?}",
            poll.events
        );
        assert!(format!("{:?}", poll.events[1]).contains("port: 80"));
    }

    #[test]
    fn an_object_that_cannot_be_read_back_keeps_its_version_until_its_file_reads() {
        let tmp = tempdir();
        let dir = tmp.path();
        let web_81 = WEB.replace("port: 80", "port: 81");
        write(dir, "a.yaml", WEB);
        write(dir, "b.yaml", &web_81);
        let mut source = ManifestSource::new(dir, None).unwrap();
        source.poll();

        // a.yaml is rewritten in place into junk (not read yet: it has not held still), and b.yaml
        // drops web: there is nothing to read back, so web stays as it is.
        fs::write(dir.join("a.yaml"), "kind: [").unwrap();
        write(dir, "b.yaml", API);
        let poll = source.poll();
        assert_eq!(events(&poll), ["+Service default/api"]);

        // While a.yaml's web does not deserialize, there is no version of it to keep: the one
        // b.yaml dropped goes.
        write(dir, "a.yaml", &WEB.replace("port: 80", "port: eighty"));
        assert_eq!(events(&source.poll()), ["-Service shop/web"]);

        // Once a.yaml holds a good web again, it is read and web comes from it.
        write(dir, "a.yaml", &WEB.replace("port: 80", "port: 82"));
        let poll = source.poll();
        assert_eq!(events(&poll), ["+Service shop/web"]);
        assert!(format!("{:?}", poll.events[0]).contains("port: 82"));
    }

    #[test]
    fn renamed_into_place_is_read_at_once_written_in_place_once_it_held_still() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", WEB);
        let mut source = ManifestSource::new(dir, None).unwrap();
        source.poll();

        write(dir, "a.yaml", API);
        assert_eq!(
            events(&source.poll()),
            ["+Service default/api", "-Service shop/web"],
            "a new inode is complete: read at once"
        );

        fs::write(dir.join("a.yaml"), WEB).unwrap();
        let poll = source.poll();
        assert_eq!(
            (poll.files_read, poll.events.len()),
            (0, 0),
            "may be half-written"
        );
        let poll = source.poll();
        assert_eq!(events(&poll), ["-Service default/api", "+Service shop/web"]);
    }

    #[test]
    fn a_notified_poll_reads_files_renamed_in_and_leaves_in_place_writes_to_the_timed_poll() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", WEB);
        let mut source = ManifestSource::new(dir, None).unwrap();
        source.poll();

        // Renamed into place, new name or old: read at once.
        write(dir, "b.yaml", API);
        let moved_in = [PathBuf::from("b.yaml")].into();
        assert_eq!(
            events(&source.poll_changes(&moved_in)),
            ["+Service default/api"]
        );
        write(dir, "a.yaml", &WEB.replace("port: 80", "port: 81"));
        let moved_in = [PathBuf::from("a.yaml")].into();
        assert_eq!(
            events(&source.poll_changes(&moved_in)),
            ["+Service shop/web"]
        );

        // Renamed away (an editor's backup) and back: a notified poll takes nothing away; only a
        // timed poll sees a file gone.
        fs::rename(dir.join("b.yaml"), dir.join("b.yaml~")).unwrap();
        assert!(source.poll_changes(&BTreeSet::new()).events.is_empty());
        fs::rename(dir.join("b.yaml~"), dir.join("b.yaml")).unwrap();
        assert!(source.poll().events.is_empty(), "b.yaml was back in time");

        // Written in place, or created and then written: maybe half-way, however many
        // notifications come; read by the timed poll once it held still.
        fs::write(dir.join("a.yaml"), WEB).unwrap();
        fs::write(dir.join("c.yaml"), slice("web-1", "10.0.0.1")).unwrap();
        for _ in 0..3 {
            let poll = source.poll_changes(&BTreeSet::new());
            assert_eq!((poll.files_read, poll.events.len()), (0, 0));
        }
        let poll = source.poll();
        assert_eq!(
            events(&poll),
            ["+EndpointSlice shop/web-1"],
            "c.yaml is new"
        );
        assert_eq!(
            events(&source.poll()),
            ["+Service shop/web"],
            "a.yaml held still"
        );
    }

    #[tokio::test]
    async fn follow_reads_a_file_renamed_into_place_without_waiting_for_the_poll_interval() {
        let tmp = tempdir();
        let dir = tmp.path().to_owned();
        write(&dir, "a.yaml", WEB);
        let (tx, mut rx) = mpsc::channel(16);
        let source = ManifestSource::new(&dir, None).unwrap();
        let following = tokio::spawn(follow(source, Duration::from_secs(3600), tx));
        let first = rx.recv().await.unwrap();
        assert!(first.synced && first.events.len() == 1);

        let written = Instant::now();
        write(&dir, "b.yaml", API);
        let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("read within 5 s, not at the hourly poll")
            .unwrap();
        assert_eq!(batch.events.len(), 1);
        assert!(
            written.elapsed() < Duration::from_millis(500),
            "{:?}",
            written.elapsed()
        );
        following.abort();
    }

    #[test]
    fn junk_yaml_keeps_the_files_previous_objects() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", WEB);
        write(dir, "b.yaml", API);
        let mut source = ManifestSource::new(dir, None).unwrap();
        assert_eq!(source.poll().events.len(), 2);

        write(
            dir,
            "a.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [\n",
        );
        let poll = source.poll();
        assert!(poll.events.is_empty(), "{:?}", events(&poll));
        assert_eq!(poll.errors.len(), 1);
        let message = poll.errors[0].to_string();
        assert!(
            message.starts_with(&format!("{}: not valid YAML", dir.join("a.yaml").display())),
            "{message}"
        );
        assert!(
            message.contains("keeping what this file defined before"),
            "{message}"
        );

        // A file that never parsed has nothing to keep, and says so.
        write(dir, "c.yaml", "kind: [");
        let poll = source.poll();
        let new_file = poll
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
    }

    #[test]
    fn a_bad_field_names_file_document_object_and_field_and_keeps_the_old_version() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", &format!("{API}---\n{WEB}"));
        let mut source = ManifestSource::new(dir, None).unwrap();
        source.poll();

        let bad = WEB.replace("port: 80", "port: eighty");
        write(dir, "a.yaml", &format!("{API}---\n{bad}"));
        let poll = source.poll();
        assert!(poll.events.is_empty(), "the previous version stays");
        let message = poll.errors[0].to_string();
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
        write(dir, "b.yaml", &bad_new);
        let poll = source.poll();
        assert!(poll.events.is_empty());
        assert!(
            poll.errors
                .iter()
                .any(|e| e.to_string().contains("(Service shop/fresh)")
                    && e.to_string().ends_with("skipped"))
        );
    }

    #[test]
    fn a_misspelt_kind_is_named_and_other_kinds_are_not() {
        for (kind, meant) in [
            ("Servcie", Some("Service")),
            ("service", Some("Service")),
            ("Sevice", Some("Service")),
            ("Endpointslice", Some("EndpointSlice")),
            ("EndpointSlices", Some("EndpointSlice")),
            ("Nodes", Some("Node")),
            ("Deployment", None),
            ("Secret", None),
            ("Endpoints", None),
            ("N", None),
        ] {
            assert_eq!(misspelt_kind(kind), meant, "{kind}");
        }
    }

    #[test]
    fn wrong_api_version_and_missing_kind_are_errors() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(
            dir,
            "a.yaml",
            "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n\
             addressType: IPv4\nendpoints: []\n---\nfoo: bar\n",
        );
        let poll = ManifestSource::new(dir, None).unwrap().poll();
        let messages: Vec<String> = poll.errors.iter().map(ToString::to_string).collect();
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
    }

    #[test]
    fn this_nodes_zone_comes_from_its_node() {
        let tmp = tempdir();
        let dir = tmp.path();
        let node = |name: &str, zone: &str| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: \
                 {{topology.kubernetes.io/zone: {zone}}}}}\n"
            )
        };
        write(
            dir,
            "a.yaml",
            &format!("{}---\n{}", node("a", "z1"), node("b", "z2")),
        );
        let mut source = ManifestSource::new(dir, Some("b")).unwrap();
        assert_eq!(events(&source.poll()), ["zone=Some(\"z2\")"]);
        fs::remove_file(dir.join("a.yaml")).unwrap();
        assert_eq!(events(&source.poll()), ["zone=None"]);
    }

    #[test]
    fn a_file_or_directory_that_cannot_be_read_leaves_the_source_incomplete() {
        let tmp = tempdir();
        let dir = tmp.path();
        write(dir, "a.yaml", WEB);
        // Reading /proc/self/mem from offset 0 fails (EIO), even as root.
        std::os::unix::fs::symlink("/proc/self/mem", dir.join("b.yaml")).unwrap();
        let mut source = ManifestSource::new(dir, None).unwrap();
        let poll = source.poll();
        assert!(!poll.complete);
        assert_eq!(events(&poll), ["+Service shop/web"]);
        assert!(
            poll.errors[0].to_string().contains("cannot read")
                && poll.errors[0]
                    .to_string()
                    .ends_with("until every file has been read"),
            "{:?}",
            poll.errors
        );
        let poll = source.poll();
        assert!(!poll.complete && poll.errors.is_empty(), "reported once");

        fs::remove_file(dir.join("b.yaml")).unwrap();
        write(dir, "b.yaml", API);
        let poll = source.poll();
        assert!(poll.complete);
        assert_eq!(events(&poll), ["+Service default/api"]);

        // A directory that cannot be listed: nothing changes, reported once.
        fs::remove_dir_all(dir).unwrap();
        let poll = source.poll();
        assert!(poll.listing_error.is_some() && poll.events.is_empty() && !poll.complete);
        assert!(source.poll().listing_error.is_none(), "reported once");
    }
}
