//! Leader election over a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it, so any number of controller replicas serve
//! discovery and identity while exactly one does what must be written once.
//!
//! Nothing is written as leader yet. The hook is [`Leadership::is_leader`]:
//! status updates (the conditions on HTTPRoutes and Trellis' kinds) and,
//! later, a Rollout's weights are written only while it says `true`, and
//! stopped the moment it turns `false`.
//!
//! The rules, and why two replicas never act at once:
//! - A Lease is *free* when it names no holder, *expired* when its spec has
//!   not changed for `leaseDurationSeconds` **by the reader's own clock**
//!   (client-go's "observed time": no two replicas need agree on the time
//!   of day, only on how long a second is). Either may be taken.
//! - Every write is an update carrying the `resourceVersion` that was read:
//!   a `409 Conflict` means someone else wrote first, and the Lease is read
//!   again rather than overwritten.
//! - The leader renews every third of the lease duration and, if renewals
//!   fail, steps down once `RENEW_DEADLINE` (two thirds) has passed since the
//!   last renewal it *sent* — before any other replica, which counts from
//!   when it *saw* that renewal, could consider the Lease expired.
//! - On a graceful stop the leader stops acting, then clears the holder, so
//!   another replica takes over at its next poll instead of a lease duration
//!   later. A crashed leader is replaced within one lease duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus::IntGauge;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The Lease the controllers of one namespace share.
pub const LEASE_NAME: &str = "trellis-controller";
/// client-go's default, and this controller's.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// At most one warning per this period: an API server that is away would
/// otherwise be reported at every retry.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long a graceful stop waits to clear the holder.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// A lease duration the Lease can carry: whole seconds, at least one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseDurationError {
    #[error(transparent)]
    Unreadable(#[from] trellis_common::duration::InvalidDuration),
    #[error("{0:?} is not a whole number of seconds of at least 1s (a Lease counts in seconds); use e.g. 15s")]
    NotWholeSeconds(Duration),
}

/// Parses `--lease-duration`: a duration (`15s`, `1m`) in whole seconds.
pub fn parse_lease_duration(s: &str) -> Result<Duration, LeaseDurationError> {
    let duration = trellis_common::duration::parse(s)?;
    lease_seconds(duration)?;
    Ok(duration)
}

/// `leaseDurationSeconds` for `duration`.
fn lease_seconds(duration: Duration) -> Result<i32, LeaseDurationError> {
    match i32::try_from(duration.as_secs()) {
        Ok(seconds) if seconds >= 1 && duration.subsec_nanos() == 0 => Ok(seconds),
        _ => Err(LeaseDurationError::NotWholeSeconds(duration)),
    }
}

/// Who competes for which Lease, and how fast.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process: a restarted pod is a new candidate, never
    /// mistaken for the leader it replaces.
    pub identity: String,
    pub duration: Duration,
}

impl LeaseConfig {
    /// The controllers' Lease in `namespace`, held under this process's
    /// [`holder_identity`].
    pub fn new(namespace: &str, duration: Duration) -> Self {
        Self {
            namespace: namespace.into(),
            name: LEASE_NAME.into(),
            identity: holder_identity(),
            duration,
        }
    }

    /// How often the leader renews.
    fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// How long after the last renewal it sent a leader may go on without
    /// another; well inside the duration others wait.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// How often a candidate reads the Lease, and a failed renewal is retried.
    fn retry_period(&self) -> Duration {
        self.duration / 10
    }
}

/// `POD_NAME` (or the host name, which is the pod's name in a pod) and a
/// random suffix, as client-go does (`hostname_uuid`).
pub fn holder_identity() -> String {
    let pod = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| LEASE_NAME.into());
    format!("{pod}_{:016x}", fastrand::u64(..))
}

/// Whether this controller leads, and the election that decides it.
pub struct Leadership {
    is_leader: watch::Receiver<bool>,
    election: Option<Election>,
}

struct Election {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// A controller with no peers (local mode): it always leads.
    pub fn sole(gauge: &IntGauge) -> Self {
        gauge.set(1);
        Self {
            is_leader: watch::channel(true).1,
            election: None,
        }
    }

