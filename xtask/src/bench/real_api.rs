//! Endpoint changes through a real API server (issue 9): `kubectl apply` of a changed
//! EndpointSlice → the agent's map write, with etcd, kube-apiserver and kube-controller-manager
//! running as in the control-plane tests ([`ControlPlane`]), and the agent following them.
//!
//! The control plane's Services of the other parts (`ipv4_api_service`, `ipv4_api_slice`):
//! [`SERVICES`] IPv4 Services without a selector, each with a hand-written EndpointSlice of
//! [`BACKENDS`] endpoints labelled `kubernetes.io/service-name` and without the EndpointSlice
//! controller's `managed-by` label (so the controller leaves them alone), in namespace `bench`,
//! all applied (one `kubectl apply` of a List) before the agent starts; the bench waits until
//! `lb-agent list` shows every one. (Service `0`'s ClusterIP, 10.96.0.1, is the `kubernetes`
//! Service's here: the Services are numbered from 1.)
//!
//! Then changes, one at a time, a different Service each time: one Service's EndpointSlice, as
//! JSON with its last endpoint replaced, piped to `kubectl apply -f -` (client-side apply, as a
//! user runs it: kubectl reads its kubeconfig and its discovery cache, GETs the API server's
//! OpenAPI document and the slice, PATCHes it). Each change must make exactly one sync that
//! updates exactly one frontend, and `lb-agent list` must show every change at the end. The agent
//! keeps its default resync interval (10 s); at 100 Services a resync is short, and a change that
//! meets one waits for it.
//!
//! What each change yields (all on the host's realtime clock: the agent's
//! `lb_last_sync_timestamp_seconds` is taken after the map writes; kubectl runs with `-v=7`, whose
//! klog lines carry microsecond times, with `TZ=UTC`):
//! - **kubectl started → maps written**: the whole path a user sees, from just before kubectl is
//!   spawned. It includes kubectl's own start-up (a Go binary loading its kubeconfig and discovery
//!   cache) and its GETs; kubectl alone is timed too, before every [`NOOP_EVERY`]th change
//!   (`kubectl version --client`, and a no-op apply: the same GETs, nothing to change, no
//!   PATCH), so that the reader can subtract it.
//! - **PATCH sent → maps written**: from kubectl's log line just before it sends the PATCH. It
//!   includes the API server's handling (authentication, admission, the etcd write), the watch
//!   event to the agent, and the agent's sync.
//! - **PATCH answered → maps written** (the agent's part): from kubectl's log line once the
//!   response has come (the change is in etcd). The watch event is sent alongside the response,
//!   so this is the watch delivery and the agent's work, give or take the response's own trip:
//!   the agent's sync may even end first (a negative figure).
//! - **kubectl started → exited** for the same applies, and the sync's own phases
//!   (`lb_last_sync_duration_seconds`).
//!
//! Without the control plane's binaries this part is skipped, saying how to provide them; the
//! rest of the bench runs. `LB_BENCH_ONLY=real-api` runs this part alone (see [`ONLY_VAR`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde::Serialize;
use serde_json::json;
use xtask::testbed::{
    Testbed,
    control_plane::{ControlPlane, K8sBinaries},
    probe::now_us,
};

use super::{
    Plan,
    control_plane::Phases,
    report::{self, Report},
    step,
    workload::{
        BACKENDS, ECHO_PORT, Replaced, SERVICE_PORT, cluster_ip, endpoint_change, ipv4_api_service,
        ipv4_api_slice, pod_ip,
    },
};

/// `LB_BENCH_ONLY=real-api`: run only this part (the JSON then holds only its figures).
pub const ONLY_VAR: &str = "LB_BENCH_ONLY";
/// Services (numbered 1..=SERVICES), each with one EndpointSlice of [`BACKENDS`] endpoints.
pub const SERVICES: usize = 100;
/// The namespace of the Services.
const NAMESPACE: &str = "bench";
/// kubectl alone is timed before every `NOOP_EVERY`th change (interleaved, so that drift in the
/// machine's load hits both alike).
const NOOP_EVERY: usize = 5;
/// A bound on one kubectl run.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on one change's sync, once kubectl has exited.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// A bound on all the changes.
const CHANGES_TIMEOUT: Duration = Duration::from_secs(300);
/// A bound on the agent programming every Service at the start.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(30);

