//! HTTP requests to API verbs: which document or resource a path names,
//! which verb a method and query ask for, and the response for each.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};

use super::admission;
use super::managed_fields;
use super::rbac::{self, Attributes, User};
use super::requests::Call;
use super::resources::{self, Resource};
use super::selector::Selector;
use super::status::ApiError;
use super::store::{self, ListPage, Part, PatchType, WatchStart, Writer};
use super::watch::{self, WatchRequest};
use super::Shared;

pub type Body = BoxBody<Bytes, Infallible>;

/// What a resource path names.
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    part: Part,
}

struct Answer {
    verb: &'static str,
    resource: &'static str,
    response: Response<Body>,
}

pub async fn handle(
    shared: Arc<Shared>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let header = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let request = ClientRequest {
        user: impersonate(
            authenticate(&shared, &header(header::AUTHORIZATION)),
            &parts.headers,
        ),
        manager: managed_fields::manager(
            query.get("fieldManager").map(String::as_str),
            Some(&header(header::USER_AGENT)),
        ),
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        content_type: header(header::CONTENT_TYPE),
        body,
        warnings: Vec::new(),
    };
    let (answer, calls) = match admit(&shared, &parts.method, parts.uri.path(), &query, request)
        .await
    {
        Ok(mut request) => {
            let (answer, calls) = route(&shared, &parts.method, parts.uri.path(), &query, &request);
            let mut answer = answer;
            for warning in request.warnings.drain(..) {
                let value = format!("299 - {:?}", warning);
                if let Ok(value) = http::HeaderValue::from_str(&value) {
                    answer.response.headers_mut().append(header::WARNING, value);
                }
            }
            (answer, calls)
        }
        Err((answer, call)) => (answer, call.into_iter().collect()),
    };
    let line = format!(
        "{} {} ({}) -> {}",
        parts.method,
        parts.uri,
        calls.first().map_or("-", |c| c.user.as_str()),
        answer.response.status().as_u16()
    );
    let mut log = shared.requests.lock().expect("request log lock");
    log.record(answer.verb, answer.resource, line);
    for call in calls {
        log.record_call(call, answer.response.status().as_u16());
    }
    drop(log);
    Ok(answer.response)
}

/// One request as the handlers need it: who sent it, under which field
/// manager, and its body after admission.
struct ClientRequest {
    user: User,
    manager: String,
    dry_run: bool,
    content_type: String,
    body: Bytes,
    warnings: Vec<String>,
}

/// The user a bearer token names: a token the test registered for the API
/// server's audience, else the admin.
fn authenticate(shared: &Shared, authorization: &str) -> User {
    authorization
        .strip_prefix("Bearer ")
        .and_then(|token| {
            shared
                .tokens
                .lock()
                .expect("tokens lock")
                .user(token.trim())
        })
        .unwrap_or_else(User::admin)
}

/// The user an admin acts as with `Impersonate-User` (kubectl `--as`,
/// `--as-group`), with the groups the API server gives it; anyone else's
/// impersonation is ignored (a real server would refuse it).
fn impersonate(user: User, headers: &http::HeaderMap) -> User {
    let Some(name) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .filter(|_| user.is_admin())
    else {
        return user;
    };
    let mut groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    if let Some((namespace, _)) = name
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        groups.push("system:serviceaccounts".to_string());
        groups.push(format!("system:serviceaccounts:{namespace}"));
    }
    groups.push("system:authenticated".to_string());
    User {
        name: name.to_string(),
        groups,
    }
}

/// Mutating admission for a Pod create, after authorization, as the API
/// server orders them; anything else passes as it is.
async fn admit(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    mut request: ClientRequest,
) -> Result<ClientRequest, (Answer, Option<Call>)> {
    let Some(target) = parse_target(path) else {
        return Ok(request);
    };
    if method != Method::POST || target.resource.kind != "Pod" || target.name.is_some() {
        return Ok(request);
    }
    let refuse = |error: ApiError, call: Option<Call>| {
        (
            Answer {
                verb: "create",
                resource: target.resource.plural,
                response: error_response(&error),
            },
            call,
        )
    };
    let call = Call::new(&request.user, attributes("create", &target, query));
    if let Err(error) = authorize(shared, &request.user, &call.attributes) {
        return Err(refuse(error, Some(call)));
    }
    let Ok(pod) = parse_body(&request.body) else {
        return Ok(request); // the create itself reports the bad body
    };
    let namespace = target
        .namespace
        .clone()
        .or_else(|| pod["metadata"]["namespace"].as_str().map(str::to_string))
        .unwrap_or_else(|| "default".to_string());
    match admission::mutate_pod(shared, &namespace, &request.user, pod, request.dry_run).await {
        Ok(admitted) => {
            request.body =
                Bytes::from(serde_json::to_vec(&admitted.object).expect("JSON values serialize"));
            request.warnings = admitted.warnings;
            Ok(request)
        }
        Err(error) => Err(refuse(error, Some(call))),
    }
}

