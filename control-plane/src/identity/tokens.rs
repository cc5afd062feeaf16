//! Local-mode bootstrap tokens: the proof a proxy presents with its CSR.
//! A token is an HMAC of the SPIFFE ID under a key only the controller (and
//! whoever it hands tokens to, like `meshctl demo`) holds, so no token list
//! needs to be stored. Cluster mode proves identity with TokenReview instead.

use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use trellis_proto::SpiffeId;

use super::ca::{write_file, CaError};

pub const KEY_FILE: &str = "bootstrap.key";

pub struct BootstrapTokens {
    key: hmac::Key,
}

impl BootstrapTokens {
    /// Opens `<dir>/bootstrap.key` (32 random bytes, 0600), creating it once.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(KEY_FILE);
        let io = |source| CaError::Io {
            path: path.clone(),
            source,
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io)?;
                let mut bytes = vec![0u8; 32];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| io(std::io::Error::other("no randomness")))?;
                write_file(&path, &bytes, 0o600)?;
                bytes
            }
            Err(e) => return Err(io(e)),
        };
        if bytes.len() != 32 {
            return Err(CaError::Invalid {
                origin: path.display().to_string(),
                reason:
                    "expected 32 bytes; delete it to create a new key (invalidates issued tokens)"
                        .into(),
            });
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
        })
    }

    /// Opens `<dir>/bootstrap.key`, which must exist: a tool handing out
    /// tokens (`meshctl token`) must not create a key the controller lacks.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(KEY_FILE);
        if !path.is_file() {
            return Err(CaError::Invalid {
                origin: path.display().to_string(),
                reason: "does not exist; is this the controller's --state-dir (the demo's state directory)?".into(),
            });
        }
        Self::load_or_create(dir)
    }

    /// The token that proves `identity`.
    pub fn token_for(&self, identity: &SpiffeId) -> String {
        let tag = hmac::sign(&self.key, identity.to_string().as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `token` has the shape of a bootstrap token (64 hex digits),
    /// whoever it proves.
    pub fn well_formed(token: &str) -> bool {
        decode_hex(token.trim()).is_some_and(|tag| tag.len() == 32)
    }

    /// Whether `token` proves `identity` (constant time).
    pub fn verify(&self, identity: &SpiffeId, token: &str) -> bool {
        let Some(tag) = decode_hex(token.trim()) else {
            return false;
        };
        hmac::verify(&self.key, identity.to_string().as_bytes(), &tag).is_ok()
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