/// This part's outcome (`real_api` in the JSON): its figures, or why it did not run.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum RealApiRun {
    Measured(Box<RealApi>),
    Skipped { skipped: String },
}

/// The figures (see the module's documentation for what each includes).
#[derive(Debug, Serialize)]
pub struct RealApi {
    /// The API server's version (`kubectl version`).
    pub kubernetes: String,
    pub services: usize,
    pub endpoints_per_service: u8,
    pub changes: usize,
    /// kubectl started → maps written: the full latency.
    pub apply_to_maps_ms: Spread,
    /// kubectl's PATCH sent → maps written.
    pub patch_sent_to_maps_ms: Spread,
    /// kubectl's PATCH answered → maps written: the agent's part.
    pub patch_answered_to_maps_ms: Spread,
    /// kubectl started → exited, for the same applies.
    pub apply_run_ms: Spread,
    /// kubectl alone: `kubectl version --client`, started → exited.
    pub kubectl_version_client_ms: Spread,
    /// kubectl alone: a no-op `kubectl apply` (the unchanged slice: a GET, no PATCH).
    pub noop_apply_ms: Spread,
    /// How many of each no-op were timed (one before every fifth change).
    pub noop_runs: usize,
    /// The change syncs' own phases, each phase's percentile on its own.
    pub sync_p50_ms: Phases,
    pub sync_p99_ms: Phases,
    /// The requests kubectl made for the first change, in order: method and path, when sent and
    /// when answered (from kubectl's start), and the answer's status.
    pub apply_requests: Vec<String>,
}

/// Percentiles of one figure, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    /// Of samples in microseconds (possibly negative), with the rank rule of
    /// [`super::percentile`].
    fn of(samples_us: &[i64]) -> Self {
        let mut sorted = samples_us.to_vec();
        sorted.sort_unstable();
        let at = |p: f64| match sorted.len() {
            0 => f64::NAN,
            n => sorted[((p / 100.0) * (n - 1) as f64).round() as usize] as f64 / 1000.0,
        };
        Self {
            p50: at(50.0),
            p99: at(99.0),
            max: at(100.0),
        }
    }
}

/// Whether `LB_BENCH_ONLY` asks for this part alone.
pub fn only() -> bool {
    std::env::var(ONLY_VAR).as_deref() == Ok("real-api")
}

/// This part alone: measures, prints its table and writes the JSON (every other part empty).
pub fn run_alone(agent_bin: &Path, plan: Plan) -> anyhow::Result<()> {
    step(&format!(
        "{ONLY_VAR}=real-api: only the changes through a real API server"
    ));
    let started = Instant::now();
    let load_average = report::load_average();
    let real_api = measure(agent_bin, plan.real_api_changes)?;
    let report = Report {
        machine: report::machine(),
        datapath: BTreeMap::new(),
        programming: BTreeMap::new(),
        host: None,
        throughput_connects_per_s: BTreeMap::new(),
        control_plane: None,
        real_api: Some(real_api),
        run_seconds: started.elapsed().as_secs_f64(),
        load_average: [load_average, report::load_average()],
    };
    if let Some(real_api) = &report.real_api {
        print(real_api);
    }
    println!(
        "\nLoad average (1, 5, 15 min) at the start: {}; at the end: {}",
        report.load_average[0], report.load_average[1]
    );
    super::save(&report)
}

