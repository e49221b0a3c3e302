//! TLS and QUIC configuration: TLS 1.3 only, ALPN `appliance-sync/1`, the
//! `ring` provider, mutual authentication against the appliance CA.
//!
//! [`EnrolledClientVerifier`] runs inside the handshake: a client whose
//! certificate is revoked or not enrolled is refused before the handshake
//! completes, then the certificate must chain to our CA (rustls' WebPKI
//! verifier, which also checks the client-auth EKU and validity). The server
//! code therefore never sees, let alone serves, an unknown device.

use crate::identity::{Authority, Bundle, IdentityError, SERVER_NAME};
use appliance_sync_proto::ALPN;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use std::sync::Arc;

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("bad CA certificate: {0}")]
    Ca(String),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto configuration: {0}")]
    Quic(String),
    #[error("identity bundle: {0}")]
    Bundle(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| TlsError::Ca(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// Client-certificate verifier: enrolled, not revoked, chained to our CA.
#[derive(Debug)]
pub struct EnrolledClientVerifier {
    authority: Arc<Authority>,
    chain: Arc<dyn ClientCertVerifier>,
}

impl EnrolledClientVerifier {
    /// A verifier over `authority`'s CA and registry.
    pub fn new(authority: Arc<Authority>) -> Result<Self, TlsError> {
        let chain =
            WebPkiClientVerifier::builder_with_provider(roots(authority.ca_der())?, provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(Self { authority, chain })
    }
}

impl ClientCertVerifier for EnrolledClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if self.authority.is_revoked(end_entity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        // Chain first for unknown certificates, so a stranger's self-signed
        // certificate gets the precise "unknown issuer" alert.
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.authority.client_for_cert(end_entity).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The server's rustls configuration (TLS 1.3, ALPN, client auth required).
pub fn server_tls_config(authority: &Arc<Authority>) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(EnrolledClientVerifier::new(authority.clone())?);
    let (chain, key) = authority.server_identity()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data could be replayed; uploads are not idempotent requests.
    config.max_early_data_size = 0;
    Ok(config)
}

/// The server's QUIC crypto configuration.
pub fn server_crypto(authority: &Arc<Authority>) -> Result<Arc<QuicServerConfig>, TlsError> {
    let tls = server_tls_config(authority)?;
    Ok(Arc::new(
        QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?,
    ))
}

/// A client rustls configuration from a bundle: trusts only the bundle's
/// CA, presents the bundle's certificate.
pub fn client_tls_config(bundle: &Bundle) -> Result<rustls::ClientConfig, TlsError> {
    let ca = bundle.ca_der().map_err(TlsError::Bundle)?;
    let cert = bundle.cert_der().map_err(TlsError::Bundle)?;
    let key = bundle.key_der().map_err(TlsError::Bundle)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&ca)?)
        .with_client_auth_cert(vec![cert], key)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The client's QUIC crypto configuration.
pub fn client_crypto(bundle: &Bundle) -> Result<Arc<QuicClientConfig>, TlsError> {
    let tls = client_tls_config(bundle)?;
    Ok(Arc::new(
        QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?,
    ))
}

/// The TLS name a bundle's client asks for.
pub fn server_name(bundle: &Bundle) -> &str {
    if bundle.server_name.is_empty() {
        SERVER_NAME
    } else {
        &bundle.server_name
    }
}
