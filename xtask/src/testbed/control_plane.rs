//! A real Kubernetes control plane for tests, as controller-runtime's envtest runs one: etcd,
//! kube-apiserver and kube-controller-manager, listening on 127.0.0.1 only, in a directory of
//! their own (`<tmp>/lbt<pid>-k8s-<n>`: certificates, etcd's store, one log per component).
//!
//! There is no kubelet and no scheduler: Pods are created by the Deployment and ReplicaSet
//! controllers and then stay Pending, unless the test binds them and sets their status itself
//! (see [`super::node`] and ../shared/k8s/README.md).
//!
//! The binaries come from [`K8sBinaries::locate`]. Every process and the directory are
//! registered with [`cleanup`](super::cleanup), and a control plane whose test run was killed
//! outright is swept away at the next [`ControlPlane::start`].

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, Once, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};

use super::{
    SERVICE_CIDR,
    agent::http_request,
    cleanup::{self, Guard, Undo},
    exec, find_tool,
};

/// A directory holding kube-apiserver, kube-controller-manager and kubectl (and optionally etcd).
const BIN_DIR_VAR: &str = "LB_K8S_BIN_DIR";
/// The Kubernetes binaries we run, named as in ../shared/k8s/SHA256SUMS.
const KUBE_BINARIES: [&str; 3] = ["kube-apiserver", "kube-controller-manager", "kubectl"];
/// The controllers the tests need (see ../shared/k8s/README.md): Deployments to Pods, Pods to
/// EndpointSlices, the `default` ServiceAccount, namespace deletion, owner references.
const CONTROLLERS: &str =
    "deployment,replicaset,endpointslice,endpoint,serviceaccount,namespace,garbagecollector";

/// How long each component may take to come up (the API server takes 5–10 s).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a start is checked on.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long one kubectl run may take.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a component gets to exit on SIGTERM before SIGKILL. etcd and the controller manager
/// take well under a second; kube-apiserver too, unless clients hold watches open: then it
/// waits about 30 s for them. Nothing needs that grace (its state is in etcd), so it is cut
/// short.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long a request to etcd's JSON gateway may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of a component's log a start failure shows.
const LOG_TAIL_LINES: usize = 20;

/// Where the control plane's binaries come from.
#[derive(Clone, Debug)]
pub struct K8sBinaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub kubectl: PathBuf,
}

impl K8sBinaries {
    /// kube-apiserver, kube-controller-manager and kubectl from `$LB_K8S_BIN_DIR` (plain
    /// executables) if set, else from `<workspace>/../shared/k8s/` (`*.xz` and the SHA256SUMS of
    /// the decompressed binaries), decompressed once into `<workspace>/target/k8s/<checksum>/`
    /// and checked against SHA256SUMS at every call. etcd from `$LB_K8S_BIN_DIR` if it has one,
    /// else from PATH (Debian's etcd-server package installs /usr/bin/etcd).
    pub fn locate() -> anyhow::Result<Self> {
        let dir = kube_bin_dir()?;
        Ok(Self {
            etcd: locate_etcd()?,
            apiserver: dir.join("kube-apiserver"),
            controller_manager: dir.join("kube-controller-manager"),
            kubectl: dir.join("kubectl"),
        })
    }

    /// [`locate`](Self::locate) for a test run: `None` (the caller reports its tests as
    /// ignored) when the binaries are missing, after a warning saying how to provide them;
    /// in CI (`CI=true`), where these tests must run, that is an error instead.
    pub fn locate_for_tests() -> anyhow::Result<Option<Self>> {
        match Self::locate() {
            Ok(binaries) => Ok(Some(binaries)),
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!("warning: the control-plane tests are ignored: {e:#}");
                Ok(None)
            }
            Err(e) => Err(e.context("CI runs the control-plane tests: they cannot be skipped")),
        }
    }
}

