//! What clients asked: counters per (verb, resource), so a test can see a
//! re-list happen; the last requests, to print when a test fails; and, per
//! user, every distinct call (as RBAC names it) with its status, so a test
//! can hold a client's calls against the RBAC rules it is given.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::rbac::{Attributes, User};

const RECENT_LIMIT: usize = 1000;

/// One call a user made, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub user: String,
    pub attributes: Attributes,
}

impl Call {
    pub fn new(user: &User, attributes: Attributes) -> Self {
        Call {
            user: user.name.clone(),
            attributes,
        }
    }
}

#[derive(Default)]
pub struct RequestLog {
    counts: HashMap<(String, String), u64>,
    recent: VecDeque<String>,
    /// Distinct calls (bounded by what a client can name) → the last status.
    calls: BTreeMap<Call, u16>,
}

impl RequestLog {
    /// `verb` is the API verb (`list`, `watch`, `get`, `create`, `update`,
    /// `patch`, `delete`, or `discovery`); `resource` the plural name.
    pub fn record(&mut self, verb: &str, resource: &str, line: String) {
        *self
            .counts
            .entry((verb.to_string(), resource.to_string()))
            .or_default() += 1;
        self.recent.push_back(line);
        if self.recent.len() > RECENT_LIMIT {
            self.recent.pop_front();
        }
    }

    pub fn record_call(&mut self, call: Call, status: u16) {
        self.calls.insert(call, status);
    }

    /// Every distinct call `user` made, with the status it last got.
    pub fn calls_by(&self, user: &str) -> Vec<(Call, u16)> {
        self.calls
            .iter()
            .filter(|(call, _)| call.user == user)
            .map(|(call, status)| (call.clone(), *status))
            .collect()
    }

    pub fn count(&self, verb: &str, resource: &str) -> u64 {
        self.counts
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn recent(&self) -> Vec<String> {
        self.recent.iter().cloned().collect()
    }
}
