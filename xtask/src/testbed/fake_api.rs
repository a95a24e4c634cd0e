//! A stand-in Kubernetes API server on 127.0.0.1 that speaks the real wire format: list
//! responses and chunked watch streams of JSON events, as captured from kube-apiserver in
//! `lb-agent/tests/fixtures/k8s-api`. Tests drive it: push watch events, drop watches, answer the
//! next watch with 410 Expired, delay a list, or go down.
//!
//! Only for what the real control plane ([`super::control_plane`], used by `tests/cluster.rs`)
//! cannot do on demand: objects the real API server would reject (the bad-input corpus), a list
//! that is slow on purpose, an outage seen by the agent alone while objects go on changing, and
//! replaying captured objects (topology hints) that v1.26's controllers do not write here.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

pub const SERVICES: &str = "/api/v1/services";
pub const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";

/// Longest a watch is held open (the real server ends them after timeoutSeconds too).
const MAX_WATCH: Duration = Duration::from_secs(60);

struct Resource {
    list_kind: &'static str,
    api_version: &'static str,
    items: BTreeMap<(String, String), Value>,
    /// Every event pushed, with its resourceVersion, for watches to replay from theirs.
    events: Vec<(u64, Value)>,
    expire_next_watch: bool,
    list_delay: Duration,
}

#[derive(Default)]
struct State {
    resources: BTreeMap<&'static str, Resource>,
    resource_version: u64,
    /// Bumped to end every open watch.
    generation: u64,
    down: bool,
    requests: Vec<String>,
}

pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
}

impl FakeApi {
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut state = State::default();
        for (path, list_kind, api_version) in [
            (SERVICES, "ServiceList", "v1"),
            (ENDPOINT_SLICES, "EndpointSliceList", "discovery.k8s.io/v1"),
            (NODES, "NodeList", "v1"),
        ] {
            state.resources.insert(
                path,
                Resource {
                    list_kind,
                    api_version,
                    items: BTreeMap::new(),
                    events: Vec::new(),
                    expire_next_watch: false,
                    list_delay: Duration::ZERO,
                },
            );
        }
        let shared = Arc::new((Mutex::new(state), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (accept_shared, accept_stop) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            while !accept_stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let shared = accept_shared.clone();
                        let stop = accept_stop.clone();
                        thread::spawn(move || {
                            let _ = serve(stream, &shared, &stop);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, shared, stop })
    }

    /// A kubeconfig pointing at this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n",
            self.addr
        );
        std::fs::write(path, text).context("writing the kubeconfig")
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, condvar) = &*self.shared;
        let out = f(&mut lock.lock().unwrap());
        condvar.notify_all();
        out
    }

    /// Replaces a resource's objects with a captured list (`{"metadata": {"resourceVersion"},
    /// "items": [...]}`), without events.
    pub fn load_list(&self, path: &'static str, list: &Value) {
        self.with(|state| {
            let rv = list["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            state.resource_version = state.resource_version.max(rv);
            let resource = state.resources.get_mut(path).expect("known path");
            resource.items = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|item| (object_key(item), item.clone()))
                .collect();
        });
    }

    /// Sets objects (as YAML or JSON text) without events, as if changed while nobody watched.
    pub fn put(&self, path: &'static str, object: Value) {
        self.with(|state| {
            state.resource_version += 1;
            let mut object = object;
            object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state
                .resources
                .get_mut(path)
                .expect("known path")
                .items
                .insert(object_key(&object), object);
        });
    }

    /// Removes an object without an event.
    pub fn remove(&self, path: &'static str, namespace: &str, name: &str) {
        self.with(|state| {
            state.resource_version += 1;
            let resource = state.resources.get_mut(path).expect("known path");
            resource
                .items
                .remove(&(namespace.to_owned(), name.to_owned()));
        });
    }

    /// Applies a watch event (`{"type", "object"}`) to the objects and sends it to watchers.
    /// Captured events keep their resourceVersion; others get the next one.
    pub fn push_event(&self, path: &'static str, event: &Value) {
        self.with(|state| {
            let mut event = event.clone();
            let captured = event["object"]["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok());
            let rv = captured
                .filter(|&rv| rv > state.resource_version)
                .unwrap_or(state.resource_version + 1);
            state.resource_version = rv;
            event["object"]["metadata"]["resourceVersion"] = json!(rv.to_string());
            let resource = state.resources.get_mut(path).expect("known path");
            let key = object_key(&event["object"]);
            match event["type"].as_str() {
                Some("ADDED" | "MODIFIED") => {
                    resource.items.insert(key, event["object"].clone());
                }
                Some("DELETED") => {
                    resource.items.remove(&key);
                }
                _ => {}
            }
            resource.events.push((rv, event));
        });
    }

    /// Ends every open watch, as a server restart or a load balancer timeout would.
    pub fn drop_watches(&self) {
        self.with(|state| state.generation += 1);
    }

    /// Answers the next watch of `path` with the 410 Expired error a compacted etcd gives.
    pub fn expire_next_watch(&self, path: &'static str) {
        self.with(|state| {
            state
                .resources
                .get_mut(path)
                .expect("known path")
                .expire_next_watch = true
        });
    }

    pub fn set_list_delay(&self, path: &'static str, delay: Duration) {
        self.with(|state| {
            state
                .resources
                .get_mut(path)
                .expect("known path")
                .list_delay = delay
        });
    }

    /// Down: every connection is closed at once and open watches end.
    pub fn set_down(&self, down: bool) {
        self.with(|state| {
            state.down = down;
            state.generation += 1;
        });
    }

    /// Request lines received so far.
    pub fn requests(&self) -> Vec<String> {
        self.with(|state| state.requests.clone())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_watches();
    }
}