    /// Competes for the Lease from now on (on the current runtime).
    pub fn elect(client: Client, config: LeaseConfig, gauge: IntGauge) -> Self {
        gauge.set(0);
        let (leader, is_leader) = watch::channel(false);
        let (stop, stopped) = oneshot::channel();
        let elector = Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            leader,
            gauge,
            last_logged: None,
        };
        Self {
            is_leader,
            election: Some(Election {
                stop,
                task: tokio::spawn(elector.run(stopped)),
            }),
        }
    }

    /// `true` while this controller may write what only the leader writes.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.is_leader.clone()
    }

    /// Stops leading and hands the Lease over at once (a graceful stop).
    pub async fn release(mut self) {
        if let Some(election) = self.election.take() {
            let _ = election.stop.send(());
            let _ = election.task.await;
        }
    }
}

impl Drop for Leadership {
    /// Dropped without [`Leadership::release`] (a crash, as far as the
    /// others can tell): the Lease expires.
    fn drop(&mut self) {
        if let Some(election) = &self.election {
            election.task.abort();
        }
    }
}

/// Why one round of the election did not settle who holds the Lease.
#[derive(Debug, thiserror::Error)]
enum ElectionError {
    #[error("{0}{hint}", hint = hint(.0))]
    Api(#[from] kube::Error),
    #[error("no answer from the API server in time")]
    Timeout,
}

/// What to check, for the failures an operator can fix.
fn hint(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.code == 403 => {
            "; the controller's service account needs get, create and update on \
             coordination.k8s.io leases in its namespace"
        }
        kube::Error::Api(status) if status.code == 404 => {
            "; does the controller's namespace exist?"
        }
        _ => "",
    }
}

/// Who the Lease names, as a candidate sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// No holder, or a holder whose Lease has expired: it may be taken.
    Nobody,
    Us,
    /// Another replica, whose Lease is valid.
    Other,
}

/// Who holds the Lease whose spec (last changed at `changed_at`, by our
/// clock) is `spec`, at `now`.
fn holder(spec: &LeaseSpec, me: &str, changed_at: Instant, now: Instant) -> Holder {
    let seconds = spec.lease_duration_seconds.unwrap_or(0).max(0);
    let valid_until = changed_at + Duration::from_secs(seconds.unsigned_abs().into());
    match spec.holder_identity.as_deref() {
        None | Some("") => Holder::Nobody,
        Some(holder) if holder == me => Holder::Us,
        Some(_) if now < valid_until => Holder::Other,
        Some(_) => Holder::Nobody,
    }
}

/// The spec that makes `me` the holder, renewed at `now`: a takeover sets
/// `acquireTime` and counts a transition, a renewal keeps both.
fn claimed(spec: &LeaseSpec, me: &str, seconds: i32, now: Timestamp) -> LeaseSpec {
    let renewal = spec.holder_identity.as_deref() == Some(me);
    LeaseSpec {
        holder_identity: Some(me.into()),
        lease_duration_seconds: Some(seconds),
        acquire_time: if renewal {
            spec.acquire_time.clone()
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + if renewal { 0 } else { 1 }),
        ..spec.clone()
    }
}

/// The spec a leader leaves behind when it stops: no holder (client-go
/// also shortens the duration to one second).
fn released(spec: &LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        renew_time: Some(MicroTime(now)),
        ..spec.clone()
    }
}

/// The Lease as last read or written, and when its spec last changed.
struct Observed {
    lease: Lease,
    changed_at: Instant,
}

struct Elector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    leader: watch::Sender<bool>,
    gauge: IntGauge,
    last_logged: Option<Instant>,
}

