//! `labelSelector` and `fieldSelector`, as list and watch take them.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
//! Fields: `path=v`, `path==v`, `path!=v` on any dotted path of the object
//! (a real server allows only a few paths per kind; this one allows all).

use serde_json::Value;

use super::status::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<Requirement>,
    fields: Vec<Requirement>,
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        Ok(Selector {
            labels: parse_all(labels, parse_label_requirement)?,
            fields: parse_all(fields, parse_field_requirement)?,
        })
    }

    /// A `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`),
    /// as webhooks' namespace and object selectors are; an absent or empty
    /// one selects everything.
    pub fn from_label_selector(selector: &Value) -> Result<Self, ApiError> {
        let mut labels = Vec::new();
        for (key, value) in selector["matchLabels"].as_object().into_iter().flatten() {
            let value = value.as_str().unwrap_or_default().to_string();
            labels.push(Requirement::Equals(key.clone(), value));
        }
        for expression in selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let key = expression["key"].as_str().unwrap_or_default().to_string();
            let values: Vec<String> = expression["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            labels.push(match expression["operator"].as_str() {
                Some("In") => Requirement::In(key, values),
                Some("NotIn") => Requirement::NotIn(key, values),
                Some("Exists") => Requirement::Exists(key),
                Some("DoesNotExist") => Requirement::NotExists(key),
                other => {
                    return Err(ApiError::bad_request(format!(
                        "{other:?} is not a valid label selector operator (In, NotIn, Exists, DoesNotExist)"
                    )))
                }
            });
        }
        Ok(Selector {
            labels,
            fields: Vec::new(),
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        let label = |key: &str| {
            object["metadata"]["labels"][key]
                .as_str()
                .map(str::to_string)
        };
        let field = |path: &str| {
            let value = path.split('.').fold(object, |v, segment| &v[segment]);
            match value {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            }
        };
        self.labels.iter().all(|r| r.holds(&label)) && self.fields.iter().all(|r| r.holds(&field))
    }
}

impl Requirement {
    fn holds(&self, lookup: &dyn Fn(&str) -> Option<String>) -> bool {
        match self {
            Requirement::Equals(k, v) => lookup(k).as_deref() == Some(v),
            Requirement::NotEquals(k, v) => lookup(k).as_deref() != Some(v),
            Requirement::In(k, vs) => lookup(k).is_some_and(|actual| vs.contains(&actual)),
            Requirement::NotIn(k, vs) => !lookup(k).is_some_and(|actual| vs.contains(&actual)),
            Requirement::Exists(k) => lookup(k).is_some(),
            Requirement::NotExists(k) => lookup(k).is_none(),
        }
    }
}

fn parse_all(
    text: Option<&str>,
    parse: fn(&str) -> Result<Requirement, ApiError>,
) -> Result<Vec<Requirement>, ApiError> {
    text.map_or(Ok(Vec::new()), |text| {
        split_top_level(text).into_iter().map(parse).collect()
    })
}

/// Splits on commas outside parentheses; drops empty parts.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_equality(text: &str) -> Option<Requirement> {
    let (key, value, negated) = if let Some((k, v)) = text.split_once("!=") {
        (k, v, true)
    } else if let Some((k, v)) = text.split_once("==") {
        (k, v, false)
    } else {
        let (k, v) = text.split_once('=')?;
        (k, v, false)
    };
    let (key, value) = (key.trim().to_string(), value.trim().to_string());
    Some(if negated {
        Requirement::NotEquals(key, value)
    } else {
        Requirement::Equals(key, value)
    })
}

fn parse_label_requirement(text: &str) -> Result<Requirement, ApiError> {
    if let Some(requirement) = parse_equality(text) {
        return Ok(requirement);
    }
    let set = |rest: &str| -> Option<Vec<String>> {
        let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_string()).collect())
    };
    let invalid = || {
        ApiError::bad_request(format!(
            "unable to parse requirement: {text:?}: expected key=value, key!=value, key, !key, \
             key in (a,b) or key notin (a,b)"
        ))
    };
    if let Some((key, rest)) = text.split_once(" notin ") {
        return Ok(Requirement::NotIn(
            key.trim().into(),
            set(rest).ok_or_else(invalid)?,
        ));
    }
    if let Some((key, rest)) = text.split_once(" in ") {
        return Ok(Requirement::In(
            key.trim().into(),
            set(rest).ok_or_else(invalid)?,
        ));
    }
    let valid_key = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    match text.strip_prefix('!') {
        Some(key) if valid_key(key.trim()) => Ok(Requirement::NotExists(key.trim().into())),
        None if valid_key(text) => Ok(Requirement::Exists(text.into())),
        _ => Err(invalid()),
    }
}

fn parse_field_requirement(text: &str) -> Result<Requirement, ApiError> {
    parse_equality(text).ok_or_else(|| {
        ApiError::bad_request(format!(
            "invalid field selector {text:?}: expected path=value, path==value or path!=value"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_and_fields_select() {
        let pod = json!({"metadata": {"name": "web-1", "labels": {"app": "web", "tier": "front"}}});
        let matches = |labels: Option<&str>, fields: Option<&str>| {
            Selector::parse(labels, fields).unwrap().matches(&pod)
        };
        assert!(matches(Some("app=web"), None));
        assert!(matches(Some("app==web,tier!=back"), None));
        assert!(!matches(Some("app=api"), None));
        assert!(matches(Some("tier in (front, back),app"), None));
        assert!(!matches(Some("tier notin (front)"), None));
        assert!(matches(Some("!version"), None));
        assert!(!matches(Some("version"), None));
        assert!(matches(None, Some("metadata.name=web-1")));
        assert!(!matches(None, Some("metadata.name!=web-1")));
        assert!(Selector::parse(Some("app in web"), None).is_err());
    }

    #[test]
    fn label_selector_objects_select() {
        let namespace = json!({"metadata": {"labels": {"kubernetes.io/metadata.name": "shop"}}});
        let selector = json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]},
            {"key": "trellis.dev/inject", "operator": "NotIn", "values": ["disabled"]}
        ]});
        let select =
            |s: &serde_json::Value, o| Selector::from_label_selector(s).unwrap().matches(o);
        assert!(select(&selector, &namespace));
        let system =
            json!({"metadata": {"labels": {"kubernetes.io/metadata.name": "kube-system"}}});
        assert!(!select(&selector, &system));
        assert!(select(&json!(null), &system));
        assert!(!select(&json!({"matchLabels": {"a": "b"}}), &namespace));
        assert!(Selector::from_label_selector(
            &json!({"matchExpressions": [{"key": "a", "operator": "Equals"}]})
        )
        .is_err());
    }
}