/// The directory holding [`KUBE_BINARIES`].
fn kube_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BIN_DIR_VAR) {
        let dir = PathBuf::from(dir);
        let missing = missing_files(&dir, &KUBE_BINARIES);
        ensure!(
            missing.is_empty(),
            "{BIN_DIR_VAR}={} lacks {}: point {BIN_DIR_VAR} at a directory with the executables \
             {}, or unset it to use ../shared/k8s beside the repository",
            dir.display(),
            missing.join(", "),
            KUBE_BINARIES.join(", ")
        );
        return Ok(dir);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    let shared = workspace.parent().unwrap_or(workspace).join("shared/k8s");
    unpack_shared(&shared, &workspace.join("target/k8s"))
}

/// Decompresses the binaries of `shared` into a directory under `cache` named after their
/// checksums, unless they are already there and intact; returns that directory.
fn unpack_shared(shared: &Path, cache: &Path) -> anyhow::Result<PathBuf> {
    let sums = shared.join("SHA256SUMS");
    let wanted: Vec<String> = std::iter::once("SHA256SUMS".to_owned())
        .chain(KUBE_BINARIES.map(|name| format!("{name}.xz")))
        .collect();
    let missing = missing_files(shared, &wanted);
    ensure!(
        missing.is_empty(),
        "no Kubernetes binaries for the control plane: {} lacks {}. Put ../shared/k8s (the \
         *.xz and SHA256SUMS) beside the repository, or set {BIN_DIR_VAR} to a directory with \
         the executables {}",
        shared.display(),
        missing.join(", "),
        KUBE_BINARIES.join(", ")
    );
    // Named after SHA256SUMS: other binaries get another directory, never a mix.
    let dir = cache.join(&sha256_hex(&sums)?[..12]);
    if verify_checksums(&dir, &sums).is_ok() {
        return Ok(dir);
    }
    eprintln!(
        "==> decompressing the Kubernetes binaries of {} into {}",
        shared.display(),
        dir.display()
    );
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in KUBE_BINARIES {
        decompress(&shared.join(format!("{name}.xz")), &dir.join(name))?;
    }
    verify_checksums(&dir, &sums).with_context(|| {
        format!(
            "the binaries decompressed from {} do not match its SHA256SUMS",
            shared.display()
        )
    })?;
    Ok(dir)
}

/// `names` that are not files in `dir`.
fn missing_files<S: AsRef<str>>(dir: &Path, names: &[S]) -> Vec<String> {
    names
        .iter()
        .map(AsRef::as_ref)
        .filter(|name| !dir.join(name).is_file())
        .map(str::to_owned)
        .collect()
}

/// `xz -dc xz > dest`, executable; through a temporary file renamed into place, so that an
/// interrupted or concurrent run never leaves half a binary under the final name.
fn decompress(xz: &Path, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let status = Command::new("xz")
        .arg("-dc")
        .arg(xz)
        .stdout(out)
        .status()
        .context("running xz (install xz-utils; `xtask/run setup` does)")?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!("xz -dc {} failed ({status})", xz.display());
    }
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming to {}", dest.display()))
}

