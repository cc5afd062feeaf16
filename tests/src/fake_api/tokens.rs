//! TokenReview: the tokens a test registers, judged as the API server's
//! token authenticator judges them.

use std::collections::HashMap;

use serde_json::{json, Value};

/// The audience a review asks for when its `spec.audiences` is empty: the
/// API server's own.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

struct Token {
    username: String,
    uid: String,
    audiences: Vec<String>,
    authenticated: bool,
}

#[derive(Default)]
pub struct Tokens(HashMap<String, Token>);

impl Tokens {
    pub fn add(&mut self, token: &str, username: &str, audiences: &[&str], authenticated: bool) {
        let token_value = Token {
            username: username.to_string(),
            uid: format!("uid-{}", self.0.len() + 1),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            authenticated,
        };
        self.0.insert(token.to_string(), token_value);
    }

    /// The user a bearer token authenticates to the API server as: a
    /// registered, valid token for the API server's audience.
    pub fn user(&self, token: &str) -> Option<super::rbac::User> {
        let status = self.review(&json!({"token": token}));
        super::rbac::User::from_review(&status["user"])
    }

    /// The `status` of a TokenReview with this `spec`.
    pub fn review(&self, spec: &Value) -> Value {
        let refuse = |why: String| json!({"authenticated": false, "error": why});
        let Some(token) = spec["token"].as_str().and_then(|t| self.0.get(t)) else {
            return refuse("[invalid bearer token, token lookup failed]".into());
        };
        if !token.authenticated {
            return refuse("[invalid bearer token, service account token has expired]".into());
        }
        let mut wanted: Vec<String> = spec["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        if wanted.is_empty() {
            wanted.push(API_SERVER_AUDIENCE.to_string());
        }
        let granted: Vec<&String> = wanted
            .iter()
            .filter(|a| token.audiences.contains(a))
            .collect();
        if granted.is_empty() {
            return refuse(format!(
                "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                token.audiences, wanted
            ));
        }
        let mut groups = Vec::new();
        if let Some(namespace) = token
            .username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, _)| ns)
        {
            groups.push("system:serviceaccounts".to_string());
            groups.push(format!("system:serviceaccounts:{namespace}"));
        }
        groups.push("system:authenticated".to_string());
        json!({
            "authenticated": true,
            "user": {"username": token.username, "uid": token.uid, "groups": groups},
            "audiences": granted,
        })
    }
}