/// Starts a real control plane and a testbed with the agent following it, and measures
/// `changes` endpoint changes (at most [`SERVICES`]: a different Service each) as the module says.
/// Without the binaries: [`RealApiRun::Skipped`], after a note saying how to provide them.
pub fn measure(agent_bin: &Path, changes: usize) -> anyhow::Result<RealApiRun> {
    ensure!(
        changes <= SERVICES,
        "{changes} changes: at most one per Service ({SERVICES})"
    );
    let binaries = match K8sBinaries::locate() {
        Ok(binaries) => binaries,
        Err(e) => {
            // The error says how to provide them.
            eprintln!("note: skipping the changes through a real API server: {e:#}");
            return Ok(RealApiRun::Skipped {
                skipped: format!("{e:#}"),
            });
        }
    };
    step(&format!(
        "changes through a real API server: {SERVICES} IPv4 Services × {BACKENDS} endpoints, \
         {changes} changes (a `kubectl apply` of one EndpointSlice each)"
    ));
    // Declared first, dropped last: the agent stops before its API server.
    let control_plane = ControlPlane::start(&binaries)?;
    let kubectl = Kubectl::new(&binaries, &control_plane)?;
    let version: serde_json::Value =
        serde_json::from_str(&control_plane.kubectl(&["version", "-o", "json"])?)?;
    let kubernetes = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or("unknown")
        .to_owned();

    let mut tb = Testbed::new(agent_bin, Path::new("/proc/self/exe"), &[])?;
    control_plane.kubectl(&["create", "namespace", NAMESPACE])?;
    let mut replaced = Replaced::new();
    // As the changes will write the slices (JSON, whose `kubectl apply` annotation a no-op apply
    // must find unchanged).
    let items: Vec<serde_json::Value> = (1..=SERVICES)
        .flat_map(|i| [ipv4_api_service(i), ipv4_api_slice(i, &replaced)])
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    control_plane.kubectl_with_input(&["apply", "-f", "-"], &list.to_string())?;
    // A node of the testbed's own name: no Node object, so no zone.
    tb.use_kubeconfig(control_plane.kubeconfig(), &format!("{}-node", tb.id));
    tb.start_agent()?;
    wait_listed(&tb, &replaced, PROGRAMMED_TIMEOUT)?;

    let noop_runs = changes.div_ceil(NOOP_EVERY);
    step(&format!(
        "{changes} endpoint changes, one at a time, each `kubectl apply -f -` of one \
         EndpointSlice; before every {NOOP_EVERY}th, kubectl alone: `kubectl version --client` \
         and a no-op apply"
    ));
    let mut version_us = Vec::with_capacity(noop_runs);
    let mut noop_us = Vec::with_capacity(noop_runs);
    let mut samples: Vec<Sample> = Vec::with_capacity(changes);
    let mut apply_requests = Vec::new();
    let deadline = Instant::now() + CHANGES_TIMEOUT;
    for n in 0..changes {
        ensure!(
            Instant::now() < deadline,
            "{n} endpoint changes of {changes} in {CHANGES_TIMEOUT:?}"
        );
        let (index, ip) = endpoint_change(n, SERVICES);
        let index = index + 1;
        if n % NOOP_EVERY == 0 {
            let run = kubectl.run(&["version", "--client"], None)?;
            version_us.push(run.took_us());
            // The slice about to change, as it is.
            let slice = serde_json::to_string(&ipv4_api_slice(index, &replaced))?;
            let syncs = tb.agent().metrics()?.syncs()?;
            let run = kubectl.run(&["apply", "-f", "-"], Some(&slice))?;
            ensure!(
                run.stdout.contains("unchanged") && patch_times(&run).is_err(),
                "a no-op apply changed something: {}",
                run.stdout.trim()
            );
            ensure!(
                tb.agent().metrics()?.syncs()? == syncs,
                "the agent synced after a no-op apply"
            );
            noop_us.push(run.took_us());
        }
        replaced.insert(index, ip);
        let slice = serde_json::to_string(&ipv4_api_slice(index, &replaced))?;
        let before = tb.agent().metrics()?;
        let run = kubectl.run(&["apply", "-f", "-"], Some(&slice))?;
        ensure!(
            run.stdout.contains("configured"),
            "kubectl apply of a changed slice: {}",
            run.stdout.trim()
        );
        let (sent, answered) = patch_times(&run)?;
        if n == 0 {
            apply_requests = requests(&run);
        }
        // Nothing else makes the agent sync now: the next sync is the one that applied it.
        let synced = tb.agent().wait_synced(before.syncs()?, CHANGE_TIMEOUT)?;
        let (now, then) = (synced.frontend_writes()?, before.frontend_writes()?);
        let written: [u64; 3] = std::array::from_fn(|i| now[i] - then[i]);
        ensure!(
            synced.syncs()? == before.syncs()? + 1 && written == [0, 1, 0],
            "unexpected syncs for a one-endpoint change: {} syncs; frontends added, updated, \
             removed: {written:?}",
            synced.syncs()? - before.syncs()?
        );
        let written_at = synced.last_sync_us()? as i64;
        let phases = Phases::of(&synced)?;
        samples.push(Sample {
            apply_to_maps: written_at - run.started as i64,
            sent_to_maps: written_at - sent as i64,
            answered_to_maps: written_at - answered as i64,
            apply_run: run.took_us(),
            phases: [phases.read, phases.model, phases.apply].map(|ms| (ms * 1e3).round() as i64),
        });
        if n % 20 == 19 {
            eprint!("    {}/{changes}\r", n + 1);
        }
    }
    eprintln!();
    wait_listed(&tb, &replaced, CHANGE_TIMEOUT)?;
    tb.stop_agent()?;
    drop(tb);
    drop(control_plane);

    let spread =
        |figure: fn(&Sample) -> i64| Spread::of(&samples.iter().map(figure).collect::<Vec<_>>());
    let phases = |pick: fn(&Spread) -> f64| {
        let [read, model, apply] = std::array::from_fn(|i| {
            let phase: Vec<i64> = samples.iter().map(|s| s.phases[i]).collect();
            pick(&Spread::of(&phase))
        });
        Phases { read, model, apply }
    };
    Ok(RealApiRun::Measured(Box::new(RealApi {
        kubernetes,
        services: SERVICES,
        endpoints_per_service: BACKENDS,
        changes: samples.len(),
        apply_to_maps_ms: spread(|s| s.apply_to_maps),
        patch_sent_to_maps_ms: spread(|s| s.sent_to_maps),
        patch_answered_to_maps_ms: spread(|s| s.answered_to_maps),
        apply_run_ms: spread(|s| s.apply_run),
        kubectl_version_client_ms: Spread::of(&version_us),
        noop_apply_ms: Spread::of(&noop_us),
        noop_runs: noop_us.len(),
        sync_p50_ms: phases(|s| s.p50),
        sync_p99_ms: phases(|s| s.p99),
        apply_requests,
    })))
}