/// `sha256sum --check sums` in `dir`; the failures it lists otherwise.
fn verify_checksums(dir: &Path, sums: &Path) -> anyhow::Result<()> {
    ensure!(dir.is_dir(), "{} does not exist", dir.display());
    let out = Command::new("sha256sum")
        .args(["--check", "--quiet", "--strict"])
        .arg(sums)
        .current_dir(dir)
        .output()
        .context("running sha256sum")?;
    ensure!(
        out.status.success(),
        "sha256sum --check: {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The SHA-256 of a file, in hex (sha256sum's: the workspace has no hashing crate).
fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    ensure!(
        out.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout)?;
    let hex = text.split_whitespace().next().unwrap_or_default();
    ensure!(hex.len() == 64, "sha256sum printed {text:?}");
    Ok(hex.to_owned())
}

fn locate_etcd() -> anyhow::Result<PathBuf> {
    std::env::var_os(BIN_DIR_VAR)
        .map(|dir| PathBuf::from(dir).join("etcd"))
        .filter(|etcd| etcd.is_file())
        .or_else(|| find_tool("etcd"))
        .context(
            "etcd not found: install Debian's etcd-server package (`apt-get install etcd-server`; \
             `xtask/run setup` does; its service need not run), or put an etcd executable in \
             $LB_K8S_BIN_DIR",
        )
}

/// etcd, kube-apiserver and kube-controller-manager, running; stopped on drop. Shareable between
/// tests (`Sync`): even [`restart_apiserver`](Self::restart_apiserver) takes `&self`.
pub struct ControlPlane {
    /// Locked only to restart the API server or to stop everything.
    processes: Mutex<Processes>,
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    apiserver_port: u16,
    etcd_addr: SocketAddr,
    kubectl: Kubectl,
    _dir: Guard,
}

/// The components' processes.
struct Processes {
    etcd: Process,
    apiserver: Process,
    controller_manager: Process,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager on free ports of 127.0.0.1, in a
    /// fresh directory with their certificates and keys (made with openssl), an admin token in
    /// group system:masters and a kubeconfig using it. Returns once the API server is ready and
    /// the controller manager has made the `default` ServiceAccount (10 s or so).
    pub fn start(bins: &K8sBinaries) -> anyhow::Result<Self> {
        sweep_stale_control_planes();
        let started = Instant::now();
        let dir = std::env::temp_dir().join(format!(
            "{}{}-k8s-{}",
            cleanup::PREFIX,
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir_guard = cleanup::register(Undo::RemoveDir(dir.clone()));
        let creds = Credentials::create(&dir)?;
        let ports = Ports::pick()?;
        let kubectl = Kubectl {
            bin: bins.kubectl.clone(),
            kubeconfig: dir.join("kubeconfig"),
            cache_dir: dir.join("kubectl-cache"),
        };
        write_kubeconfig(&kubectl.kubeconfig, ports.apiserver, &creds)?;

        eprintln!("==> starting etcd on 127.0.0.1:{}", ports.etcd_client);
        let etcd_addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.etcd_client));
        let mut etcd = Process::spawn("etcd", &bins.etcd, &etcd_args(&dir, &ports), &dir)?;
        wait_until("etcd to answer /health", &mut [&mut etcd], || {
            etcd_healthy(etcd_addr)
        })?;

        eprintln!(
            "==> starting kube-apiserver on https://127.0.0.1:{}",
            ports.apiserver
        );
        let apiserver_args = apiserver_args(&dir, &ports, &creds);
        let mut apiserver =
            Process::spawn("kube-apiserver", &bins.apiserver, &apiserver_args, &dir)?;
        wait_until(
            "kube-apiserver's /readyz",
            &mut [&mut apiserver, &mut etcd],
            || kubectl.readyz(),
        )?;

        eprintln!("==> starting kube-controller-manager");
        let mut controller_manager = Process::spawn(
            "kube-controller-manager",
            &bins.controller_manager,
            &controller_manager_args(&kubectl.kubeconfig, &creds),
            &dir,
        )?;
        wait_until(
            "the `default` ServiceAccount (made by kube-controller-manager)",
            &mut [&mut controller_manager, &mut apiserver],
            || kubectl.has_default_service_account(),
        )?;
        eprintln!(
            "==> control plane ready at https://127.0.0.1:{} in {:.1?}",
            ports.apiserver,
            started.elapsed()
        );

        Ok(Self {
            processes: Mutex::new(Processes {
                etcd,
                apiserver,
                controller_manager,
            }),
            apiserver_bin: bins.apiserver.clone(),
            apiserver_args,
            apiserver_port: ports.apiserver,
            etcd_addr,
            kubectl,
            _dir: dir_guard,
        })
    }

    /// An admin kubeconfig (token in group system:masters, the CA by path).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubectl.kubeconfig
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// Runs our kubectl with the admin kubeconfig; its stdout, or an error with the command and
    /// its stderr. Killed after 60 s.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl.run(args, None, KUBECTL_TIMEOUT)
    }

    /// [`kubectl`](Self::kubectl) with `stdin` piped in (for `kubectl apply -f -`).
    pub fn kubectl_with_input(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        self.kubectl.run(args, Some(stdin), KUBECTL_TIMEOUT)
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after [`STOP_GRACE`]) and starts it again with the
    /// same flags and store; returns once its /readyz answers again. (Its watch cache starts
    /// afresh: a watch from an old resourceVersion then gets 410 Expired, as in a real cluster.)
    pub fn restart_apiserver(&self) -> anyhow::Result<()> {
        eprintln!("==> restarting kube-apiserver");
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Processes {
            etcd, apiserver, ..
        } = &mut *processes;
        apiserver.stop();
        let dir = self.kubectl.kubeconfig.parent().context("no directory")?;
        *apiserver = Process::spawn(
            "kube-apiserver",
            &self.apiserver_bin,
            &self.apiserver_args,
            dir,
        )?;
        wait_until(
            "kube-apiserver's /readyz after its restart",
            &mut [apiserver, etcd],
            || self.kubectl.readyz(),
        )
    }

    /// Compacts etcd at its current revision, through its JSON gateway, so that reads and
    /// watches from older resourceVersions that reach etcd get 410 Expired.
    pub fn compact_etcd(&self) -> anyhow::Result<()> {
        let range = etcd_post(self.etcd_addr, "/v3/kv/range", &json!({ "key": "AA==" }))?;
        let revision = range["header"]["revision"]
            .as_str()
            .with_context(|| format!("no header.revision in etcd's answer {range}"))?;
        let body = json!({ "revision": revision, "physical": true });
        match etcd_post(self.etcd_addr, "/v3/kv/compaction", &body) {
            // Nothing was written since the last compaction: already compacted there.
            Err(e) if format!("{e:#}").contains("required revision has been compacted") => Ok(()),
            result => result.map(drop),
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let processes = self
            .processes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        // Clients first, so that none of them logs errors about the ones gone before it. The
        // directory goes after (its guard is a later field).
        processes.controller_manager.stop();
        processes.apiserver.stop();
        processes.etcd.stop();
    }
}

/// The loopback ports the components listen on.
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
}