/// What RBAC names the request as.
fn attributes(verb: &str, target: &Target, query: &HashMap<String, String>) -> Attributes {
    let mut attributes = Attributes::new(verb, target.resource);
    attributes.namespace = target.namespace.clone();
    attributes.subresource = (target.part == Part::Status).then(|| "status".to_string());
    attributes.name = target.name.clone().or_else(|| {
        query
            .get("fieldSelector")
            .and_then(|fields| fields.strip_prefix("metadata.name="))
            .filter(|name| !name.contains(','))
            .map(str::to_string)
    });
    attributes
}

fn authorize(shared: &Shared, user: &User, attributes: &Attributes) -> Result<(), ApiError> {
    let store = shared.store.lock().expect("store lock");
    if rbac::allows(&store, user, attributes) {
        Ok(())
    } else {
        Err(ApiError::forbidden(attributes.forbidden_message(user)))
    }
}

/// The API verb of a request on `target`.
fn verb_of(method: &Method, target: &Target, query: &HashMap<String, String>) -> &'static str {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (method.as_str(), &target.name) {
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", None) => "create",
        ("PUT", Some(_)) => "update",
        ("PATCH", Some(_)) => "patch",
        ("DELETE", Some(_)) => "delete",
        _ => "unsupported",
    }
}

fn json_response(status: u16, value: &Value) -> Response<Body> {
    bytes_response(
        status,
        serde_json::to_vec(value).expect("JSON values serialize"),
    )
}

fn bytes_response(status: u16, bytes: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed())
        .expect("a valid response")
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.to_status())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

/// The answer to a request, and the calls it made as RBAC names them (two
/// for a server-side apply that creates its object).
fn route(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    request: &ClientRequest,
) -> (Answer, Vec<Call>) {
    let discovery = |response| Answer {
        verb: "discovery",
        resource: "",
        response,
    };
    if method == Method::GET {
        if let Some(document) = discovery_document(shared, path) {
            return (discovery(json_response(200, &document)), Vec::new());
        }
    }
    let target = match parse_target(path) {
        Some(target) => target,
        None => {
            return (
                discovery(error_response(&ApiError::path_not_found(path))),
                Vec::new(),
            )
        }
    };
    let resource = target.resource;
    let verb = verb_of(method, &target, query);
    let mut calls = vec![Call::new(&request.user, attributes(verb, &target, query))];
    if verb == "patch" && applies_to_nothing(shared, &target, request) {
        calls.push(Call::new(
            &request.user,
            attributes("create", &target, query),
        ));
    }
    let refused = calls
        .iter()
        .find_map(|call| authorize(shared, &request.user, &call.attributes).err());
    let result = if let Some(error) = refused {
        Err(error)
    } else if resource.create_only {
        match (verb, resource.kind) {
            ("create", "TokenReview") => token_review(shared, &request.body),
            ("create", "SubjectAccessReview") => access_review(shared, &request.body),
            _ => Err(ApiError::method_not_allowed(format!(
                "{} only supports create",
                resource.qualified()
            ))),
        }
    } else {
        serve_resource(shared, method, &target, query, request)
    };
    let answer = Answer {
        verb,
        resource: resource.plural,
        response: result.unwrap_or_else(|error| error_response(&error)),
    };
    (answer, calls)
}

/// Whether a request is a server-side apply of an object that does not
/// exist: it creates it, so the API server also authorizes `create` (for
/// that name), as `k8s.io/apiserver` `handlers/patch.go` does.
fn applies_to_nothing(shared: &Shared, target: &Target, request: &ClientRequest) -> bool {
    let media_type = request.content_type.split(';').next().unwrap_or("").trim();
    let Some(name) = &target.name else {
        return false;
    };
    media_type == "application/apply-patch+yaml"
        && target.part == Part::Main
        && shared
            .store
            .lock()
            .expect("store lock")
            .get(target.resource, target.namespace.as_deref(), name)
            .is_err()
}

fn discovery_document(shared: &Shared, path: &str) -> Option<Value> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments[..] {
        ["version"] => Some(resources::version()),
        ["api"] => Some(resources::core_versions(&shared.addr.to_string())),
        ["apis"] => Some(resources::group_list()),
        ["api", "v1"] => resources::resource_list("", "v1"),
        ["apis", group] => resources::group(group),
        ["apis", group, version] => resources::resource_list(group, version),
        ["openapi", "v3"] => Some(resources::openapi_root()),
        ["openapi", "v3", ..] => resources::openapi_group_version(&segments[2..].join("/")),
        ["healthz" | "livez" | "readyz"] => Some(json!("ok")),
        _ => None,
    }
}