fn object_key(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    (text(&meta["namespace"]), text(&meta["name"]))
}

fn serve(
    stream: TcpStream,
    shared: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: BTreeMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    let watch = matches!(params.get("watch"), Some(&"true" | &"1"));
    let name_filter = params
        .get("fieldSelector")
        .and_then(|s| {
            s.strip_prefix("metadata.name%3D")
                .or_else(|| s.strip_prefix("metadata.name="))
        })
        .map(str::to_owned);

    let (lock, condvar) = shared;
    let mut state = lock.lock().unwrap();
    state.requests.push(request_line.trim().to_owned());
    if state.down {
        return Ok(()); // dropping the stream closes the connection unanswered
    }
    let Some(resource) = state.resources.get(path) else {
        drop(state);
        return respond(
            stream,
            "404 Not Found",
            &json!({"kind": "Status", "code": 404}),
        );
    };
    let matches = |object: &Value| {
        name_filter
            .as_deref()
            .is_none_or(|n| object["metadata"]["name"] == n)
    };

    if !watch {
        let delay = resource.list_delay;
        drop(state);
        thread::sleep(delay);
        let state = lock.lock().unwrap();
        let resource = &state.resources[path];
        // Pages of `limit`, as kube-apiserver gives them; the continue token is the next offset.
        let items: Vec<&Value> = resource.items.values().filter(|o| matches(o)).collect();
        let start: usize = params
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let limit: usize = params
            .get("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(usize::MAX);
        let end = start.saturating_add(limit).min(items.len());
        let mut metadata = json!({"resourceVersion": state.resource_version.to_string()});
        if end < items.len() {
            metadata["continue"] = json!(end.to_string());
        }
        let body = json!({
            "kind": resource.list_kind,
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": items[start.min(end)..end],
        });
        drop(state);
        return respond(stream, "200 OK", &body);
    }

    let since: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let generation = state.generation;
    let expire = resource.expire_next_watch;
    state.resources.get_mut(path).unwrap().expire_next_watch = false;
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    if expire {
        drop(state);
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        });
        chunk(&mut out, &json!({"type": "ERROR", "object": status}))?;
        return finish(out);
    }
    let mut sent = 0usize;
    let started = Instant::now();
    loop {
        let resource = &state.resources[path];
        let new: Vec<Value> = resource
            .events
            .iter()
            .skip(sent)
            .filter(|(rv, e)| *rv > since && (e["type"] == "BOOKMARK" || matches(&e["object"])))
            .map(|(_, e)| e.clone())
            .collect();
        sent = resource.events.len();
        let ended = state.generation != generation
            || state.down
            || stop.load(Ordering::Relaxed)
            || started.elapsed() > MAX_WATCH;
        drop(state);
        for event in &new {
            chunk(&mut out, event)?;
        }
        if ended {
            return finish(out);
        }
        state = condvar
            .wait_timeout(lock.lock().unwrap(), Duration::from_millis(200))
            .unwrap()
            .0;
    }
}

fn respond(mut stream: TcpStream, status: &str, body: &Value) -> anyhow::Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn chunk(out: &mut TcpStream, event: &Value) -> anyhow::Result<()> {
    let line = format!("{event}\n");
    write!(out, "{:x}\r\n{line}\r\n", line.len())?;
    out.flush()?;
    Ok(())
}

fn finish(mut out: TcpStream) -> anyhow::Result<()> {
    write!(out, "0\r\n\r\n")?;
    Ok(())
}
