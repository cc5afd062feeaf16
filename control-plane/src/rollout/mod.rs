//! Progressive delivery: the controller that carries out `Rollout`s.
//!
//! Each tick, for every Rollout: check its spec against the mesh (`plan`),
//! measure the gate window if it has ended (`measure`), decide (`engine`),
//! then write the status and, after it, the route the status describes
//! (`route`). Status first: a controller that dies between the two leaves
//! a status ahead of the route, and its successor applies that status's
//! route — never an older weight. Only the leader writes; a replica that
//! becomes leader reads the statuses afresh.

pub mod cluster;
pub mod engine;
pub mod local;
pub mod measure;
pub mod plan;
pub mod route;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

use crate::metrics::RolloutMetrics;
use crate::model::{ObjectKey, Rollout, RolloutStatus};
use crate::store::Store;
use cluster::ClusterApi;
use local::LocalApi;
use measure::Metrics;
use plan::Plan;

/// How often rollouts are looked at (gate windows end on these ticks).
const TICK: Duration = Duration::from_millis(200);
/// How long a written route may take to be read back before it is
/// written again.
const REWRITE_AFTER: Duration = Duration::from_secs(5);

/// Annotation `meshctl rollout start` sets: a new value starts a new run
/// of an existing rollout.
pub const STARTED_AT_ANNOTATION: &str = "trellis.dev/started-at";

/// Why a route or a status could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "HTTPRoute {route} is in {} with other objects; move it to a file of its own so the rollout can manage it",
        file.display()
    )]
    SharedFile {
        file: std::path::PathBuf,
        route: ObjectKey,
    },
    #[error("the Kubernetes API refused the write: {0}")]
    Api(#[from] kube::Error),
}

/// Where rollouts' routes and statuses are written.
pub enum RolloutApi {
    Local(LocalApi),
    Cluster(ClusterApi),
}

impl RolloutApi {
    fn read_status(&self, rollout: &Rollout) -> Option<RolloutStatus> {
        match self {
            RolloutApi::Local(api) => api.read_status(rollout),
            RolloutApi::Cluster(_) => rollout.status.clone(),
        }
    }

    async fn write_status(
        &self,
        rollout: &Rollout,
        previous: &RolloutStatus,
        status: &RolloutStatus,
    ) -> Result<(), WriteError> {
        match self {
            RolloutApi::Local(api) => api.write_status(rollout, status),
            RolloutApi::Cluster(api) => api.write_status(rollout, previous, status).await,
        }
    }

    async fn apply_route(
        &self,
        rollout: &Rollout,
        route: &crate::model::HttpRoute,
    ) -> Result<(), WriteError> {
        match self {
            RolloutApi::Local(api) => api.apply_route(rollout, route),
            RolloutApi::Cluster(api) => api.apply_route(route).await,
        }
    }
}

/// Which run of a rollout a status belongs to: a recreated object (new
/// uid), a new `meshctl rollout start`, or other backends start over.
pub fn run_of(rollout: &Rollout) -> String {
    let meta = &rollout.metadata;
    let spec = &rollout.spec;
    format!(
        "{}/{}/{}:{}>{}",
        meta.uid.as_deref().unwrap_or(""),
        meta.annotations
            .get(STARTED_AT_ANNOTATION)
            .map_or("", String::as_str),
        spec.service,
        spec.backends.stable,
        spec.backends.canary
    )
}

pub struct RolloutController {
    store: Arc<Store>,
    api: RolloutApi,
    metrics: Metrics,
    leader: watch::Receiver<bool>,
    gauges: Arc<RolloutMetrics>,
    /// The status last written per rollout (the store may lag behind it).
    written: HashMap<ObjectKey, RolloutStatus>,
    /// The window start each rollout's metrics baseline was taken at.
    windows: HashMap<ObjectKey, Option<String>>,
    /// The route last written per rollout, and when.
    routes: HashMap<ObjectKey, (crate::model::HttpRoute, std::time::Instant)>,
}

impl RolloutController {
    pub fn new(
        store: Arc<Store>,
        api: RolloutApi,
        metrics: Metrics,
        leader: watch::Receiver<bool>,
        gauges: Arc<RolloutMetrics>,
    ) -> Self {
        Self {
            store,
            api,
            metrics,
            leader,
            gauges,
            written: HashMap::new(),
            windows: HashMap::new(),
            routes: HashMap::new(),
        }
    }

