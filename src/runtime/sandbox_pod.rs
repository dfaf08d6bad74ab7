//! A session's sandbox pod: created on first use, waited for until it runs (or its failure
//! is understood), and driven through the exec API.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, AttachParams, DeleteParams, PostParams};
use kube::runtime::wait::await_condition;
use tokio::io::AsyncReadExt;
use tokio::sync::{Mutex, mpsc};

use super::sandbox_template::SANDBOX_CONTAINER;
use crate::tools::{CommandOutput, CommandRunner, FileError, FileSystem, ToolFailure};

/// Most output kept from one command; the bash tool shows the model far less anyway.
const OUTPUT_CAP_BYTES: u64 = 32 * 1024 * 1024;

/// Runs command `$2` in directory `$1` with stderr merged into stdout, in bash when the
/// image has it, as the leader of its own process group (setsid) whose id is kept in
/// `$3`, so a timeout can stop everything the command started.
const EXEC_WRAPPER: &str = "exec 2>&1; cd -- \"$1\" || exit 126; \
     s=sh; command -v bash >/dev/null 2>&1 && s=bash; \
     if command -v setsid >/dev/null 2>&1; then setsid \"$s\" -c \"$2\" & \
     else \"$s\" -c \"$2\" & fi; \
     p=$!; echo \"$p\" > \"$3\" 2>/dev/null; wait \"$p\"; r=$?; rm -f -- \"$3\"; exit $r";

/// Kills the process group whose leader's pid is in `$1`.
const KILL_GROUP: &str = "p=$(cat -- \"$1\" 2>/dev/null) || exit 0; \
     kill -9 -- \"-$p\" 2>/dev/null || kill -9 \"$p\" 2>/dev/null; rm -f -- \"$1\"; exit 0";

/// Scratch space of the controller's own in the sandbox (an emptyDir); bash's saved
/// outputs go there too.
pub const SCRATCH_DIR: &str = crate::tools::bash::SPILL_DIR;

/// Prints lines `$2..$3` of file `$1`, or all of it when `$2` is empty, at most `$4` bytes.
/// Exit 3: missing; 4: a directory; 5: not readable; 8: binary (a NUL byte in its first
/// 8 KiB; checked here because busybox sed turns NUL into newlines).
const READ_SCRIPT: &str = "f=$1; [ -e \"$f\" ] || exit 3; [ -d \"$f\" ] && exit 4; \
     [ -r \"$f\" ] || { echo \"permission denied\"; exit 5; }; \
     [ \"$(head -c 8192 -- \"$f\" | tr -d '\\000' | wc -c)\" -eq \"$(head -c 8192 -- \"$f\" | wc -c)\" ] || exit 8; \
     if [ -z \"$2\" ]; then head -c \"$4\" -- \"$f\"; \
     else sed -n \"$2,$3p;$3q\" -- \"$f\" | head -c \"$4\"; fi";

/// Writes exactly `$2` bytes from stdin to `$1` through a temporary file in the same
/// directory, so readers never see half a file. The length travels in argv because the
/// exec protocol of older clusters cannot close stdin. `$3` = 1 refuses to replace an
/// existing file (exit 7). Exit 4: a directory; 5: refused (message printed); 6: short read.
/// No `exec 2>&1` here: with stdin attached and stderr not, it cuts stdin short.
const WRITE_SCRIPT: &str = "f=$1; [ -d \"$f\" ] && exit 4; \
     [ \"$3\" = 1 ] && [ -e \"$f\" ] && exit 7; \
     d=$(dirname -- \"$f\"); mkdir -p -- \"$d\" 2>&1 || exit 5; \
     t=\"$d/.$(basename -- \"$f\").ml-intern-$$\"; \
     head -c \"$2\" 2>&1 > \"$t\" || { rm -f -- \"$t\"; exit 5; }; \
     n=$(wc -c < \"$t\"); [ \"$n\" -eq \"$2\" ] || { echo \"got $n of $2 bytes\"; rm -f -- \"$t\"; exit 6; }; \
     mv -f -- \"$t\" \"$f\" 2>&1 || { rm -f -- \"$t\"; exit 5; }";

/// Lifecycle changes the controller records in the session's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SandboxEvent {
    Creating {
        pod_name: String,
    },
    Ready {
        pod_name: String,
    },
    /// The pod went away mid-session (deleted, evicted, its node lost); a new one follows.
    Lost {
        pod_name: String,
        why: String,
    },
}

