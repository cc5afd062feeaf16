//! Failures as the API server reports them: `Status` objects with a reason
//! and an HTTP code, whose message kubectl prints as it is.

use serde_json::{json, Value};

use super::resources::Resource;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    /// `(resource, name)` for `details`, when the failure is about one object.
    pub about: Option<(String, String)>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            about: None,
        }
    }

    fn about(mut self, resource: &Resource, name: &str) -> Self {
        self.about = Some((resource.plural.to_string(), name.to_string()));
        self
    }

    pub fn not_found(resource: &Resource, name: &str) -> Self {
        let message = format!("{} \"{name}\" not found", resource.qualified());
        Self::new(404, "NotFound", message).about(resource, name)
    }

    pub fn already_exists(resource: &Resource, name: &str) -> Self {
        let message = format!("{} \"{name}\" already exists", resource.qualified());
        Self::new(409, "AlreadyExists", message).about(resource, name)
    }

    pub fn conflict(resource: &Resource, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            resource.qualified()
        );
        Self::new(409, "Conflict", message).about(resource, name)
    }

    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn invalid(resource: &Resource, name: &str, message: impl Into<String>) -> Self {
        let message = format!(
            "{} \"{name}\" is invalid: {}",
            resource.kind,
            message.into()
        );
        Self::new(422, "Invalid", message).about(resource, name)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, "Forbidden", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", message.into()),
        )
    }

    /// A webhook's refusal, with the code it chose (400 if none).
    pub fn denied(code: u16, message: impl Into<String>) -> Self {
        let reason = if code == 403 {
            "Forbidden"
        } else {
            "BadRequest"
        };
        Self::new(code, reason, message)
    }

    pub fn path_not_found(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some((kind, name)) = &self.about {
            status["details"] = json!({"name": name, "kind": kind});
        }
        status
    }
}
