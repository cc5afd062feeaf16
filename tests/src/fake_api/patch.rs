//! PATCH bodies: JSON merge patch (RFC 7386) and an approximation of
//! strategic merge patch.
//!
//! The strategic merge here is a merge patch that also knows the merge keys
//! of the lists kubectl patches in the kinds this server serves (Service
//! ports, Pod containers/ports/env/volumes, owner references, conditions),
//! and honours the directives kubectl sends: `$patch: delete|replace`,
//! `$retainKeys`, `$deleteFromPrimitiveList/<field>`. `$setElementOrder/<field>`
//! is accepted and ignored (order is kept as stored, new elements appended).
//! Every other list is replaced, as for lists without a patch strategy.

use serde_json::{Map, Value};

/// RFC 7386: objects merge, `null` removes, everything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// The merge key of the list at `path` (dotted, no indices) in `kind`.
fn merge_key(kind: &str, path: &str) -> Option<&'static str> {
    match (kind, path) {
        (_, "metadata.ownerReferences") => Some("uid"),
        (_, "status.conditions") => Some("type"),
        ("Service", "spec.ports") => Some("port"),
        ("Pod", "spec.containers" | "spec.initContainers" | "spec.volumes") => Some("name"),
        ("Pod", "spec.containers.env" | "spec.initContainers.env") => Some("name"),
        ("Pod", "spec.containers.ports" | "spec.initContainers.ports") => Some("containerPort"),
        ("Pod", "spec.containers.volumeMounts" | "spec.initContainers.volumeMounts") => {
            Some("mountPath")
        }
        _ => None,
    }
}

/// Strategic merge of `patch` into the object `target` of kind `kind`.
pub fn strategic(target: &mut Value, patch: &Value, kind: &str) {
    strategic_at(target, patch, kind, "");
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn without_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_directives).collect()),
        other => other.clone(),
    }
}

fn strategic_at(target: &mut Value, patch: &Value, kind: &str, path: &str) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") || !target.is_object() {
        *target = without_directives(patch);
        return;
    }
    let Value::Object(target_map) = target else {
        unreachable!("checked above")
    };
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) =
                (target_map.get_mut(field), value)
            {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        let path = child_path(path, key);
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Object(inner)
                if inner.get("$patch").and_then(Value::as_str) == Some("delete") =>
            {
                target_map.remove(key);
            }
            Value::Array(items) => match (merge_key(kind, &path), target_map.get_mut(key)) {
                (Some(merge_key), Some(Value::Array(current))) => {
                    merge_list(current, items, merge_key, kind, &path)
                }
                _ => {
                    target_map.insert(key.clone(), without_directives(value));
                }
            },
            _ => strategic_at(
                target_map.entry(key.clone()).or_insert(Value::Null),
                value,
                kind,
                &path,
            ),
        }
    }
    if let Some(Value::Array(retain)) = patch_map.get("$retainKeys") {
        target_map.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
}

fn merge_list(current: &mut Vec<Value>, patch: &[Value], merge_key: &str, kind: &str, path: &str) {
    for element in patch {
        let key = &element[merge_key];
        let position = current.iter().position(|c| &c[merge_key] == key);
        let delete = element.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                current.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => strategic_at(&mut current[i], element, kind, path),
            (None, false) => current.push(without_directives(element)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_merges_objects_and_replaces_lists() {
        let mut object = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge(&mut object, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(object, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn strategic_patch_merges_service_ports_by_port() {
        let mut service = json!({"spec": {"selector": {"app": "web"}, "ports": [
            {"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": 8443}]}});
        // What kubectl apply sends when port 443 is removed, 80 retargeted and 81 added.
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 80}, {"port": 81}],
            "ports": [{"port": 80, "targetPort": 9090}, {"port": 81}, {"$patch": "delete", "port": 443}]}});
        strategic(&mut service, &patch, "Service");
        assert_eq!(
            service,
            json!({"spec": {"selector": {"app": "web"}, "ports": [
                {"port": 80, "targetPort": 9090}, {"port": 81}]}})
        );
    }

    #[test]
    fn strategic_patch_replaces_lists_without_merge_key_and_honours_retain_keys() {
        let mut slice = json!({"endpoints": [{"addresses": ["10.0.0.1"]}],
            "spec": {"type": "A", "a": 1, "b": 2}});
        let patch = json!({"endpoints": [{"addresses": ["10.0.0.2"]}],
            "spec": {"$retainKeys": ["type", "b"], "b": 3}});
        strategic(&mut slice, &patch, "EndpointSlice");
        assert_eq!(
            slice,
            json!({"endpoints": [{"addresses": ["10.0.0.2"]}], "spec": {"type": "A", "b": 3}})
        );
    }
}
