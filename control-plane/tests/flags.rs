//! Absurd flag values are refused by name when the flags are read, never a
//! panic once the controller runs.

use std::process::Command;
use std::time::Duration;

use trellis_control_plane::identity::{parse_issuer_lifetime, parse_leaf_lifetime};

#[test]
fn a_huge_leaf_lifetime_is_a_flag_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    for lifetime in ["10000000000000000000", "99999999999h", "0s"] {
        let output = Command::new(env!("CARGO_BIN_EXE_trellis-controller"))
            .args(["--state-dir", dir, "--manifests", dir])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--leaf-lifetime", lifetime])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{lifetime}: {stderr}");
        assert!(stderr.contains("--leaf-lifetime"), "{lifetime}: {stderr}");
        assert!(!stderr.contains("panicked"), "{lifetime}: {stderr}");
    }
}

#[test]
fn lifetimes_are_bounded_by_their_signer() {
    assert_eq!(
        parse_leaf_lifetime("24h"),
        Ok(Duration::from_secs(24 * 3600))
    );
    assert_eq!(
        parse_leaf_lifetime("8760h"),
        Ok(Duration::from_secs(8760 * 3600))
    );
    let error = parse_leaf_lifetime("8761h").unwrap_err().to_string();
    assert!(error.contains("at most 8760h"), "{error}");
    assert!(parse_issuer_lifetime("87600h").is_ok());
    let error = parse_issuer_lifetime("9999999999h")
        .unwrap_err()
        .to_string();
    assert!(error.contains("at most 87600h"), "{error}");
}
