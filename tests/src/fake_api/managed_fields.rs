//! `metadata.managedFields`, approximately: each client write records, for
//! its field manager (the `fieldManager` parameter, else the client's user
//! agent), the time and the fields the request set, merged with what that
//! manager set before. A real server tracks ownership per field (a later
//! writer takes fields over); this one only adds, which is enough to tell
//! when a manager last set a field (`meshctl check` asks when a namespace
//! was labelled).

use serde_json::{json, Map, Value};

/// Metadata the server sets: never a client's field.
const SERVER_FIELDS: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "managedFields",
];

/// The manager of a request: `fieldManager`, else the user agent's program
/// name (`kubectl/v1.32.0 (linux/amd64) ...` → `kubectl`), as the API
/// server derives it.
pub fn manager(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    field_manager
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or_else(|| {
            user_agent
                .and_then(|ua| ua.split('/').next())
                .filter(|name| !name.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string())
}

/// `current`'s managedFields (none for a create) with `manager`'s entry
/// for a write of `body` at `time`.
pub fn record(
    current: Option<&Value>,
    body: &Value,
    manager: &str,
    operation: &str,
    time: &str,
) -> Value {
    let mut entries: Vec<Value> = current
        .and_then(|c| c["metadata"]["managedFields"].as_array().cloned())
        .unwrap_or_default();
    let mine = |e: &Value| e["manager"] == manager && e["operation"] == operation;
    let mut fields = fields_of(body, true);
    if let Some(previous) = entries.iter().find(|e| mine(e)) {
        merge(&mut fields, &previous["fieldsV1"]);
    }
    entries.retain(|e| !mine(e));
    entries.push(json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": body["apiVersion"].as_str().or_else(|| current.and_then(|c| c["apiVersion"].as_str())),
        "time": time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }));
    Value::Array(entries)
}

/// The FieldsV1 set of what `value` sets: `f:<key>` per object member,
/// `{}` for a leaf; lists are owned whole (`{}`), a simplification.
fn fields_of(value: &Value, top: bool) -> Value {
    match value {
        Value::Object(members) => {
            let mut set = Map::new();
            for (key, member) in members {
                if top && (key == "apiVersion" || key == "kind" || key == "status") {
                    continue;
                }
                let member = if top && key == "metadata" {
                    let mut metadata = member.clone();
                    if let Some(map) = metadata.as_object_mut() {
                        map.retain(|k, _| !SERVER_FIELDS.contains(&k.as_str()));
                    }
                    fields_of(&metadata, false)
                } else {
                    fields_of(member, false)
                };
                set.insert(format!("f:{key}"), member);
            }
            Value::Object(set)
        }
        _ => json!({}),
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            match into.get_mut(key) {
                Some(existing) => merge(existing, value),
                None => {
                    into.insert(key.clone(), value.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_patch_is_recorded_under_its_manager() {
        let current = json!({"metadata": {"managedFields": [
            {"manager": "kubectl-client-side-apply", "operation": "Update", "fieldsV1": {"f:spec": {}}}
        ]}});
        let patch = json!({"metadata": {"labels": {"trellis.dev/inject": "enabled"}}});
        let entries = record(
            Some(&current),
            &patch,
            "kubectl-label",
            "Update",
            "2026-12-02T01:00:00Z",
        );
        assert_eq!(entries.as_array().unwrap().len(), 2);
        assert_eq!(
            entries[1]["fieldsV1"],
            json!({"f:metadata": {"f:labels": {"f:trellis.dev/inject": {}}}})
        );
        assert_eq!(entries[1]["time"], "2026-12-02T01:00:00Z");
        let again = record(
            Some(&json!({"metadata": {"managedFields": entries}})),
            &json!({"metadata": {"labels": {"team": "a"}}}),
            "kubectl-label",
            "Update",
            "2026-12-02T01:00:05Z",
        );
        assert_eq!(again.as_array().unwrap().len(), 2);
        assert_eq!(
            again[1]["fieldsV1"]["f:metadata"]["f:labels"],
            json!({"f:team": {}, "f:trellis.dev/inject": {}})
        );
    }

    #[test]
    fn managers_come_from_the_parameter_or_the_user_agent() {
        assert_eq!(manager(Some("helm"), Some("kubectl/v1.32")), "helm");
        assert_eq!(
            manager(None, Some("kubectl/v1.32.0 (linux/amd64)")),
            "kubectl"
        );
        assert_eq!(manager(Some(""), None), "unknown");
    }
}