impl Ports {
    /// Ports free right now. (Should another process take one first, that component fails to
    /// start, saying so in its log.)
    fn pick() -> anyhow::Result<Self> {
        // All bound at the same time, so that they differ.
        let listeners = (0..3)
            .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .collect::<Result<Vec<_>, _>>()?;
        let port = |i: usize| listeners[i].local_addr().map(|a| a.port());
        Ok(Self {
            etcd_client: port(0)?,
            etcd_peer: port(1)?,
            apiserver: port(2)?,
        })
    }
}

/// The files the components trust and authenticate with, in the control plane's directory.
struct Credentials {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_pub: PathBuf,
    token_file: PathBuf,
    admin_token: String,
}

/// openssl's configuration: the extensions of the CA and of the API server's serving certificate.
const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = lbt-test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[serving]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

impl Credentials {
    /// A CA, a serving certificate for 127.0.0.1 signed by it, a service-account key pair
    /// (P-256 keys: quick to make, and every component takes them) and a token file whose
    /// admin is in group system:masters.
    fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONFIG)?;
        let new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(
            dir,
            &format!(
                "req -x509 -config openssl.cnf -extensions ca {new_key} -days 3650 \
                 -subj /CN=lbt-test-CA -keyout ca.key -out ca.crt"
            ),
        )?;
        openssl(
            dir,
            &format!(
                "req -new -config openssl.cnf {new_key} -subj /CN=127.0.0.1 \
                 -keyout serving.key -out serving.csr"
            ),
        )?;
        openssl(
            dir,
            "x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
             -extfile openssl.cnf -extensions serving -out serving.crt",
        )?;
        openssl(
            dir,
            "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key",
        )?;
        openssl(dir, "pkey -in sa.key -pubout -out sa.pub")?;
        let admin_token = openssl(dir, "rand -hex 16")?.trim().to_owned();
        let token_file = dir.join("tokens.csv");
        std::fs::write(
            &token_file,
            format!("{admin_token},lbt-admin,lbt-admin,system:masters\n"),
        )?;
        Ok(Self {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("serving.crt"),
            serving_key: dir.join("serving.key"),
            service_account_key: dir.join("sa.key"),
            service_account_pub: dir.join("sa.pub"),
            token_file,
            admin_token,
        })
    }
}

