//! Keeps the demo's processes running the way a kubelet keeps containers
//! running (`restartPolicy: Always`): a process that exits is started again
//! with the same arguments and environment after an exponential back-off,
//! and its restarts are counted.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustix::process::{Pid, Signal};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// The first restart waits this long; each further one twice as long as the
/// one before, up to [`MAX_BACKOFF`] (the kubelet's 10 s → 5 min, scaled
/// down to a demo).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A process that ran this long before it exited starts over at
/// [`FIRST_BACKOFF`]: it was not crash-looping.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How long a process may take to exit after its stdin closes.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The delay before the next restart of one process.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The delay before restarting a process that ran for `ran`.
    pub fn after_run(&mut self, ran: Duration) -> Duration {
        if ran >= STABLE_RUN {
            self.next = FIRST_BACKOFF;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        delay
    }
}

/// How a supervised process is doing, published to whoever watches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// Times the process was started again after exiting.
    pub restarts: u32,
    /// Whether an instance is running now (false during a back-off).
    pub running: bool,
}

/// A request to signal the running instance, answered once it was sent.
struct SignalRequest {
    signal: Signal,
    sent: oneshot::Sender<anyhow::Result<()>>,
}

/// A handle on one supervised process: its status and a way to signal it.
#[derive(Clone)]
pub struct Process {
    name: String,
    log: PathBuf,
    status: watch::Receiver<Status>,
    signals: mpsc::UnboundedSender<SignalRequest>,
}

impl Process {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where every instance's output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// Sends `signal` to the instance running now.
    pub async fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let (sent, reply) = oneshot::channel();
        self.signals
            .send(SignalRequest { signal, sent })
            .ok()
            .with_context(|| format!("{} is no longer supervised", self.name))?;
        reply
            .await
            .with_context(|| format!("{} is no longer supervised", self.name))?
    }

    /// Waits until the process has been restarted more than `restarts`
    /// times in all and an instance is running.
    pub async fn restarted(&mut self, restarts: u32) -> anyhow::Result<()> {
        self.status
            .wait_for(|s| s.restarts > restarts && s.running)
            .await
            .with_context(|| format!("{} is no longer supervised", self.name))?;
        Ok(())
    }
}

/// How to start one process: `meshctl internal <args>` with `env`.
struct Spec {
    name: String,
    exe: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
}

impl Spec {
    /// Starts an instance whose output goes to the end of the log.
    fn spawn(&self) -> anyhow::Result<Instance> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new(&self.exe)
            .arg("internal")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            // Our stdin pipe is the child's lifeline: it exits when the pipe
            // closes, even if we are killed.
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group, so a Ctrl-C in the terminal reaches only
            // us and we stop the children in order instead of restarting them.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let lifeline = child
            .stdin
            .take()
            .with_context(|| format!("{} has no stdin pipe", self.name))?;
        Ok(Instance { child, lifeline })
    }

    /// Notes in the log why the next lines come from a new instance.
    fn mark_restart(&self, status: &std::io::Result<ExitStatus>, restart: u32) {
        let line = format!(
            "--- meshctl demo: {} exited ({}); restart {restart} ---\n",
            self.name,
            describe(status)
        );
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("\rcannot write to {}: {e}", self.log.display());
        }
    }
}

/// A running instance of a process.
struct Instance {
    child: Child,
    /// The write end of its stdin, held apart from `child` because
    /// `Child::wait` would close it.
    lifeline: ChildStdin,
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("waiting for it failed: {e}"),
    }
}

/// The demo's processes, each restarted whenever it exits until [`stop`].
///
/// [`stop`]: Supervisor::stop
pub struct Supervisor {
    exe: PathBuf,
    logs: PathBuf,
    stop: watch::Sender<bool>,
    processes: Vec<(Process, JoinHandle<()>)>,
}

