//! Cluster-mode proof of identity: a projected service-account token
//! (audience [`AUDIENCE`]) that the API server vouches for in a
//! TokenReview. The token proves `system:serviceaccount:<ns>:<sa>`, and a
//! proxy may ask only for `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`; the
//! trust domain is checked by the CA when it signs.
//!
//! There is no cache of reviews: a proxy asks once per renewal (hours
//! apart), so reviews are rare, and a cache would keep a revoked token (its
//! pod deleted) good for as long as the entry lives.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use trellis_proto::SpiffeId;

use super::authenticator::Refusal;

/// The audience proxies' tokens are issued for (the projected volume's
/// `audience`), so a token meant for another service cannot be replayed here.
pub const AUDIENCE: &str = "trellis.dev";

/// What the API server puts in a review's error when the token was issued
/// for other audiences (k8s.io/kubernetes pkg/serviceaccount/jwt.go). The
/// review says why only in prose; recognising this one tells a token for
/// another service from a forged or expired one in the refusal metric.
const AUDIENCE_MISMATCH: &str = "is invalid for the target audiences";

pub struct TokenReviewer {
    reviews: Api<TokenReview>,
}

impl TokenReviewer {
    pub fn new(client: Client) -> Self {
        Self {
            reviews: Api::all(client),
        }
    }

    /// Succeeds when the API server authenticates `token` for [`AUDIENCE`]
    /// as the service account of `identity`.
    pub async fn authenticate(&self, identity: &SpiffeId, token: &str) -> Result<(), Refusal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Refusal::InvalidToken("it is empty".into()));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![AUDIENCE.to_string()]),
                token: Some(token.to_string()),
            },
            ..TokenReview::default()
        };
        let answer = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(Refusal::ReviewFailed)?;
        judge(identity, &answer.status.unwrap_or_default())
    }
}

/// The verdict on a review's `status` for a request for `identity`.
fn judge(identity: &SpiffeId, status: &TokenReviewStatus) -> Result<(), Refusal> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("no reason given");
        return Err(if why.contains(AUDIENCE_MISMATCH) {
            Refusal::WrongAudience(why.to_string())
        } else {
            Refusal::InvalidToken(format!("the API server did not authenticate it: {why}"))
        });
    }
    // An authenticator that ignores audiences says so by leaving ours out.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(Refusal::WrongAudience(format!(
            "the API server authenticated it for {audiences:?}, not {AUDIENCE:?}"
        )));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|user| user.username.as_deref())
        .unwrap_or_default();
    let expected = format!(
        "system:serviceaccount:{}:{}",
        identity.namespace, identity.service_account
    );
    if username != expected {
        return Err(Refusal::IdentityMismatch {
            requested: Box::new(identity.clone()),
            detail: format!("the token is {username:?}'s, not {expected:?}'s"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn hello() -> SpiffeId {
        SpiffeId::new("cluster.local", "default", "hello")
    }

    fn authenticated(username: &str, audiences: &[&str]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    fn refused(error: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error.into()),
            ..TokenReviewStatus::default()
        }
    }

    fn reason(status: &TokenReviewStatus) -> &'static str {
        judge(&hello(), status).map_or_else(|r| r.reason(), |()| "ok")
    }

    #[test]
    fn only_the_requested_service_account_for_our_audience_passes() {
        let ours = "system:serviceaccount:default:hello";
        assert_eq!(reason(&authenticated(ours, &[AUDIENCE])), "ok");
        for other in [
            "system:serviceaccount:default:frontend",
            "system:serviceaccount:other:hello",
            "system:serviceaccount:default:hello:x",
            "system:serviceaccount:default",
            "alice",
            "",
        ] {
            assert_eq!(
                reason(&authenticated(other, &[AUDIENCE])),
                "identity-mismatch",
                "{other}"
            );
        }
        assert_eq!(
            reason(&authenticated(ours, &["https://kubernetes.default.svc"])),
            "wrong-audience"
        );
        assert_eq!(reason(&authenticated(ours, &[])), "wrong-audience");
    }

    #[test]
    fn a_refused_review_says_whether_the_audience_was_the_problem() {
        assert_eq!(
            reason(&refused(
                r#"[invalid bearer token, token audiences ["vault"] is invalid for the target audiences ["trellis.dev"]]"#
            )),
            "wrong-audience"
        );
        assert_eq!(
            reason(&refused(
                "[invalid bearer token, service account token has expired]"
            )),
            "invalid-token"
        );
        assert_eq!(reason(&TokenReviewStatus::default()), "invalid-token");
    }
}