/// `openssl ARGS` in `dir` (`args` split at whitespace: no argument has a space); its stdout.
fn openssl(dir: &Path, args: &str) -> anyhow::Result<String> {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (install it; `xtask/run setup` does)")?;
    ensure!(
        out.status.success(),
        "openssl {args} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_kubeconfig(path: &Path, apiserver_port: u16, creds: &Credentials) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: lbt\n\
         clusters: [{{name: lbt, cluster: {{server: \"https://127.0.0.1:{apiserver_port}\", \
         certificate-authority: \"{}\"}}}}]\n\
         users: [{{name: lbt-admin, user: {{token: \"{}\"}}}}]\n\
         contexts: [{{name: lbt, context: {{cluster: lbt, user: lbt-admin}}}}]\n",
        creds.ca_cert.display(),
        creds.admin_token
    );
    std::fs::write(path, text).context("writing the kubeconfig")
}

fn etcd_args(dir: &Path, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=lbt".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=lbt={peer}"),
        "--initial-cluster-state=new".into(),
        "--logger=zap".into(),
        "--log-outputs=stderr".into(),
    ]
}

fn apiserver_args(dir: &Path, ports: &Ports, creds: &Credentials) -> Vec<String> {
    let path = |flag: &str, path: &Path| format!("--{flag}={}", path.display());
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={}", ports.apiserver),
        // Where it would write a self-signed certificate (ours is given): not /var/run.
        path("cert-dir", &dir.join("apiserver-certs")),
        path("tls-cert-file", &creds.serving_cert),
        path("tls-private-key-file", &creds.serving_key),
        path("token-auth-file", &creds.token_file),
        "--authorization-mode=RBAC".into(),
        // Or privileged DaemonSet templates are rejected.
        "--allow-privileged=true".into(),
        // The endpoints of the `kubernetes` Service may not be a loopback address.
        "--endpoint-reconciler-type=none".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        path("service-account-key-file", &creds.service_account_pub),
        path(
            "service-account-signing-key-file",
            &creds.service_account_key,
        ),
    ]
}

fn controller_manager_args(kubeconfig: &Path, creds: &Credentials) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--controllers={CONTROLLERS}"),
        format!(
            "--service-account-private-key-file={}",
            creds.service_account_key.display()
        ),
        format!("--root-ca-file={}", creds.ca_cert.display()),
        "--use-service-account-credentials=false".into(),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        // No serving at all: nothing of it is scraped.
        "--secure-port=0".into(),
    ]
}

/// Our kubectl, pointed at the control plane, with its caches in the control plane's directory
/// (not ~/.kube).
struct Kubectl {
    bin: PathBuf,
    kubeconfig: PathBuf,
    cache_dir: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>, timeout: Duration) -> anyhow::Result<String> {
        let what = format!("kubectl {}", args.join(" "));
        let mut child = Command::new(&self.bin)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache_dir.display()))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // From a thread: kubectl may answer before it has read everything.
            let input = input.to_owned();
            thread::spawn(move || {
                let _ = pipe.write_all(input.as_bytes());
            });
        }
        let out = exec::wait_with_timeout(child, &what, timeout)?;
        ensure!(
            out.status.success(),
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether the API server's /readyz says ok.
    fn readyz(&self) -> anyhow::Result<bool> {
        let args = ["get", "--raw", "/readyz", "--request-timeout=5s"];
        Ok(self.run(&args, None, Duration::from_secs(10))?.trim() == "ok")
    }

    /// Whether the ServiceAccount every Pod needs exists: the controller manager works.
    fn has_default_service_account(&self) -> anyhow::Result<bool> {
        let args = [
            "get",
            "serviceaccount",
            "default",
            "--namespace=default",
            "-o",
            "name",
        ];
        self.run(&args, None, Duration::from_secs(10))?;
        Ok(true)
    }
}