/// The sandbox pod as this session last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodLife {
    /// Not created yet (or not by this runner).
    Absent,
    Ready,
    /// It was running and is gone or going; the next use starts a new one.
    Lost,
}

pub struct SandboxPod {
    pods: Api<Pod>,
    /// What the next pod is made from; `replace` swaps it.
    template: std::sync::Mutex<Pod>,
    name: String,
    startup_timeout: Duration,
    life: Mutex<PodLife>,
    lifecycle: mpsc::Sender<SandboxEvent>,
    /// /workspace is a PersistentVolumeClaim, so it outlives the pod.
    persistent_workspace: bool,
    /// Numbers the commands run, for their process-group files.
    commands: std::sync::atomic::AtomicU64,
    /// Created before the pod so the pod never runs unfenced.
    network_policy: Option<(Api<NetworkPolicy>, NetworkPolicy)>,
}

/// Where a pod stands on its way to running commands.
#[derive(Debug, PartialEq, Eq)]
enum PodState {
    Ready,
    /// Still coming up; the text says what it waits for, if anything is known.
    Starting(Option<String>),
    /// It will not come up without a change from the user.
    Failed(String),
}

/// Waiting reasons that do not resolve by themselves.
const FATAL_WAITING_REASONS: &[&str] = &[
    "ErrImageNeverPull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
];

fn pod_state(pod: &Pod) -> PodState {
    let Some(status) = &pod.status else {
        return PodState::Starting(None);
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if phase == "Failed" || phase == "Succeeded" {
        let why = status
            .message
            .clone()
            .or_else(|| status.reason.clone())
            .unwrap_or_default();
        return PodState::Failed(format!("the sandbox pod stopped (phase {phase}) {why}"));
    }
    let image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    for cs in status.container_statuses.iter().flatten() {
        if let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.as_deref().unwrap_or("");
            let message = waiting.message.as_deref().unwrap_or("");
            if FATAL_WAITING_REASONS.contains(&reason) {
                let hint = match reason {
                    "ErrImageNeverPull" => format!(
                        "image {image} is not present on the node and imagePullPolicy is Never: \
                         load the image on the node or change spec.sandbox.image"
                    ),
                    "ImagePullBackOff" | "InvalidImageName" => format!(
                        "image {image} cannot be pulled: check spec.sandbox.image and the \
                         registry credentials"
                    ),
                    "CrashLoopBackOff" | "RunContainerError" => format!(
                        "the sandbox container keeps exiting: image {image} needs /bin/sh and \
                         must run as a non-root user"
                    ),
                    _ => format!("the sandbox container cannot be created from image {image}"),
                };
                return PodState::Failed(format!("{reason}: {message} ({hint})"));
            }
            return PodState::Starting(Some(format!("{reason} {message}").trim().to_string()));
        }
    }
    if let Some(cond) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return PodState::Starting(Some(format!(
            "not scheduled: {}",
            cond.message.as_deref().unwrap_or("no reason given")
        )));
    }
    let all_ready = status
        .container_statuses
        .as_ref()
        .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready));
    if phase == "Running" && all_ready {
        PodState::Ready
    } else {
        PodState::Starting(None)
    }
}

impl SandboxPod {
    pub fn new(
        pods: Api<Pod>,
        template: Pod,
        startup_timeout: Duration,
        lifecycle: mpsc::Sender<SandboxEvent>,
    ) -> Self {
        let name = template.metadata.name.clone().unwrap_or_default();
        SandboxPod {
            pods,
            name,
            startup_timeout,
            life: Mutex::new(PodLife::Absent),
            lifecycle,
            persistent_workspace: template
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .is_some_and(|v| v.iter().any(|v| v.persistent_volume_claim.is_some())),
            commands: std::sync::atomic::AtomicU64::new(0),
            network_policy: None,
            template: std::sync::Mutex::new(template),
        }
    }

    pub fn with_network_policy(mut self, api: Api<NetworkPolicy>, policy: NetworkPolicy) -> Self {
        self.network_policy = Some((api, policy));
        self
    }