impl Elector {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        // While leading: when leadership lapses unless renewed.
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                deadline = None;
                self.lead(false, "could not renew the Lease before the deadline");
            }
            let started = Instant::now();
            // A leader may not wait for an answer past its deadline.
            let give_up = deadline.unwrap_or(started + self.config.duration);
            let outcome = tokio::select! {
                _ = &mut stop => break,
                outcome = tokio::time::timeout_at(give_up, self.round(deadline.is_some())) => {
                    outcome.unwrap_or(Err(ElectionError::Timeout))
                }
            };
            let next = match outcome {
                Ok(true) => {
                    deadline = Some(started + self.config.renew_deadline());
                    self.lead(true, "holds the Lease");
                    started + self.config.renew_period()
                }
                Ok(false) => {
                    deadline = None;
                    self.lead(false, "another replica holds the Lease");
                    Instant::now() + self.config.retry_period()
                }
                Err(error) => {
                    self.warn(&error);
                    Instant::now() + self.config.retry_period()
                }
            };
            // A leader wakes at its deadline at the latest, to step down on time.
            let next = deadline.map_or(next, |deadline| next.min(deadline));
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        self.lead(false, "stopping");
        if tokio::time::timeout(RELEASE_TIMEOUT, self.release())
            .await
            .is_err()
        {
            tracing::warn!(lease = %self.config.name, "could not clear the Lease in time; another replica takes over when it expires");
        }
    }

    /// One round: renew (a leader, from the Lease it last wrote) or read the
    /// Lease and take it if it is free, expired or ours. `true`: we hold it.
    async fn round(&mut self, leading: bool) -> Result<bool, ElectionError> {
        if leading {
            if let Some(observed) = &self.observed {
                let lease = observed.lease.clone();
                match self.claim(lease).await {
                    Err(ElectionError::Api(kube::Error::Api(status))) if status.is_conflict() => {}
                    renewed => return renewed,
                }
                // Someone else wrote the Lease: read it and decide again.
            }
        }
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            return self.create().await;
        };
        self.observe(lease.clone());
        let spec = lease.spec.clone().unwrap_or_default();
        let changed_at = self
            .observed
            .as_ref()
            .map_or_else(Instant::now, |o| o.changed_at);
        match holder(&spec, &self.config.identity, changed_at, Instant::now()) {
            Holder::Other => Ok(false),
            Holder::Nobody | Holder::Us => match self.claim(lease).await {
                Err(ElectionError::Api(kube::Error::Api(status))) if status.is_conflict() => {
                    Ok(false)
                }
                claimed => claimed,
            },
        }
    }

    /// Writes `lease` (at the resourceVersion it carries) with us as holder.
    async fn claim(&mut self, mut lease: Lease) -> Result<bool, ElectionError> {
        let spec = lease.spec.take().unwrap_or_default();
        lease.spec = Some(claimed(
            &spec,
            &self.config.identity,
            self.seconds(),
            Timestamp::now(),
        ));
        let stored = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await?;
        self.observe(stored);
        Ok(true)
    }

    /// Creates the Lease, held by us; `false` if another replica was faster.
    async fn create(&mut self) -> Result<bool, ElectionError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(claimed(
                &LeaseSpec::default(),
                &self.config.identity,
                self.seconds(),
                Timestamp::now(),
            )),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(stored) => {
                self.observe(stored);
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Clears the holder if it is us, re-reading once after a conflict (a
    /// renewal whose answer the stop cut off).
    async fn release(&mut self) {
        for _ in 0..2 {
            let Some(observed) = &self.observed else {
                return;
            };
            let mut lease = observed.lease.clone();
            let spec = lease.spec.take().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return;
            }
            lease.spec = Some(released(&spec, Timestamp::now()));
            match self
                .api
                .replace(&self.config.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    tracing::info!(lease = %self.config.name, identity = %self.config.identity, "released the Lease");
                    return;
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => {
                    match self.api.get_opt(&self.config.name).await {
                        Ok(Some(lease)) => self.observe(lease),
                        _ => return,
                    }
                }
                Err(error) => {
                    self.warn(&error.into());
                    return;
                }
            }
        }
    }

    /// Remembers `lease`, and when its spec last changed.
    fn observe(&mut self, lease: Lease) {
        let changed_at = match &self.observed {
            Some(observed) if observed.lease.spec == lease.spec => observed.changed_at,
            _ => Instant::now(),
        };
        self.observed = Some(Observed { lease, changed_at });
    }

    fn seconds(&self) -> i32 {
        // The configuration was checked by `parse_lease_duration`; a
        // duration set in code that a Lease cannot carry rounds down to 1 s
        // at worst, which only makes others wait less than we do.
        lease_seconds(self.config.duration).unwrap_or(1)
    }

    /// Publishes a change of leadership, and logs it.
    fn lead(&self, leading: bool, why: &str) {
        let changed = self.leader.send_if_modified(|current| {
            let changed = *current != leading;
            *current = leading;
            changed
        });
        if changed {
            self.gauge.set(i64::from(leading));
            let (lease, identity) = (&self.config.name, &self.config.identity);
            let change = if leading {
                "became the leader"
            } else {
                "no longer the leader"
            };
            tracing::info!(%lease, %identity, reason = why, "{change}");
        }
    }

    fn warn(&mut self, error: &ElectionError) {
        if self.last_logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            self.last_logged = Some(Instant::now());
            tracing::warn!(lease = %self.config.name, %error, "leader election: the Lease could not be read or written; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "controller-a_1";

    fn held_by(holder: &str, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(seconds),
            lease_transitions: Some(3),
            acquire_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn another_holders_lease_is_valid_until_unchanged_for_its_duration() {
        let seen = Instant::now();
        let spec = held_by("controller-b_2", 15);
        assert_eq!(holder(&spec, ME, seen, seen), Holder::Other);
        let almost = seen + Duration::from_millis(14_999);
        assert_eq!(holder(&spec, ME, seen, almost), Holder::Other);
        let expired = seen + Duration::from_secs(15);
        assert_eq!(holder(&spec, ME, seen, expired), Holder::Nobody);
    }

    #[test]
    fn a_lease_with_no_holder_is_free_and_ours_is_ours() {
        let now = Instant::now();
        assert_eq!(holder(&LeaseSpec::default(), ME, now, now), Holder::Nobody);
        let cleared = released(&held_by(ME, 15), Timestamp::now());
        assert_eq!(holder(&cleared, "anyone", now, now), Holder::Nobody);
        // Ours however old: renewing it is always safe (the update is
        // conditional on the version we read).
        let later = now + Duration::from_secs(3600);
        assert_eq!(holder(&held_by(ME, 15), ME, now, later), Holder::Us);
    }

    #[test]
    fn a_takeover_counts_a_transition_and_a_renewal_does_not() {
        let now = Timestamp::now();
        let taken = claimed(&held_by("controller-b_2", 15), ME, 5, now);
        assert_eq!(taken.holder_identity.as_deref(), Some(ME));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        assert_eq!(taken.renew_time, Some(MicroTime(now)));
        assert_eq!(taken.lease_duration_seconds, Some(5));

        let later = now + Duration::from_secs(2);
        let renewed = claimed(&taken, ME, 5, later);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(now)));
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));

        let first = claimed(&LeaseSpec::default(), ME, 5, now);
        assert_eq!(first.lease_transitions, Some(1));
    }

    #[test]
    fn the_leader_steps_down_before_anyone_may_take_over() {
        let config = LeaseConfig::new("trellis", DEFAULT_LEASE_DURATION);
        assert!(config.renew_period() < config.renew_deadline());
        assert!(config.renew_deadline() + config.retry_period() < config.duration);
    }

    #[test]
    fn lease_durations_are_whole_seconds() {
        assert_eq!(parse_lease_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_lease_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["1.5s", "500ms", "0s"] {
            let error = parse_lease_duration(bad).unwrap_err();
            assert!(
                error.to_string().contains("whole number of seconds"),
                "{bad}: {error}"
            );
        }
        assert!(matches!(
            parse_lease_duration("soon"),
            Err(LeaseDurationError::Unreadable(_))
        ));
    }

    #[test]
    fn identities_are_unique_per_process_start() {
        let (a, b) = (holder_identity(), holder_identity());
        assert_ne!(a, b);
        assert!(a.contains('_'), "{a}");
    }
}