/// Calls `ready` every [`POLL_INTERVAL`] until it says yes (its errors count as "not yet"). Fails
/// after [`START_TIMEOUT`], or at once when one of `watched` exits, with the end of the log of
/// the one that exited (else of the first).
fn wait_until(
    what: &str,
    watched: &mut [&mut Process],
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    let max_attempts = START_TIMEOUT.as_millis() / POLL_INTERVAL.as_millis() + 1;
    let mut last = String::new();
    for _ in 0..max_attempts {
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => last.clear(),
            Err(e) => last = format!(" (last: {e:#})"),
        }
        for process in watched.iter_mut() {
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "{} exited ({status}) while waiting for {what}{last}; {}",
                    process.name,
                    process.log_tail()
                );
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL_INTERVAL);
    }
    bail!(
        "gave up waiting for {what} after {START_TIMEOUT:?}{last}; {}",
        watched[0].log_tail()
    )
}

/// One component: the child process and the log its output goes to.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
    _kill: Guard,
}

impl Process {
    /// Starts `bin args` with stdout and stderr appended to `<dir>/<name>.log`.
    fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let kill = cleanup::register(Undo::Kill(child.id()));
        Ok(Self {
            name,
            child,
            log,
            _kill: kill,
        })
    }

    /// The last lines of the log (which goes with the control plane's directory).
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "the last lines of {}'s log:\n{}",
            self.name,
            tail.join("\n")
        )
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_GRACE`].
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // SAFETY: plain syscall on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether etcd answers its /health with `"health":"true"`.
fn etcd_healthy(addr: SocketAddr) -> anyhow::Result<bool> {
    let (status, body) = http_request(addr, "GET", "/health", "", ETCD_TIMEOUT)?;
    Ok(status == 200 && body.contains(r#""health":"true""#))
}

/// POSTs `body` to etcd's v3 JSON gateway; its JSON answer.
fn etcd_post(addr: SocketAddr, path: &str, body: &Value) -> anyhow::Result<Value> {
    let (status, text) = http_request(addr, "POST", path, &body.to_string(), ETCD_TIMEOUT)?;
    ensure!(status == 200, "etcd: POST {path} {body}: {status} {text}");
    serde_json::from_str(&text).with_context(|| format!("etcd: POST {path}: not JSON: {text:?}"))
}

/// Kills the components of control planes whose test run was killed outright (their directory
/// names a pid that is gone): nothing else would ever stop them. Their directories go too.
fn sweep_stale_control_planes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let tmp = std::env::temp_dir();
        let prefix = tmp.join(cleanup::PREFIX).display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if names_stale_dir(&cmdline, &prefix) {
                let program = cmdline.split(' ').next().unwrap_or_default();
                eprintln!("killing {program} ({pid}), left behind by a killed run");
                // SAFETY: plain syscall; only processes working in a stale directory of ours.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let path = entry.path();
            if names_stale_dir(&path.display().to_string(), &prefix) {
                eprintln!("removing stale {}", path.display());
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    });
}

/// Whether `text` names a control plane directory (`<prefix><pid>-k8s-`) of a pid that is gone.
fn names_stale_dir(text: &str, prefix: &str) -> bool {
    text.match_indices(prefix).any(|(at, _)| {
        let rest = &text[at + prefix.len()..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let Ok(pid) = rest[..digits].parse::<i32>() else {
            return false;
        };
        // SAFETY: signal 0 only checks for existence.
        rest[digits..].starts_with("-k8s-")
            && unsafe { libc::kill(pid, 0) != 0 && *libc::__errno_location() == libc::ESRCH }
    })
}
