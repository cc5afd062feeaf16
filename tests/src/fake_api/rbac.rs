//! Authentication and authorization as a real API server does them, for the
//! users a test gives tokens to: a bearer token registered with
//! [`super::FakeApi::add_token`] (for the API server's audience) is that
//! user, and its requests are allowed only as the Roles, ClusterRoles and
//! bindings in the store allow (the RBAC authorizer's rules). Any other
//! token is the cluster's admin, allowed everything, so tests and `kubectl`
//! work without RBAC objects. The same evaluation answers
//! SubjectAccessReviews.

use serde_json::{json, Value};

use super::resources::Resource;
use super::store::Store;

/// The admin every unregistered token is.
pub const ADMIN: &str = "system:admin";

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn admin() -> Self {
        User {
            name: ADMIN.to_string(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
        }
    }

    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }

    /// The user of a TokenReview `status.user`.
    pub fn from_review(user: &Value) -> Option<Self> {
        Some(User {
            name: user["username"].as_str()?.to_string(),
            groups: strings(&user["groups"]),
        })
    }
}

/// What a request asks to do, as RBAC rules name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    /// The object's name; for list and watch, the name a
    /// `metadata.name=` field selector pins (so `resourceNames` rules can
    /// allow them, as in a real cluster).
    pub name: Option<String>,
}

impl Attributes {
    pub fn new(verb: &str, resource: &Resource) -> Self {
        Attributes {
            verb: verb.to_string(),
            group: resource.group.to_string(),
            resource: resource.plural.to_string(),
            subresource: None,
            namespace: None,
            name: None,
        }
    }

    /// From a SubjectAccessReview's `spec.resourceAttributes`.
    pub fn from_review(attributes: &Value) -> Self {
        let text = |key: &str| attributes[key].as_str().map(str::to_string);
        let optional = |key: &str| text(key).filter(|s| !s.is_empty());
        Attributes {
            verb: text("verb").unwrap_or_default(),
            group: text("group").unwrap_or_default(),
            resource: text("resource").unwrap_or_default(),
            subresource: optional("subresource"),
            namespace: optional("namespace"),
            name: optional("name"),
        }
    }

    /// The API server's words for a refusal.
    pub fn forbidden_message(&self, user: &User) -> String {
        let qualified = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let what = match &self.name {
            Some(name) if !matches!(self.verb.as_str(), "list" | "watch") => {
                format!("{qualified} \"{name}\"")
            }
            _ => qualified,
        };
        let resource = match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource),
            None => self.resource.clone(),
        };
        let scope = match &self.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_string(),
        };
        format!(
            "{what} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            user.name, self.verb, self.group
        )
    }
}

/// Whether RBAC in `store` lets `user` do what `attributes` say.
pub fn allows(store: &Store, user: &User, attributes: &Attributes) -> bool {
    if user.is_admin() {
        return true;
    }
    let kind = |kind: &str| Resource::by_kind("rbac.authorization.k8s.io/v1", kind);
    let (Some(cluster_roles), Some(cluster_bindings), Some(roles), Some(bindings)) = (
        kind("ClusterRole"),
        kind("ClusterRoleBinding"),
        kind("Role"),
        kind("RoleBinding"),
    ) else {
        return false;
    };
    let role_rules = |namespace: Option<&str>, role_ref: &Value| -> Vec<Value> {
        let name = role_ref["name"].as_str().unwrap_or_default();
        let object = match role_ref["kind"].as_str() {
            Some("ClusterRole") => store.get(cluster_roles, None, name),
            Some("Role") => match namespace {
                Some(ns) => store.get(roles, Some(ns), name),
                None => return Vec::new(),
            },
            _ => return Vec::new(),
        };
        object
            .ok()
            .and_then(|role| role["rules"].as_array().cloned())
            .unwrap_or_default()
    };
    let everything = super::selector::Selector::default();
    let cluster_wide = store
        .select(cluster_bindings, None, &everything)
        .into_iter()
        .filter(|binding| binds(binding, user))
        .flat_map(|binding| role_rules(None, &binding["roleRef"]));
    let in_namespace = attributes.namespace.iter().flat_map(|ns| {
        store
            .select(bindings, Some(ns), &everything)
            .into_iter()
            .filter(|binding| binds(binding, user))
            .flat_map(|binding| role_rules(Some(ns), &binding["roleRef"]))
            .collect::<Vec<_>>()
    });
    cluster_wide
        .chain(in_namespace)
        .any(|rule| rule_allows(&rule, attributes))
}

/// The `status` of a SubjectAccessReview with this `spec`.
pub fn review(store: &Store, spec: &Value) -> Value {
    let user = User {
        name: spec["user"].as_str().unwrap_or_default().to_string(),
        groups: strings(&spec["groups"]),
    };
    let attributes = Attributes::from_review(&spec["resourceAttributes"]);
    if allows(store, &user, &attributes) {
        json!({"allowed": true, "reason": "allowed by the RBAC objects of the fake API server"})
    } else {
        json!({"allowed": false})
    }
}

fn binds(binding: &Value, user: &User) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|subject| {
            let name = subject["name"].as_str().unwrap_or_default();
            match subject["kind"].as_str() {
                Some("ServiceAccount") => {
                    let namespace = subject["namespace"].as_str().unwrap_or_default();
                    user.name == format!("system:serviceaccount:{namespace}:{name}")
                }
                Some("User") => user.name == name,
                Some("Group") => user.groups.iter().any(|g| g == name),
                _ => false,
            }
        })
}

fn rule_allows(rule: &Value, attributes: &Attributes) -> bool {
    let has = |key: &str, wanted: &str| {
        rule[key]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v.as_str().is_some_and(|v| v == "*" || v == wanted))
    };
    let resource = match &attributes.subresource {
        Some(sub) => format!("{}/{sub}", attributes.resource),
        None => attributes.resource.clone(),
    };
    let names = strings(&rule["resourceNames"]);
    let named = names.is_empty()
        || attributes
            .name
            .as_ref()
            .is_some_and(|name| names.contains(name));
    // `create` has no name to check; a real server refuses a named rule then.
    let create_ok = names.is_empty() || attributes.verb != "create";
    has("verbs", &attributes.verb)
        && has("apiGroups", &attributes.group)
        && has("resources", &resource)
        && named
        && create_ok
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}
