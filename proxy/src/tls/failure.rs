//! Why a TLS handshake failed, in a few words: the `reason` label of
//! `trellis_tls_handshake_failures_total` and the key its log lines are
//! rate-limited by.

use std::io;

use rustls::AlertDescription;

/// What went wrong in a handshake, from the cause rustls (or the socket) gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The handshake did not finish within the handshake timeout (a
    /// half-open or stalled client).
    Timeout,
    /// The bytes were not TLS (garbage after a record type that looked like it).
    NotTls,
    /// The client presented no certificate, or the server asked for one we lack.
    NoCertificate,
    /// A certificate was refused: unknown CA, expired, no SPIFFE ID…
    BadCertificate,
    /// The peer proved another identity than the one expected.
    WrongPeer,
    /// No common ALPN protocol.
    Alpn,
    /// The peer closed or reset the connection mid-handshake.
    Closed,
    /// Anything else (incompatible versions or ciphers, internal errors).
    Other,
}

impl FailureReason {
    /// Every reason, so each series exists (at 0) from the start.
    pub const ALL: [FailureReason; 8] = [
        FailureReason::Timeout,
        FailureReason::NotTls,
        FailureReason::NoCertificate,
        FailureReason::BadCertificate,
        FailureReason::WrongPeer,
        FailureReason::Alpn,
        FailureReason::Closed,
        FailureReason::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FailureReason::Timeout => "timeout",
            FailureReason::NotTls => "not_tls",
            FailureReason::NoCertificate => "no_certificate",
            FailureReason::BadCertificate => "bad_certificate",
            FailureReason::WrongPeer => "wrong_peer",
            FailureReason::Alpn => "alpn",
            FailureReason::Closed => "closed",
            FailureReason::Other => "other",
        }
    }

    /// The reason of a failed `tokio_rustls` handshake: rustls' own error
    /// travels inside the `io::Error`.
    pub fn of_io(error: &io::Error) -> Self {
        if let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Self::of_rustls(tls);
        }
        match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => FailureReason::Closed,
            io::ErrorKind::TimedOut => FailureReason::Timeout,
            _ => FailureReason::Other,
        }
    }

    pub fn of_rustls(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidMessage(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. }
            | E::PeerSentOversizedRecord
            | E::DecryptError => FailureReason::NotTls,
            E::NoCertificatesPresented => FailureReason::NoCertificate,
            E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => {
                FailureReason::BadCertificate
            }
            E::NoApplicationProtocol => FailureReason::Alpn,
            E::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => FailureReason::NoCertificate,
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA
                | AlertDescription::AccessDenied => FailureReason::BadCertificate,
                AlertDescription::NoApplicationProtocol => FailureReason::Alpn,
                _ => FailureReason::Other,
            },
            _ => FailureReason::Other,
        }
    }
}

impl super::TlsError {
    /// The label this failure is counted under.
    pub fn failure_reason(&self) -> FailureReason {
        match self {
            super::TlsError::Handshake(e) => FailureReason::of_io(e),
            super::TlsError::HandshakeTimeout(_) => FailureReason::Timeout,
            super::TlsError::UnexpectedPeer { .. } => FailureReason::WrongPeer,
            super::TlsError::NotSpiffe(_) => FailureReason::BadCertificate,
            _ => FailureReason::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_causes_inside_io_errors_are_found() {
        let wrapped = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::NoCertificatesPresented,
        );
        assert_eq!(FailureReason::of_io(&wrapped), FailureReason::NoCertificate);
        let unknown_ca = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(
            FailureReason::of_io(&unknown_ca),
            FailureReason::BadCertificate
        );
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(FailureReason::of_io(&eof), FailureReason::Closed);
    }
}
