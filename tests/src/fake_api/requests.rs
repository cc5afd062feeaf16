//! What clients asked: counters per (verb, resource), so a test can see a
//! re-list happen, and the last requests, to print when a test fails.

use std::collections::{HashMap, VecDeque};

const RECENT_LIMIT: usize = 1000;

#[derive(Default)]
pub struct RequestLog {
    counts: HashMap<(String, String), u64>,
    recent: VecDeque<String>,
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