    /// Creates the pod unless it exists, then waits until it runs. Parallel callers wait
    /// for the same pod.
    /// Replaces the pod with one made from `template` (other hardware): the running pod is
    /// deleted and waited out, then the new one started.
    pub async fn replace(&self, template: Pod) -> Result<(), ToolFailure> {
        {
            let mut life = self.life.lock().await;
            let fail = |e: kube::Error| ToolFailure {
                reason: "SandboxFailed".into(),
                message: format!(
                    "cannot replace sandbox pod {}: {}",
                    self.name,
                    kube_error_text(&e)
                ),
            };
            Self::delete(&self.pods, &self.name).await.map_err(fail)?;
            let gone = |p: Option<&Pod>| p.is_none();
            let _ = tokio::time::timeout(
                self.startup_timeout,
                await_condition(self.pods.clone(), &self.name, gone),
            )
            .await;
            if let Ok(mut t) = self.template.lock() {
                *t = template;
            }
            *life = PodLife::Absent;
        }
        self.ensure_ready().await.map(|_| ())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn has_persistent_workspace(&self) -> bool {
        self.persistent_workspace
    }

    /// Starts the pod ahead of the first tool call (`spec.sandbox.eager`); a failure shows
    /// again at that call.
    pub async fn start(&self) {
        if let Err(e) = self.ensure_ready().await {
            tracing::info!(pod = %self.name, error = %e, "eager sandbox start failed");
        }
    }

    /// Ok(true) when the pod had been lost and this started a new one.
    async fn ensure_ready(&self) -> Result<bool, ToolFailure> {
        let mut life = self.life.lock().await;
        if *life == PodLife::Ready {
            return Ok(false);
        }
        let fail = |message: String| ToolFailure {
            reason: "SandboxFailed".into(),
            message,
        };
        let recreating = *life == PodLife::Lost;
        {
            self.clear_remains(recreating).await.map_err(|e| {
                fail(format!(
                    "sandbox pod {} was lost and its remains cannot be cleared: {}",
                    self.name,
                    kube_error_text(&e)
                ))
            })?;
        }
        let _ = self
            .lifecycle
            .send(SandboxEvent::Creating {
                pod_name: self.name.clone(),
            })
            .await;
        if let Some((api, policy)) = &self.network_policy {
            match api.create(&PostParams::default(), policy).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => {
                    return Err(fail(format!(
                        "cannot create the sandbox's NetworkPolicy {}: {}",
                        self.name,
                        kube_error_text(&e)
                    )));
                }
            }
        }
        let template = self
            .template
            .lock()
            .map(|t| t.clone())
            .map_err(|_| fail("the sandbox template is unusable".into()))?;
        match self.pods.create(&PostParams::default(), &template).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => {
                return Err(fail(format!(
                    "cannot create sandbox pod {}: {}",
                    self.name,
                    kube_error_text(&e)
                )));
            }
        }
        let decided =
            |p: Option<&Pod>| p.is_some_and(|p| !matches!(pod_state(p), PodState::Starting(_)));
        let waited = tokio::time::timeout(
            self.startup_timeout,
            await_condition(self.pods.clone(), &self.name, decided),
        )
        .await;
        match waited {
            Ok(Ok(Some(pod))) => match pod_state(&pod) {
                PodState::Ready => {}
                PodState::Failed(why) => {
                    return Err(fail(format!(
                        "sandbox pod {} cannot start: {why}",
                        self.name
                    )));
                }
                PodState::Starting(_) => {
                    return Err(fail(format!("sandbox pod {} is still starting", self.name)));
                }
            },
            Ok(Ok(None)) => {
                return Err(fail(format!(
                    "sandbox pod {} was deleted while starting",
                    self.name
                )));
            }
            Ok(Err(e)) => {
                return Err(fail(format!("cannot watch sandbox pod {}: {e}", self.name)));
            }
            Err(_) => {
                let last = match self.pods.get_opt(&self.name).await {
                    Ok(Some(p)) => match pod_state(&p) {
                        PodState::Starting(Some(why)) => format!(": {why}"),
                        _ => String::new(),
                    },
                    _ => String::new(),
                };
                return Err(fail(format!(
                    "sandbox pod {} did not start within {}s{last}",
                    self.name,
                    self.startup_timeout.as_secs()
                )));
            }
        }
        *life = PodLife::Ready;
        let _ = self
            .lifecycle
            .send(SandboxEvent::Ready {
                pod_name: self.name.clone(),
            })
            .await;
        Ok(recreating)
    }

    /// A pod still terminating (say, from the previous turn) is waited out, and a lost
    /// one that stopped (evicted) is removed, so a new one can take the name. A healthy pod
    /// left by an earlier runner is kept and reused.
    async fn clear_remains(&self, lost: bool) -> Result<(), kube::Error> {
        let Some(pod) = self.pods.get_opt(&self.name).await? else {
            return Ok(());
        };
        if pod.metadata.deletion_timestamp.is_none() {
            if !lost {
                return Ok(());
            }
            Self::delete(&self.pods, &self.name).await?;
        }
        let gone = |p: Option<&Pod>| p.is_none();
        let _ = tokio::time::timeout(
            self.startup_timeout,
            await_condition(self.pods.clone(), &self.name, gone),
        )
        .await;
        Ok(())
    }

    /// After a command broke off: is the pod gone or going? Then it is marked lost.
    async fn check_lost(&self) -> Option<String> {
        let why = match self.pods.get_opt(&self.name).await {
            Ok(None) => "it was deleted".to_string(),
            Ok(Some(p)) if p.metadata.deletion_timestamp.is_some() => {
                "it is being deleted".to_string()
            }
            Ok(Some(p)) => match pod_state(&p) {
                PodState::Failed(why) => why,
                _ => return None,
            },
            Err(_) => return None,
        };
        *self.life.lock().await = PodLife::Lost;
        let _ = self
            .lifecycle
            .send(SandboxEvent::Lost {
                pod_name: self.name.clone(),
                why: why.clone(),
            })
            .await;
        Some(why)
    }

    fn workspace_note(&self) -> &'static str {
        if self.persistent_workspace {
            "/workspace is on a PersistentVolumeClaim and was kept; running processes and \
             files elsewhere (such as /tmp and installed packages) are gone"
        } else {
            "/workspace was not persistent, so it is empty again: files you wrote and \
             packages you installed are gone"
        }
    }

    /// The note the model gets with the first result from a new pod.
    fn recreated_note(&self) -> String {
        format!(
            "[The sandbox pod was lost and a new one was started. {}.]",
            self.workspace_note()
        )
    }

    async fn exec(
        &self,
        command: &str,
        work_dir: &str,
        pid_file: &str,
    ) -> Result<CommandOutput, kube::Error> {
        let params = AttachParams::default()
            .container(SANDBOX_CONTAINER)
            .stdout(true)
            .stderr(false);
        let argv = Self::file_argv(EXEC_WRAPPER, &[work_dir, command, pid_file]);
        let mut process = self.pods.exec(&self.name, argv, &params).await?;
        let status = process.take_status();
        let mut buf = Vec::new();
        if let Some(stdout) = process.stdout() {
            // An I/O error mid-stream leaves what was read so far, which is still useful.
            let _ = stdout.take(OUTPUT_CAP_BYTES).read_to_end(&mut buf).await;
        }
        let exit_code = match status {
            Some(s) => s.await.map(|s| exit_code(&s)),
            None => None,
        };
        Ok(CommandOutput {
            output: String::from_utf8_lossy(&buf).into_owned(),
            exit_code,
            timed_out: false,
        })
    }

    /// Runs `argv` with `stdin` fed to it; stdout (at most `cap` bytes) and the exit code.
    async fn exec_with_input(
        &self,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        cap: u64,
    ) -> Result<(Vec<u8>, i32), kube::Error> {
        let params = AttachParams::default()
            .container(SANDBOX_CONTAINER)
            .stdin(stdin.is_some())
            .stdout(true)
            .stderr(false);
        let mut process = self.pods.exec(&self.name, argv, &params).await?;
        let status = process.take_status();
        let mut stdout = process.stdout();
        let input = async {
            if let (Some(bytes), Some(mut writer)) = (stdin, process.stdin()) {
                use tokio::io::AsyncWriteExt;
                // The command reads exactly this many bytes; a broken pipe shows as a
                // short write, which the command reports.
                let _ = writer.write_all(bytes).await;
                let _ = writer.flush().await;
            }
            // Kept open until the command ends (closing stdin would end the exec session),
            // and without stdin this must not finish first either.
            std::future::pending::<std::convert::Infallible>().await
        };
        let output = async {
            let mut buf = Vec::new();
            if let Some(out) = stdout.as_mut() {
                let _ = out.take(cap).read_to_end(&mut buf).await;
            }
            buf
        };
        let buf = tokio::select! {
            buf = output => buf,
            never = input => match never {},
        };
        let code = match status {
            Some(s) => s.await.map_or(-1, |s| exit_code(&s)),
            None => -1,
        };
        Ok((buf, code))
    }

    fn file_argv(script: &str, args: &[&str]) -> Vec<String> {
        ["/bin/sh", "-c", script, "sh"]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect()
    }

    /// Kills every process in the sandbox container except its init, which is what tool
    /// calls left running. False when there is no running pod to clean.
    pub async fn kill_processes(pods: &Api<Pod>, name: &str) -> Result<bool, kube::Error> {
        let running = pods
            .get_opt(name)
            .await?
            .is_some_and(|p| pod_state(&p) == PodState::Ready);
        if !running {
            return Ok(false);
        }
        let params = AttachParams::default()
            .container(SANDBOX_CONTAINER)
            .stdout(true)
            .stderr(false);
        // kill(-1) signals every process the caller may signal but itself and pid 1.
        let argv = ["/bin/sh", "-c", "kill -9 -1 2>/dev/null; exit 0"];
        let mut process = pods.exec(name, argv, &params).await?;
        let status = process.take_status();
        if let Some(mut stdout) = process.stdout() {
            let mut sink = Vec::new();
            let _ = stdout.read_to_end(&mut sink).await;
        }
        if let Some(s) = status {
            let _ = s.await;
        }
        Ok(true)
    }

    /// Deletes the pod; an already-missing pod is fine.
    pub async fn delete(pods: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
        match pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The exit code in the exec API's final status: `Success`, or a failure whose causes
/// carry `ExitCode`.
fn exit_code(status: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Status) -> i32 {
    if status.status.as_deref() == Some("Success") {
        return 0;
    }
    status
        .details
        .as_ref()
        .and_then(|d| d.causes.as_ref())
        .and_then(|causes| {
            causes
                .iter()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
                .and_then(|c| c.message.as_deref())
                .and_then(|m| m.parse().ok())
        })
        .unwrap_or(1)
}

pub fn kube_error_text(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.reason),
        other => other.to_string(),
    }
}