/// One change's figures, in microseconds.
struct Sample {
    apply_to_maps: i64,
    sent_to_maps: i64,
    answered_to_maps: i64,
    apply_run: i64,
    /// read, model, apply.
    phases: [i64; 3],
}

/// Our kubectl with the control plane's kubeconfig and cache (its discovery cache is warm after
/// the setup's runs), run here rather than through [`ControlPlane::kubectl`] to read its log (on
/// stderr) and to time its exit.
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache_dir: PathBuf,
}

/// One kubectl run: when it was started and when it exited (µs since the epoch), and its output.
struct Run {
    started: u64,
    exited: u64,
    stdout: String,
    stderr: String,
}

impl Run {
    fn took_us(&self) -> i64 {
        self.exited as i64 - self.started as i64
    }
}

impl Kubectl {
    fn new(binaries: &K8sBinaries, control_plane: &ControlPlane) -> anyhow::Result<Self> {
        let kubeconfig = control_plane.kubeconfig().to_owned();
        let dir = kubeconfig
            .parent()
            .context("the kubeconfig has no directory")?;
        Ok(Self {
            bin: binaries.kubectl.clone(),
            cache_dir: dir.join("kubectl-cache"),
            kubeconfig,
        })
    }

    /// `kubectl -v=7 ARGS` with `stdin` piped in; fails if it fails or takes over
    /// [`KUBECTL_TIMEOUT`] (then it is killed).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<Run> {
        let what = format!("kubectl {}", args.join(" "));
        let mut command = Command::new(&self.bin);
        command
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache_dir.display()))
            // Every request logged with microsecond times: its request line before it is sent,
            // its status once answered.
            .arg("-v=7")
            .args(args)
            // klog writes local time: UTC, to compare with the epoch.
            .env("TZ", "UTC")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = now_us();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A slice is ~1 KB: the pipe takes it whole, without waiting for kubectl.
            pipe.write_all(input.as_bytes())?;
        }
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out: Output = match rx.recv_timeout(KUBECTL_TIMEOUT) {
            Ok(out) => out?,
            Err(_) => {
                // SAFETY: plain syscall; the child is not reaped until the thread's wait returns.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                let _ = rx.recv();
                bail!("{what} did not finish within {KUBECTL_TIMEOUT:?} and was killed");
            }
        };
        let exited = now_us();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        ensure!(
            out.status.success(),
            "{what} failed ({}): {}",
            out.status,
            stderr.trim()
        );
        Ok(Run {
            started,
            exited,
            stdout,
            stderr,
        })
    }
}

