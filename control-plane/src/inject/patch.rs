//! The JSONPatch (RFC 6902) the webhook answers with. Injection only ever
//! adds, so the only operation is `add`; [`apply`] is how injection itself
//! changes a pod, so the patch and the injected pod cannot disagree.

use serde::Serialize;
use serde_json::Value;

/// One `add` operation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Operation {
    op: &'static str,
    /// A JSON Pointer (RFC 6901).
    pub path: String,
    pub value: Value,
}

impl Operation {
    /// Adds `value` at `path` (already a JSON Pointer).
    pub fn add(path: impl Into<String>, value: Value) -> Self {
        Self {
            op: "add",
            path: path.into(),
            value,
        }
    }
}

/// A JSON Pointer token: `~` and `/` escaped (`trellis.dev/injected-by`
/// is `trellis.dev~1injected-by`).
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// An operation whose path does not lead to an object or array.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot add at {path}: {reason}")]
pub struct PatchError {
    pub path: String,
    pub reason: &'static str,
}

/// Applies `operations` to `target` in order, as an RFC 6902 implementation
/// would.
pub fn apply(target: &mut Value, operations: &[Operation]) -> Result<(), PatchError> {
    for operation in operations {
        let error = |reason| PatchError {
            path: operation.path.clone(),
            reason,
        };
        let (parent, last) = operation
            .path
            .rsplit_once('/')
            .ok_or_else(|| error("the path does not start with /"))?;
        let parent = target
            .pointer_mut(parent)
            .ok_or_else(|| error("the parent does not exist"))?;
        let value = operation.value.clone();
        match parent {
            Value::Object(map) => {
                map.insert(unescape(last), value);
            }
            Value::Array(items) if last == "-" => items.push(value),
            Value::Array(items) => {
                let index = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(|| error("the index is out of bounds"))?;
                items.insert(index, value);
            }
            _ => return Err(error("the parent is neither an object nor an array")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn adds_to_objects_and_arrays_with_escaped_keys() {
        let mut doc = json!({"metadata": {"annotations": {}}, "spec": {"list": [1, 3]}});
        let operations = [
            Operation::add(
                format!("/metadata/annotations/{}", escape("trellis.dev/a~b")),
                json!("x"),
            ),
            Operation::add("/spec/list/1", json!(2)),
            Operation::add("/spec/list/-", json!(4)),
            Operation::add("/spec/new", json!([])),
        ];
        apply(&mut doc, &operations).unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"annotations": {"trellis.dev/a~b": "x"}}, "spec": {"list": [1, 2, 3, 4], "new": []}})
        );
        assert_eq!(
            serde_json::to_value(&operations[0]).unwrap(),
            json!({"op": "add", "path": "/metadata/annotations/trellis.dev~1a~0b", "value": "x"})
        );
        let error = apply(&mut doc, &[Operation::add("/missing/x", json!(1))]).unwrap_err();
        assert_eq!(error.reason, "the parent does not exist");
        let error = apply(&mut doc, &[Operation::add("/spec/list/9", json!(1))]).unwrap_err();
        assert_eq!(error.reason, "the index is out of bounds");
    }
}
