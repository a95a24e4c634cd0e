//! lb-agent on a real control plane: etcd, kube-apiserver and kube-controller-manager (v1.26, from
//! `../shared/k8s` or `LB_K8S_BIN_DIR`; see xtask::testbed::control_plane), with the testbed's own
//! nodes running Pods as network namespaces (xtask::testbed::node). Each test drives it with
//! `kubectl`, as a user does, and checks what a client in the testbed's cgroup sees.
//!
//! One control plane serves every test (it takes some seconds to start); each test has its own
//! namespace, nodes and testbed. Root only. Without the binaries the tests are reported as ignored
//! with how to provide them, except in CI (`CI=true`), where that is a failure.
#![deny(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::ensure;
use libtest_mimic::{Arguments, Trial};
use xtask::testbed::{
    Resolv, agent,
    cluster::{ClusterBed, describe, names},
    control_plane::{ControlPlane, K8sBinaries},
    probe::Attempt,
};

type ClusterTest = fn(&ControlPlane) -> anyhow::Result<()>;

/// A client program's time limit.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let tests: Vec<(&str, ClusterTest)> = vec![
        (
            "seed_exercise_deployment_service_scale_and_delete_through_kubectl",
            seed_exercise,
        ),
        (
            "a_service_whose_selector_matches_no_pod_refuses_connects_at_once",
            selector_matches_nothing,
        ),
        (
            "rollout_restart_under_continuous_connects_fails_none",
            rollout_restart,
        ),
        (
            "a_pod_turning_not_ready_leaves_the_backends_within_1s_of_its_slice_and_comes_back",
            readiness,
        ),
        (
            "internal_traffic_policy_local_uses_only_this_nodes_pods",
            traffic_policy_local,
        ),
        (
            "after_an_api_server_restart_and_410_expired_the_maps_equal_a_fresh_start",
            restart_and_expired,
        ),
    ];
    let control_plane = match start_control_plane(&args) {
        Ok(control_plane) => control_plane,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            let control_plane = control_plane.clone();
            let ignored = control_plane.is_none();
            Trial::test(name, move || {
                let control_plane = control_plane.as_deref().expect("not run when ignored");
                test(control_plane).map_err(|e| format!("{e:#}").into())
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Stopped here, not at exit: statics are never dropped.
    drop(control_plane);
    conclusion.exit();
}

/// The control plane, or `None` (tests ignored) when its binaries are missing outside CI.
fn start_control_plane(args: &Arguments) -> anyhow::Result<Option<Arc<ControlPlane>>> {
    if args.list {
        return Ok(None);
    }
    let Some(binaries) = K8sBinaries::locate_for_tests()? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(ControlPlane::start(&binaries)?)))
}

/// A test's own namespace, one node per zone in `zones` (the agent on the first), and the agent.
fn bed(control_plane: &ControlPlane, test: &str, zones: &[&str]) -> anyhow::Result<ClusterBed> {
    ClusterBed::start(
        control_plane,
        &agent::default_bin(),
        Path::new(env!("CARGO_BIN_EXE_xtask")),
        test,
        zones,
    )
}

/// The exercise a new user runs: a Deployment of 3 nginx replicas and a ClusterIP Service.
const WEB: &str = include_str!("../../deploy/examples/seed/web.yaml");