    pub async fn run(mut self) {
        let mut changes = self.store.changes();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A sole controller's leadership never changes (its sender is gone).
        let mut leader = self.leader.clone();
        let mut elected = leader.has_changed().is_ok();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changes.changed() => {}
                changed = leader.changed(), if elected => elected = changed.is_ok(),
            }
            if !*self.leader.borrow() {
                // A follower forgets: when it leads, it reads the statuses anew.
                self.written.clear();
                self.windows.clear();
                self.routes.clear();
                continue;
            }
            let rollouts = self.store.rollouts();
            let present: Vec<ObjectKey> = rollouts.iter().map(|r| r.metadata.key()).collect();
            for rollout in &rollouts {
                self.reconcile(rollout).await;
            }
            for gone in self
                .written
                .keys()
                .filter(|k| !present.contains(k))
                .cloned()
                .collect::<Vec<_>>()
            {
                self.written.remove(&gone);
                self.windows.remove(&gone);
                self.routes.remove(&gone);
                self.metrics.forget(&gone);
                self.gauges.forget(&gone);
            }
        }
    }

    async fn reconcile(&mut self, rollout: &Rollout) {
        let key = rollout.metadata.key();
        let previous = match self.written.get(&key) {
            Some(status) => status.clone(),
            None => self.api.read_status(rollout).unwrap_or_default(),
        };
        let now = Timestamp::now();
        let plan = match Plan::check(rollout, &self.store) {
            Ok(plan) => plan,
            Err(invalid) => {
                let status = engine::refuse(&previous, invalid.reason(), &invalid.to_string(), now);
                self.gauges.record(rollout, None, &status);
                self.save(rollout, &previous, status).await;
                return;
            }
        };
        let evidence = match engine::window_due(&plan, &rollout.spec, &previous, now) {
            false => None,
            true => Some(match self.windows.get(&key) {
                // No baseline taken for this window (a restart): measure anew.
                Some(start) if *start == previous.window_started_at => {
                    self.metrics
                        .measure(rollout, &self.store, plan.interval)
                        .await
                }
                _ => engine::Evidence::Restart,
            }),
        };
        let status = engine::advance(
            &plan,
            &rollout.spec,
            &run_of(rollout),
            &previous,
            now,
            evidence,
        );
        if !self.save(rollout, &previous, status.clone()).await {
            return;
        }
        if self.windows.get(&key) != Some(&status.window_started_at) {
            self.metrics.start_window(rollout, &self.store).await;
            self.windows
                .insert(key.clone(), status.window_started_at.clone());
        }
        self.gauges.record(rollout, Some(&plan), &status);
        let existing = self
            .store
            .route(&ObjectKey::new(&key.namespace, rollout.route_name()));
        let desired = route::desired(rollout, &plan, &status, existing.as_ref());
        if existing
            .as_ref()
            .is_some_and(|r| route::matches(r, &desired))
        {
            return;
        }
        // Written, and not yet read back: give the source a moment before
        // writing again (then it is drift, and is put right).
        if let Some((written, at)) = self.routes.get(&key) {
            if *written == desired && at.elapsed() < REWRITE_AFTER {
                return;
            }
        }
        let result = self.api.apply_route(rollout, &desired).await;
        if result.is_ok() {
            self.routes
                .insert(key.clone(), (desired, std::time::Instant::now()));
        }
        if let Err(e) = result {
            tracing::warn!(rollout = %key, error = %e, "cannot write the rollout's route; retrying");
            if let WriteError::SharedFile { .. } = e {
                let refused = engine::refuse(&status, "RouteConflict", &e.to_string(), now);
                self.save(rollout, &status, refused).await;
            }
        }
    }

    /// Writes `status` if it changed; whether the rollout may go on.
    async fn save(
        &mut self,
        rollout: &Rollout,
        previous: &RolloutStatus,
        status: RolloutStatus,
    ) -> bool {
        let key = rollout.metadata.key();
        let stored = self.written.contains_key(&key) || self.api.read_status(rollout).is_some();
        if stored && *previous == status {
            return true;
        }
        match self.api.write_status(rollout, previous, &status).await {
            Ok(()) => {
                self.written.insert(key, status);
                true
            }
            Err(e) => {
                tracing::warn!(rollout = %key, error = %e, "cannot write the rollout's status; retrying");
                false
            }
        }
    }
}