fn parse_target(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match &segments[..] {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest): (Option<&str>, &[&str]) = match rest {
        ["namespaces", namespace, tail @ ..]
            if tail
                .first()
                .is_some_and(|t| !["status", "finalize"].contains(t)) =>
        {
            (Some(*namespace), tail)
        }
        _ => (None, rest),
    };
    let (plural, name, part) = match rest {
        [plural] => (*plural, None, Part::Main),
        [plural, name] => (*plural, Some(name.to_string()), Part::Main),
        [plural, name, "status"] => (*plural, Some(name.to_string()), Part::Status),
        _ => return None,
    };
    let resource = Resource::by_path(group, version, plural)?;
    if namespace.is_some() && !resource.namespaced {
        return None;
    }
    if part == Part::Status && !resource.status {
        return None;
    }
    Some(Target {
        resource,
        namespace: namespace.map(str::to_string),
        name,
        part,
    })
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn object_response(status: u16, object: &Value) -> Response<Body> {
    json_response(status, object)
}

fn serve_resource(
    shared: &Shared,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    request: &ClientRequest,
) -> Result<Response<Body>, ApiError> {
    let Target {
        resource,
        namespace,
        name,
        part,
    } = target;
    let (resource, namespace, part) = (*resource, namespace.as_deref(), *part);
    let mut store = shared.store.lock().expect("store lock");
    // The managedFields a write carries: this manager's entry added to the
    // current object's.
    let managed = |current: Option<&Value>, body: &Value, operation: &str| {
        managed_fields::record(
            current,
            body,
            &request.manager,
            operation,
            &store::rfc3339_now(),
        )
    };
    match (verb_of(method, target, query), name) {
        ("watch", _) => {
            let watch = watch_request(resource, namespace, query)?;
            let body = watch::start(&store, watch, shared.watch_ends.subscribe());
            Ok(Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.boxed())
                .expect("a valid response"))
        }
        ("list", _) => {
            let (selector, limit, token, exact) = list_params(query)?;
            if let Some(exact) = exact.filter(|&rv| rv != store.resource_version()) {
                return Err(ApiError::expired(format!(
                    "too old resource version: {exact} ({}); this fake API server serves \
                     Exact lists only at the current resourceVersion",
                    store.resource_version()
                )));
            }
            let page = store.list(resource, namespace, &selector, limit, token.as_deref())?;
            Ok(list_response(resource, &page))
        }
        ("get", Some(name)) => Ok(object_response(
            200,
            &*store.get(resource, namespace, name)?,
        )),
        ("create", None) => {
            let mut object = parse_body(&request.body)?;
            let entries = managed(None, &object, "Update");
            object["metadata"]["managedFields"] = entries;
            let created = if request.dry_run {
                store.dry_run_create(resource, namespace, object)?
            } else {
                store.create(resource, namespace, object, Writer::Client)?
            };
            Ok(object_response(201, &created))
        }
        ("update", Some(name)) => {
            let mut object = parse_body(&request.body)?;
            if part == Part::Main {
                let current = store.get(resource, namespace, name)?;
                object["metadata"]["managedFields"] = managed(Some(&current), &object, "Update");
            }
            let updated = store.update(resource, namespace, name, object, part, Writer::Client)?;
            Ok(object_response(200, &updated))
        }
        ("patch", Some(name)) => {
            let current = store.get(resource, namespace, name).ok();
            let patch_type = patch_type(resource, &request.content_type, query)?;
            let mut patch = parse_body(&request.body)?;
            if part == Part::Main && patch.is_object() {
                let operation = if patch_type == PatchType::Apply {
                    "Apply"
                } else {
                    "Update"
                };
                patch["metadata"]["managedFields"] = managed(current.as_deref(), &patch, operation);
            }
            let patched = store.patch(resource, namespace, name, patch_type, &patch, part)?;
            Ok(object_response(
                if current.is_some() { 200 } else { 201 },
                &patched,
            ))
        }
        ("delete", Some(name)) => {
            let options: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
            let precondition = options["preconditions"]["resourceVersion"].as_str();
            let deleted = store.delete(resource, namespace, name, precondition)?;
            Ok(object_response(200, &deleted))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on this path by the fake API server \
             (it serves get, list, watch, create, update, patch and delete)"
        ))),
    }
}

type ListParams = (Selector, Option<usize>, Option<String>, Option<u64>);