/// When kubectl sent its PATCH and when the answer came, in µs since the epoch, from its `-v=7`
/// log: the request line (`PATCH https://...`) and the next `Response Status:` line.
fn patch_times(run: &Run) -> anyhow::Result<(u64, u64)> {
    let mut sent = None;
    for line in run.stderr.lines() {
        let Some((at, message)) = klog(line, run.started) else {
            continue;
        };
        match sent {
            None if message.starts_with("PATCH https://") => sent = Some(at),
            Some(sent) if message.starts_with("Response Status:") => return Ok((sent, at)),
            _ => {}
        }
    }
    bail!(
        "no PATCH and its answer in kubectl's log:\n{}",
        run.stderr.trim()
    )
}

/// The requests in kubectl's `-v=7` log, in order: method and path, when it was sent and when
/// answered (ms since kubectl was started), and the answer's status.
fn requests(run: &Run) -> Vec<String> {
    let ms = |at: u64| (at as f64 - run.started as f64) / 1000.0;
    let mut requests: Vec<(String, Option<String>)> = Vec::new();
    for (at, message) in run.stderr.lines().filter_map(|l| klog(l, run.started)) {
        if let Some(status) = message.strip_prefix("Response Status: ") {
            let status = status.split(" in ").next().unwrap_or(status);
            if let Some((_, answer @ None)) = requests.last_mut() {
                *answer = Some(format!(", {status} at +{:.1} ms", ms(at)));
            }
        } else if let Some((method, url)) = message.split_once(" https://")
            && !method.contains(' ')
        {
            let path = url.split_once('/').map_or("", |(_, path)| path);
            requests.push((format!("{method} /{path}: sent at +{:.1} ms", ms(at)), None));
        }
    }
    requests
        .into_iter()
        .map(|(sent, answer)| sent + answer.as_deref().unwrap_or(", no answer logged"))
        .collect()
}

/// A klog line (`I1126 14:10:10.123456   4242 file.go:12] message`, UTC): its time in µs since
/// the epoch, taken as the one within 12 hours of `reference` (µs since the epoch), and its
/// message.
fn klog(line: &str, reference: u64) -> Option<(u64, &str)> {
    const DAY: i64 = 86_400_000_000;
    let rest = line.get(1..)?;
    let (_date, rest) = rest.split_once(' ')?;
    let (time, rest) = rest.split_once(' ')?;
    let (_, message) = rest.split_once("] ")?;
    let (hms, micros) = time.split_once('.')?;
    let mut fields = hms.split(':').map(|f| f.parse::<i64>().ok());
    let (h, m, s) = (fields.next()??, fields.next()??, fields.next()??);
    let micros: i64 = micros.parse().ok()?;
    let of_day = ((h * 60 + m) * 60 + s) * 1_000_000 + micros;
    let delta = (of_day - (reference as i64).rem_euclid(DAY)).rem_euclid(DAY);
    let delta = if delta >= DAY / 2 { delta - DAY } else { delta };
    Some(((reference as i64 + delta) as u64, message))
}