#[async_trait]
impl CommandRunner for SandboxPod {
    async fn run(
        &self,
        command: &str,
        work_dir: &str,
        timeout: Duration,
    ) -> Result<CommandOutput, ToolFailure> {
        let recreated = self.ensure_ready().await?;
        let id = self
            .commands
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid_file = format!("{SCRATCH_DIR}/.ml-intern-command-{id}.pid");
        let lost = |why: String, output: &str| CommandOutput {
            output: format!(
                "{output}\n[The sandbox pod was lost while this command ran ({why}); a new \
                 one starts with your next command.]"
            ),
            exit_code: None,
            timed_out: false,
        };
        let result = match tokio::time::timeout(timeout, self.exec(command, work_dir, &pid_file))
            .await
        {
            // No exit code, or death by a signal: maybe the pod went away under it.
            Ok(Ok(out)) if out.exit_code.is_none_or(|c| c >= 128) => {
                match self.check_lost().await {
                    Some(why) => Ok(lost(why, &out.output)),
                    None => Ok(out),
                }
            }
            Ok(Ok(out)) => Ok(out),
            // The command never reached the pod or the stream broke: the model can retry,
            // so it is told rather than the session failed.
            Ok(Err(e)) => match self.check_lost().await {
                Some(why) => Ok(lost(why, "")),
                None => Ok(CommandOutput {
                    output: format!(
                        "could not run the command in sandbox pod {}: {}",
                        self.name,
                        kube_error_text(&e)
                    ),
                    exit_code: None,
                    timed_out: false,
                }),
            },
            Err(_) => {
                let argv = Self::file_argv(KILL_GROUP, &[&pid_file]);
                if let Err(e) = self.exec_with_input(argv, None, 1024).await {
                    tracing::warn!(pod = %self.name, error = %e, "could not stop a timed-out command");
                }
                Ok(CommandOutput {
                    output: String::new(),
                    exit_code: None,
                    timed_out: true,
                })
            }
        };
        result.map(|mut out| {
            if recreated {
                out.output = format!("{}\n{}", self.recreated_note(), out.output);
            }
            out
        })
    }
}