fn list_params(query: &HashMap<String, String>) -> Result<ListParams, ApiError> {
    let selector = selector(query)?;
    let limit = match query.get("limit") {
        Some(limit) => Some(limit.parse().map_err(|_| {
            ApiError::bad_request(format!("limit {limit:?} is not a non-negative integer"))
        })?),
        None => None,
    };
    let token = query.get("continue").filter(|t| !t.is_empty()).cloned();
    let exact = match query.get("resourceVersionMatch").map(String::as_str) {
        Some("Exact") => Some(resource_version(query)?.unwrap_or(0)),
        _ => None,
    };
    Ok((selector, limit, token, exact))
}

fn selector(query: &HashMap<String, String>) -> Result<Selector, ApiError> {
    let get = |key: &str| query.get(key).map(String::as_str).filter(|s| !s.is_empty());
    Selector::parse(get("labelSelector"), get("fieldSelector"))
}

/// `resourceVersion`, `None` when absent, empty or "0" ("any").
fn resource_version(query: &HashMap<String, String>) -> Result<Option<u64>, ApiError> {
    match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => Ok(None),
        Some(version) => version.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {version:?} is not one this server issued (they are integers)"
            ))
        }),
    }
}

fn watch_request(
    resource: &'static Resource,
    namespace: Option<&str>,
    query: &HashMap<String, String>,
) -> Result<WatchRequest, ApiError> {
    let flag = |key: &str| matches!(query.get(key).map(String::as_str), Some("true" | "1"));
    let initial_events = flag("sendInitialEvents");
    let start = match resource_version(query)? {
        Some(version) if !initial_events => WatchStart::After(version),
        _ => WatchStart::Now,
    };
    let timeout = match query.get("timeoutSeconds") {
        Some(seconds) => Some(Duration::from_secs(seconds.parse().map_err(|_| {
            ApiError::bad_request(format!("timeoutSeconds {seconds:?} is not an integer"))
        })?)),
        None => None,
    };
    Ok(WatchRequest {
        resource,
        namespace: namespace.map(str::to_string),
        selector: selector(query)?,
        start,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events_end: initial_events,
        timeout,
    })
}

fn patch_type(
    resource: &Resource,
    content_type: &str,
    query: &HashMap<String, String>,
) -> Result<PatchType, ApiError> {
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    match media_type {
        "application/merge-patch+json" => Ok(PatchType::Merge),
        "application/strategic-merge-patch+json" if resource.custom() => {
            Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml (strategic merge patch is not supported for {})",
                resource.qualified()
            )))
        }
        "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
        "application/apply-patch+yaml"
            if query.get("fieldManager").is_none_or(String::is_empty) =>
        {
            Err(ApiError::bad_request(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: \
                 is required for apply patch",
            ))
        }
        "application/apply-patch+yaml" => Ok(PatchType::Apply),
        other => Err(ApiError::unsupported_media_type(format!(
            "the fake API server does not take {other:?} patches; it takes \
             application/merge-patch+json, application/strategic-merge-patch+json and \
             application/apply-patch+yaml (as JSON)"
        ))),
    }
}

fn list_response(resource: &Resource, page: &ListPage) -> Response<Body> {
    let mut metadata = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(token) = &page.continue_token {
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(page.remaining);
    }
    // Written by hand so the (shared) objects aren't cloned into a new Value.
    let mut bytes = format!(
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":",
        resource.kind,
        resource.api_version()
    )
    .into_bytes();
    serde_json::to_writer(&mut bytes, &metadata).expect("JSON values serialize");
    bytes.extend_from_slice(b",\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        serde_json::to_writer(&mut bytes, item.as_ref()).expect("JSON values serialize");
    }
    bytes.extend_from_slice(b"]}");
    bytes_response(200, bytes)
}

fn access_review(shared: &Shared, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let review = parse_body(body)?;
    if review["kind"]
        .as_str()
        .is_some_and(|k| k != "SubjectAccessReview")
    {
        return Err(ApiError::bad_request(format!(
            "kind {} does not match subjectaccessreviews.authorization.k8s.io (expected SubjectAccessReview)",
            review["kind"]
        )));
    }
    let status = rbac::review(&shared.store.lock().expect("store lock"), &review["spec"]);
    let answer = json!({
        "kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1",
        "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status,
    });
    Ok(json_response(201, &answer))
}

fn token_review(shared: &Shared, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let review = parse_body(body)?;
    if review["kind"].as_str().is_some_and(|k| k != "TokenReview") {
        return Err(ApiError::bad_request(format!(
            "kind {} does not match tokenreviews.authentication.k8s.io (expected TokenReview)",
            review["kind"]
        )));
    }
    let status = shared
        .tokens
        .lock()
        .expect("tokens lock")
        .review(&review["spec"]);
    let answer = json!({
        "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status,
    });
    Ok(json_response(201, &answer))
}