/// Waits (at most `timeout`) until `lb-agent list` shows every Service with the endpoints
/// `replaced` says.
fn wait_listed(tb: &Testbed, replaced: &Replaced, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let e = match check_listed(tb, replaced) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(e.context(format!("the maps after {timeout:?}")));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Every Service's frontend has exactly its endpoints, as `lb-agent list` shows the maps.
fn check_listed(tb: &Testbed, replaced: &Replaced) -> anyhow::Result<()> {
    let listing = tb.listing()?;
    let listed: BTreeMap<(String, u16), BTreeSet<(String, u16)>> = listing
        .frontends
        .into_iter()
        .filter(|row| row.service.namespace == NAMESPACE)
        .map(|row| {
            let backends = row.backends.into_iter().map(|b| (b.address, b.port));
            (
                (row.frontend.address, row.frontend.port),
                backends.collect(),
            )
        })
        .collect();
    for index in 1..=SERVICES {
        let frontend = (cluster_ip(index).to_string(), SERVICE_PORT);
        let wanted: BTreeSet<(String, u16)> = (0..BACKENDS)
            .map(|p| match replaced.get(&index) {
                Some(&ip) if p == BACKENDS - 1 => ip,
                _ => pod_ip(p),
            })
            .map(|ip| (ip.to_string(), ECHO_PORT))
            .collect();
        let backends = listed
            .get(&frontend)
            .with_context(|| format!("{frontend:?} is not in the maps"))?;
        ensure!(
            *backends == wanted,
            "{frontend:?} has {backends:?} in the maps, not {wanted:?}"
        );
    }
    Ok(())
}

/// The part's table.
pub fn print(run: &RealApiRun) {
    let r = match run {
        RealApiRun::Skipped { skipped } => {
            println!("\nChanges through a real API server: skipped: {skipped}");
            return;
        }
        RealApiRun::Measured(r) => r,
    };
    println!(
        "\nChanges through a real API server (kube-apiserver {}): {} IPv4 Services × {} \
         endpoints; {} changes, each a `kubectl apply -f -` of one EndpointSlice",
        r.kubernetes, r.services, r.endpoints_per_service, r.changes
    );
    println!("  {:<52} {:>8} {:>8} {:>8}", "(ms)", "p50", "p99", "max");
    let row = |what: &str, s: &Spread| {
        println!("  {what:<52} {:>8.2} {:>8.2} {:>8.2}", s.p50, s.p99, s.max);
    };
    row("kubectl started → maps written", &r.apply_to_maps_ms);
    row("  PATCH sent → maps written", &r.patch_sent_to_maps_ms);
    row(
        "  PATCH answered → maps written (the agent's part)",
        &r.patch_answered_to_maps_ms,
    );
    row("  kubectl started → exited", &r.apply_run_ms);
    row(
        &format!("kubectl alone: version --client ({} runs)", r.noop_runs),
        &r.kubectl_version_client_ms,
    );
    row(
        &format!("kubectl alone: a no-op apply ({} runs)", r.noop_runs),
        &r.noop_apply_ms,
    );
    let phases = |p: &Phases| format!("{:.2} / {:.2} / {:.2}", p.read, p.model, p.apply);
    println!(
        "  change syncs, read / model / apply: p50 {}, p99 {}",
        phases(&r.sync_p50_ms),
        phases(&r.sync_p99_ms)
    );
    println!("  kubectl's requests for the first change:");
    for request in &r.apply_requests {
        println!("    {request}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn klog_times_are_placed_near_the_reference() {
        // 2026-11-26 14:10:10 UTC.
        let reference = 1_795_702_210_000_000;
        let line =
            "I1126 14:10:10.123456   4242 round_trippers.go:463] PATCH https://127.0.0.1:1/x";
        let (at, message) = klog(line, reference).unwrap();
        assert_eq!(at, reference + 123_456);
        assert_eq!(message, "PATCH https://127.0.0.1:1/x");
        // Just before midnight for a reference just after it.
        let line = "I1126 23:59:59.900000    1 a.go:1] x";
        assert_eq!(
            klog(line, 1_795_737_600_000_000 + 50_000).unwrap().0,
            1_795_737_600_000_000 - 100_000
        );
        assert!(klog("not a klog line", reference).is_none());
    }

    #[test]
    fn the_patch_and_its_answer_are_read_from_the_log() {
        let reference = 1_795_702_210_000_000;
        let run = Run {
            started: reference,
            exited: reference + 90_000,
            stdout: String::new(),
            stderr: "I1126 14:10:10.050000 1 round_trippers.go:463] GET https://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-1-a\n\
                     I1126 14:10:10.052000 1 round_trippers.go:574] Response Status: 200 OK in 2 milliseconds\n\
                     I1126 14:10:10.060000 1 round_trippers.go:463] PATCH https://127.0.0.1:6443/apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-1-a\n\
                     I1126 14:10:10.060100 1 round_trippers.go:469] Request Headers:\n\
                     I1126 14:10:10.064000 1 round_trippers.go:574] Response Status: 200 OK in 3 milliseconds\n"
                .into(),
        };
        assert_eq!(
            patch_times(&run).unwrap(),
            (reference + 60_000, reference + 64_000)
        );
        assert_eq!(
            requests(&run),
            [
                "GET /apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-1-a: sent at \
                 +50.0 ms, 200 OK at +52.0 ms",
                "PATCH /apis/discovery.k8s.io/v1/namespaces/bench/endpointslices/svc-1-a: sent at \
                 +60.0 ms, 200 OK at +64.0 ms"
            ]
        );
    }

    #[test]
    fn spreads_keep_negative_samples() {
        let s = Spread::of(&[-500, 1_000, 2_000, 3_000]);
        assert_eq!((s.p50, s.max), (2.0, 3.0));
        assert!(Spread::of(&[]).p50.is_nan());
    }
}