/// Longest a file operation may take (a 64 MiB write through a slow apiserver included).
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(300);

impl SandboxPod {
    /// A file operation right after the pod was replaced is not done: what the model
    /// meant may be gone, so it is told first.
    async fn ready_for_files(&self) -> Result<(), FileError> {
        match self.ensure_ready().await {
            Ok(false) => Ok(()),
            Ok(true) => Err(FileError::Refused(format!(
                "{} Check what is there and try again.",
                self.recreated_note()
            ))),
            Err(f) => Err(FileError::Unavailable(f)),
        }
    }

    async fn file_op(
        &self,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
        cap: u64,
    ) -> Result<(Vec<u8>, i32), FileError> {
        match tokio::time::timeout(FILE_OP_TIMEOUT, self.exec_with_input(argv, stdin, cap)).await {
            Ok(Ok(done)) => Ok(done),
            Ok(Err(e)) => match self.check_lost().await {
                Some(why) => Err(FileError::Refused(format!(
                    "the sandbox pod was lost ({why}); a new one starts with your next call"
                ))),
                None => Err(unavailable(&self.name, &e)),
            },
            Err(_) => Err(FileError::Refused(format!(
                "sandbox pod {} did not finish the operation within {}s",
                self.name,
                FILE_OP_TIMEOUT.as_secs()
            ))),
        }
    }
}