fn seed_exercise(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let mut bed = bed(control_plane, "seed", &["a"])?;
    eprintln!("$ kubectl apply -f web.yaml");
    eprint!("{}", bed.apply(control_plane, WEB)?);
    let pods = bed
        .nodes
        .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
    let ip = bed.cluster_ip(control_plane, "web")?;
    let web = SocketAddr::from((ip, 80));
    let took = bed.wait_answered_by(web, &names(&pods))?;
    eprintln!("$ kubectl get endpoints web");
    eprint!(
        "{}",
        bed.kubectl(control_plane, &["get", "endpoints", "web"])?
    );
    eprintln!(
        "http://{ip}/ answered by all 3 Pods ({} ms after they were ready)",
        took.as_millis()
    );

    // By name, as a Pod resolves it: kube-dns (a Service in front of a real DNS server) answers
    // for web.<namespace>.svc.cluster.local.
    let dns = bed.add_kube_dns(control_plane, &[("web", ip)])?;
    let resolv = Resolv::pod(&bed.namespace, &[dns.into()]);
    let mut seen = BTreeSet::new();
    for _ in 0..15 {
        let out = bed.tb.client_command(
            &resolv,
            "busybox",
            &["wget", "-qO-", "http://web/"],
            CLIENT_TIMEOUT,
        )?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            out.status.success() && names(&pods).contains(&body),
            "wget http://web/ gave {body:?} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        seen.insert(body);
    }
    eprintln!("wget http://web/ (by name) answered by {seen:?}");
    ensure!(seen.len() >= 2, "15 fetches by name all went to {seen:?}");

    for replicas in [5, 2] {
        eprintln!("$ kubectl scale deployment web --replicas={replicas}");
        eprint!(
            "{}",
            bed.kubectl(
                control_plane,
                &[
                    "scale",
                    "deployment",
                    "web",
                    &format!("--replicas={replicas}")
                ]
            )?
        );
        let pods =
            bed.nodes
                .wait_ready(&bed.namespace, "web-", replicas, Duration::from_secs(30))?;
        let took = bed.wait_answered_by(web, &names(&pods))?;
        eprintln!(
            "{replicas} replicas: answered by {:?} ({} ms after the Pods settled)",
            names(&pods),
            took.as_millis()
        );
    }

    eprintln!("$ kubectl delete -f web.yaml");
    eprint!("{}", bed.delete(control_plane, WEB)?);
    // Once the Service is gone its ClusterIP is not translated: the client's unreachable route
    // answers (nothing leaves the namespace).
    let started = Instant::now();
    loop {
        let attempts = bed.connect(web, 5)?;
        if attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("EHOSTUNREACH"))
        {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "10 s after the delete, {web} still gives {:?}",
            attempts.iter().map(describe).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("after the delete, {web} is no longer translated");
    Ok(())
}

/// A Service whose selector matches no Pod: the EndpointSlice controller gives it an empty
/// slice, and connects to it are refused at once.
fn selector_matches_nothing(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let bed = bed(control_plane, "nomatch", &["a"])?;
    bed.apply(
        control_plane,
        "apiVersion: v1
kind: Service
metadata:
  name: cache
spec:
  selector:
    app: no-such-app
  ports:
  - port: 6379
",
    )?;
    let ip = bed.cluster_ip(control_plane, "cache")?;
    let cache = SocketAddr::from((ip, 6379));
    let started = Instant::now();
    let attempts = loop {
        let attempts = bed.connect(cache, 20)?;
        if attempts
            .iter()
            .all(|a| a.error.as_deref() == Some("ECONNREFUSED"))
        {
            break attempts;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "10 s after the apply, {cache} gives {:?}",
            attempts.iter().map(describe).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let slowest = attempts.iter().map(|a| a.connect_us).max().unwrap_or(0);
    ensure!(slowest < 10_000, "a refusal took {slowest} µs");
    eprintln!(
        "{cache} refused {} connects, the slowest in {slowest} µs",
        attempts.len()
    );
    Ok(())
}

/// A Deployment of `replicas` Pods of the testbed's pod server (answering their name on 8080) and
/// a Service `name` in front of them on port 80, with `policy` as its internalTrafficPolicy.
fn pod_server_app(name: &str, replicas: usize, policy: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
    spec:
      containers:
      - name: server
        image: lb-testbed/pod-server
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  internalTrafficPolicy: {policy}
  selector:
    app: {name}
  ports:
  - port: 80
    targetPort: 8080
"
    )
}

/// `kubectl rollout restart` of a 3-replica Deployment while two clients connect without pause:
/// every connect is answered. New Pods join as they become ready; old ones turn not ready,
/// leave the backend set, and keep serving the connects already made to them until their preStop
/// delay is over.
fn rollout_restart(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let bed = bed(control_plane, "rollout", &["a"])?;
    bed.apply(control_plane, &pod_server_app("web", 3, "Cluster"))?;
    let before = bed
        .nodes
        .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
    let web = SocketAddr::from((bed.cluster_ip(control_plane, "web")?, 80));
    bed.wait_answered_by(web, &names(&before))?;

    // Long enough for the rollout and the old Pods' preStop delay (checked below).
    let window = Duration::from_secs(15);
    let mut args = bed.tb.probe_args(web, 1_000_000);
    args.duration_ms = Some(window.as_millis() as u64);
    args.interval_ms = 2;
    let started = Instant::now();
    let clients = [bed.tb.start_probe(&args)?, bed.tb.start_probe(&args)?];
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("$ kubectl rollout restart deployment web");
    eprint!(
        "{}",
        bed.kubectl(control_plane, &["rollout", "restart", "deployment", "web"])?
    );
    bed.kubectl(
        control_plane,
        &["rollout", "status", "deployment", "web", "--timeout=60s"],
    )?;
    // Until the old Pods are gone (their preStop delay), and a little after.
    let after = bed
        .nodes
        .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
    ensure!(
        names(&after).is_disjoint(&names(&before)),
        "the rollout left old Pods: before {:?}, after {:?}",
        names(&before),
        names(&after)
    );
    ensure!(
        started.elapsed() + Duration::from_millis(500) < window,
        "the rollout took {:?}, longer than the clients' window",
        started.elapsed()
    );
    for client in clients {
        let attempts = client.finish()?;
        let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.answer.is_none()).collect();
        let answered: BTreeSet<String> = attempts.iter().filter_map(|a| a.answer.clone()).collect();
        eprintln!(
            "a client made {} connects during the rollout, answered by {} Pods, {} failed",
            attempts.len(),
            answered.len(),
            failed.len()
        );
        ensure!(
            failed.is_empty(),
            "{} of {} connects failed during the rollout, the first: {:?}",
            failed.len(),
            attempts.len(),
            failed.first()
        );
        ensure!(
            !answered.is_disjoint(&names(&after)),
            "no connect reached a new Pod: {answered:?}"
        );
    }
    Ok(())
}

/// Readiness: a Pod whose probe fails turns NotReady; the EndpointSlice controller lists it as not
/// ready, and the agent takes it out of the backend set within 1 s of that slice change; once it
/// is Ready again it comes back the same way.
fn readiness(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let mut bed = bed(control_plane, "ready", &["a"])?;
    bed.apply(control_plane, &pod_server_app("web", 3, "Cluster"))?;
    let pods = bed
        .nodes
        .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
    let web = SocketAddr::from((bed.cluster_ip(control_plane, "web")?, 80));
    bed.wait_answered_by(web, &names(&pods))?;
    let pod = &pods[0];
    let slices = SliceWatch::start(control_plane, &bed.namespace, "web")?;

    for ready in [false, true] {
        bed.nodes.set_ready(&bed.namespace, &pod.name, ready)?;
        let slice_changed = slices.wait_ready(pod.ip, ready, Duration::from_secs(10))?;
        let maps_changed = wait_backend(&bed, web, pod.ip, ready, Duration::from_secs(10))?;
        let lag = maps_changed.saturating_duration_since(slice_changed);
        eprintln!(
            "{} turned {}: the agent's maps followed {} ms after its EndpointSlice",
            pod.name,
            if ready { "Ready" } else { "NotReady" },
            lag.as_millis()
        );
        ensure!(
            lag <= Duration::from_secs(1),
            "the maps followed the slice after {lag:?}"
        );
        let expected: BTreeSet<String> = pods
            .iter()
            .filter(|p| ready || p.name != pod.name)
            .map(|p| p.name.clone())
            .collect();
        bed.wait_answered_by(web, &expected)?;
    }
    // Both changes' programming latency, from the EndpointSlice controller's trigger time, is on
    // /metrics as kube-proxy exports it.
    let metrics = bed.tb.agent().metrics()?;
    let (count, sum) = (
        metrics.count("lb_network_programming_duration_seconds_count")?,
        metrics.get("lb_network_programming_duration_seconds_sum")?,
    );
    ensure!(
        count >= 2 && sum > 0.0 && sum / (count as f64) < 5.0,
        "network programming latency: {count} changes, {sum} s in all"
    );
    eprintln!(
        "lb_network_programming_duration_seconds: {count} changes, {:.0} ms on average",
        sum * 1e3 / count as f64
    );
    Ok(())
}

/// When the agent's maps hold `ip` among `frontend`'s backends (`present`) or not; polls
/// `lb-agent list` every 20 ms.
fn wait_backend(
    bed: &ClusterBed,
    frontend: SocketAddr,
    ip: Ipv4Addr,
    present: bool,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let started = Instant::now();
    loop {
        let listing = bed.tb.listing()?;
        let holds = listing.frontends.iter().any(|row| {
            row.frontend.address == frontend.ip().to_string()
                && row.frontend.port == frontend.port()
                && row.backends.iter().any(|b| b.address == ip.to_string())
        });
        if holds == present {
            return Ok(Instant::now());
        }
        ensure!(
            started.elapsed() < timeout,
            "after {timeout:?} the maps still {} {ip} for {frontend}",
            if present { "lack" } else { "hold" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Follows a Service's EndpointSlices (listing them every 10 ms through the API) and remembers
/// when each endpoint address last changed readiness.
struct SliceWatch {
    seen: Arc<Mutex<BTreeMap<Ipv4Addr, (bool, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SliceWatch {
    fn start(control_plane: &ControlPlane, namespace: &str, service: &str) -> anyhow::Result<Self> {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use kube::{Api, api::ListParams};
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (kubeconfig, namespace) = (control_plane.kubeconfig().to_owned(), namespace.to_owned());
        let selector = format!("kubernetes.io/service-name={service}");
        let (seen_in, stop_in) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let Ok(client) = lb_agent::source::kube::client(Some(&kubeconfig)).await else {
                    return;
                };
                let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
                while !stop_in.load(Ordering::Relaxed) {
                    if let Ok(list) = api.list(&ListParams::default().labels(&selector)).await {
                        let now = Instant::now();
                        let mut seen = seen_in.lock().unwrap();
                        for endpoint in list.items.iter().flat_map(|s| s.endpoints.iter().flatten())
                        {
                            let ready =
                                endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                            for address in &endpoint.addresses {
                                let Ok(ip) = address.parse::<Ipv4Addr>() else {
                                    continue;
                                };
                                let entry = seen.entry(ip).or_insert((ready, now));
                                if entry.0 != ready {
                                    *entry = (ready, now);
                                }
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        });
        Ok(Self {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// When the slices last listed `ip` as `ready`, once they do.
    fn wait_ready(&self, ip: Ipv4Addr, ready: bool, timeout: Duration) -> anyhow::Result<Instant> {
        let started = Instant::now();
        loop {
            if let Some(&(now_ready, at)) = self.seen.lock().unwrap().get(&ip)
                && now_ready == ready
            {
                return Ok(at);
            }
            ensure!(
                started.elapsed() < timeout,
                "after {timeout:?} the EndpointSlices do not list {ip} as ready={ready}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for SliceWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `internalTrafficPolicy: Local`, with Pods on two nodes: the agent (on node a) sends a Local
/// Service's connects only to node a's Pods, and a Cluster Service's to all of them.
fn traffic_policy_local(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let bed = bed(control_plane, "local", &["a", "b"])?;
    bed.apply(control_plane, &pod_server_app("local", 4, "Local"))?;
    bed.apply(control_plane, &pod_server_app("cluster", 4, "Cluster"))?;
    let local = bed
        .nodes
        .wait_ready(&bed.namespace, "local-", 4, Duration::from_secs(30))?;
    let cluster = bed
        .nodes
        .wait_ready(&bed.namespace, "cluster-", 4, Duration::from_secs(30))?;
    let on_this_node: Vec<_> = local
        .iter()
        .filter(|p| p.node == bed.agent_node)
        .cloned()
        .collect();
    ensure!(
        !on_this_node.is_empty() && on_this_node.len() < local.len(),
        "the Pods should be on both nodes: {local:?}"
    );
    let local_ip = SocketAddr::from((bed.cluster_ip(control_plane, "local")?, 80));
    let cluster_ip = SocketAddr::from((bed.cluster_ip(control_plane, "cluster")?, 80));
    bed.wait_answered_by(local_ip, &names(&on_this_node))?;
    bed.wait_answered_by(cluster_ip, &names(&cluster))?;
    eprintln!(
        "Local: answered by this node's {:?}; Cluster: by all of {:?}",
        names(&on_this_node),
        names(&cluster)
    );
    Ok(())
}

/// The API server restarts while the agent is paused, Services change, and etcd is compacted past
/// the agent's resourceVersion: when the agent resumes, its watches get 410 Expired, it lists
/// again, and its maps end up equal to those of an agent started fresh.
fn restart_and_expired(control_plane: &ControlPlane) -> anyhow::Result<()> {
    let mut bed = bed(control_plane, "expired", &["a"])?;
    bed.apply(control_plane, &pod_server_app("web", 2, "Cluster"))?;
    bed.nodes
        .wait_ready(&bed.namespace, "web-", 2, Duration::from_secs(30))?;
    let pid = bed.tb.agent().pid() as i32;
    // SAFETY: plain syscalls, on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let changed = (|| -> anyhow::Result<()> {
        control_plane.restart_apiserver()?;
        bed.kubectl(
            control_plane,
            &["scale", "deployment", "web", "--replicas=3"],
        )?;
        bed.apply(control_plane, &pod_server_app("api", 2, "Cluster"))?;
        bed.nodes
            .wait_ready(&bed.namespace, "web-", 3, Duration::from_secs(30))?;
        bed.nodes
            .wait_ready(&bed.namespace, "api-", 2, Duration::from_secs(30))?;
        bed.kubectl(control_plane, &["delete", "service", "web"])?;
        control_plane.compact_etcd()
    })();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    changed?;

    let expected = |bed: &ClusterBed| -> anyhow::Result<String> {
        let api = SocketAddr::from((bed.cluster_ip(control_plane, "api")?, 80));
        let pods = bed
            .nodes
            .wait_ready(&bed.namespace, "api-", 2, Duration::from_secs(5))?;
        bed.wait_answered_by(api, &names(&pods))?;
        bed.listing()
    };
    let resumed = expected(&bed)?;
    bed.tb.stop_agent()?;
    bed.tb.agent_command(&["reset"])?;
    bed.tb.start_agent()?;
    let fresh = expected(&bed)?;
    ensure!(
        resumed == fresh,
        "the resumed agent's maps differ from a fresh start's:\nresumed:\n{resumed}\nfresh:\n{fresh}"
    );
    eprintln!("after the restart and 410 Expired the maps equal a fresh start's:\n{fresh}");
    Ok(())
}