impl Supervisor {
    /// A supervisor whose processes log to `<logs>/<name>.log`.
    pub fn new(logs: PathBuf) -> anyhow::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe().context("finding the meshctl binary")?,
            logs,
            stop: watch::Sender::new(false),
            processes: Vec::new(),
        })
    }

    /// Starts `meshctl internal <args>` as `name` and keeps it running.
    /// Fails only if the first instance cannot be started.
    pub fn start(
        &mut self,
        name: &str,
        env: &[(&str, String)],
        args: &[&str],
    ) -> anyhow::Result<Process> {
        let spec = Spec {
            name: name.to_string(),
            exe: self.exe.clone(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            log: self.logs.join(format!("{name}.log")),
        };
        // A new demo starts a fresh log; restarts append to it.
        std::fs::File::create(&spec.log)
            .with_context(|| format!("creating {}", spec.log.display()))?;
        let instance = spec.spawn()?;
        let (status, status_rx) = watch::channel(Status {
            restarts: 0,
            running: true,
        });
        let (signals, signals_rx) = mpsc::unbounded_channel();
        let process = Process {
            name: name.to_string(),
            log: spec.log.clone(),
            status: status_rx,
            signals,
        };
        let task = tokio::spawn(supervise(
            spec,
            instance,
            status,
            signals_rx,
            self.stop.subscribe(),
        ));
        self.processes.push((process.clone(), task));
        Ok(process)
    }

    /// Restarts so far, for every process.
    pub fn restarts(&self) -> BTreeMap<String, u32> {
        self.processes
            .iter()
            .map(|(p, _)| (p.name.clone(), p.status().restarts))
            .collect()
    }

    /// Stops every process (closes its stdin, kills it if it has not exited
    /// within 5 s) and returns when all have exited.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        for (process, task) in self.processes {
            if let Err(e) = task.await {
                eprintln!("supervising {} failed: {e}", process.name);
            }
        }
    }
}

/// Runs `spec` until `stop`: waits for the instance to exit, restarts it
/// after the back-off, and passes signals on to whichever instance runs.
async fn supervise(
    spec: Spec,
    mut instance: Instance,
    status: watch::Sender<Status>,
    mut signals: mpsc::UnboundedReceiver<SignalRequest>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let exited = loop {
            tokio::select! {
                exited = instance.child.wait() => break exited,
                Some(request) = signals.recv() => {
                    let sent = send_signal(&spec.name, &instance.child, request.signal);
                    let _ = request.sent.send(sent);
                }
                () = stopping(&mut stop) => {
                    shut_down(&spec.name, instance).await;
                    status.send_modify(|s| s.running = false);
                    return;
                }
            }
        };
        status.send_modify(|s| s.running = false);
        let restart = status.borrow().restarts + 1;
        let mut delay = backoff.after_run(started.elapsed());
        eprintln!(
            "\r{} exited ({}); restart {restart} in {delay:?}",
            spec.name,
            describe(&exited)
        );
        spec.mark_restart(&exited, restart);
        let restarted = async {
            loop {
                tokio::time::sleep(delay).await;
                match spec.spawn() {
                    Ok(instance) => return instance,
                    Err(e) => eprintln!("\rcannot restart {}: {e:#}", spec.name),
                }
                delay = backoff.after_run(Duration::ZERO);
            }
        };
        tokio::pin!(restarted);
        instance = loop {
            tokio::select! {
                instance = &mut restarted => break instance,
                // Not passed on to the next instance: it would be hit by a
                // signal meant for the one that is gone.
                Some(request) = signals.recv() => {
                    let refused = anyhow::anyhow!("{} is not running (restarting)", spec.name);
                    let _ = request.sent.send(Err(refused));
                }
                () = stopping(&mut stop) => return,
            }
        };
        status.send_modify(|s| {
            s.restarts = restart;
            s.running = true;
        });
    }
}

/// Returns once the supervisor stops (or is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    // The value it returns borrows the channel: not `Send`, so dropped here.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Signals the instance `child`. It has not been reaped (we own it and are
/// not waiting on it), so its pid cannot have been reused.
fn send_signal(name: &str, child: &Child, signal: Signal) -> anyhow::Result<()> {
    let id = child
        .id()
        .with_context(|| format!("{name} has already exited"))?;
    let pid = i32::try_from(id)
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("{name} has no valid pid ({id})"))?;
    rustix::process::kill_process(pid, signal)
        .with_context(|| format!("sending {signal:?} to {name} (pid {id})"))
}

/// Closes the instance's stdin (its signal to exit) and waits; kills it if
/// it takes longer than [`STOP_GRACE`].
async fn shut_down(name: &str, instance: Instance) {
    let Instance {
        mut child,
        lifeline,
    } = instance;
    drop(lifeline);
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        eprintln!("\r{name} did not exit within {STOP_GRACE:?} of the stop; killing it");
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds_and_resets_after_a_stable_run() {
        let mut backoff = Backoff::default();
        let crash = Duration::from_millis(10);
        let delays: Vec<u128> = (0..8)
            .map(|_| backoff.after_run(crash).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(
            backoff.after_run(STABLE_RUN),
            FIRST_BACKOFF,
            "a process that ran 10 s was not crash-looping"
        );
        assert_eq!(backoff.after_run(crash), Duration::from_millis(200));
    }
}