fn unavailable(name: &str, e: &kube::Error) -> FileError {
    FileError::Refused(format!(
        "could not reach sandbox pod {name}: {}",
        kube_error_text(e)
    ))
}

#[async_trait]
impl FileSystem for SandboxPod {
    async fn read(
        &self,
        path: &str,
        lines: Option<(usize, usize)>,
        max_bytes: u64,
    ) -> Result<Vec<u8>, FileError> {
        self.ready_for_files().await?;
        let (first, last) = lines.map_or((String::new(), String::new()), |(a, b)| {
            (a.to_string(), b.to_string())
        });
        // One byte over the limit tells a whole file that is too large.
        let fetch = if lines.is_none() {
            max_bytes + 1
        } else {
            max_bytes
        };
        let argv = Self::file_argv(READ_SCRIPT, &[path, &first, &last, &fetch.to_string()]);
        let (bytes, code) = self.file_op(argv, None, fetch).await?;
        match code {
            0 if lines.is_none() && bytes.len() as u64 > max_bytes => Err(FileError::TooLarge),
            0 => Ok(bytes),
            3 => Err(FileError::NotFound),
            4 => Err(FileError::IsDirectory),
            8 => Err(FileError::Binary),
            _ => Err(FileError::Refused(
                String::from_utf8_lossy(&bytes).trim().to_string(),
            )),
        }
    }

    async fn write(&self, path: &str, content: &[u8], overwrite: bool) -> Result<(), FileError> {
        self.ready_for_files().await?;
        let keep = if overwrite { "0" } else { "1" };
        let argv = Self::file_argv(WRITE_SCRIPT, &[path, &content.len().to_string(), keep]);
        let (out, code) = self.file_op(argv, Some(content), 64 * 1024).await?;
        let said = String::from_utf8_lossy(&out).trim().to_string();
        match code {
            0 => Ok(()),
            4 => Err(FileError::IsDirectory),
            7 => Err(FileError::Exists),
            6 => Err(FileError::Refused(format!(
                "the content did not arrive whole ({said}); write it again"
            ))),
            _ if said.is_empty() => Err(FileError::Refused(format!("write failed (exit {code})"))),
            _ => Err(FileError::Refused(said)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "sandbox", "image": "img:1"}]},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn a_running_ready_pod_is_ready() {
        let p = pod(json!({"phase": "Running", "containerStatuses": [
            {"name": "sandbox", "ready": true, "restartCount": 0, "image": "img:1", "imageID": "",
             "state": {"running": {}}}]}));
        assert_eq!(pod_state(&p), PodState::Ready);
    }

    #[test]
    fn a_missing_image_fails_with_the_image_named() {
        let p = pod(json!({"phase": "Pending", "containerStatuses": [
            {"name": "sandbox", "ready": false, "restartCount": 0, "image": "img:1", "imageID": "",
             "state": {"waiting": {"reason": "ErrImageNeverPull",
                                   "message": "Container image \"img:1\" is not present with pull policy of Never"}}}]}));
        match pod_state(&p) {
            PodState::Failed(m) => {
                assert!(
                    m.contains("ErrImageNeverPull")
                        && m.contains("img:1")
                        && m.contains("spec.sandbox.image"),
                    "{m}"
                )
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[test]
    fn an_unschedulable_pod_is_still_starting_with_the_scheduler_message() {
        let p = pod(json!({"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}));
        assert_eq!(
            pod_state(&p),
            PodState::Starting(Some(
                "not scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu.".into()
            ))
        );
    }

    #[test]
    fn exit_codes_come_from_the_status_causes() {
        let ok: k8s_openapi::apimachinery::pkg::apis::meta::v1::Status =
            serde_json::from_value(json!({"status": "Success"})).unwrap();
        assert_eq!(exit_code(&ok), 0);
        let failed =
            serde_json::from_value(json!({"status": "Failure", "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": "42"}]}}))
            .unwrap();
        assert_eq!(exit_code(&failed), 42);
    }
}
