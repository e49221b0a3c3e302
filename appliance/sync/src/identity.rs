//! The appliance's sync certificate authority, its server certificate, and
//! the registry of enrolled client devices.
//!
//! Layout under the identity directory (0700, every file 0600):
//! ```text
//! ca.key.pem       CA private key (ECDSA P-256)      refused if group/other may read it
//! ca.cert.pem      CA certificate (self-signed)      repaired to 0600 if looser
//! server.key.pem   server private key                refused if looser
//! server.cert.pem  server certificate, signed by CA  repaired to 0600 if looser
//! clients.json     registry: clients + revoked fingerprints (atomic rewrite)
//! ```
//!
//! A private key that was readable by other users may have been copied, so
//! a looser mode on a key is an error for the operator to look at (and to
//! fix by re-creating the identity); certificates and the registry are not
//! secret, so their mode is simply repaired.
//!
//! Clients are identified by the BLAKE3 fingerprint of their certificate's
//! DER. A connection is accepted only if its certificate chains to our CA
//! *and* its fingerprint belongs to an enrolled, non-revoked client, so a
//! certificate we signed but no longer know (a registry restored from an old
//! backup, say) is refused too. Revocation is persisted before it is
//! announced; the server subscribes to the announcements and closes the
//! revoked client's live connections.
//!
//! The server certificate names [`SERVER_NAME`], a fixed name in the
//! reserved `.invalid` domain, instead of an address: the appliance is
//! reached through changing addresses (LAN, port forwards, dynamic DNS), and
//! trust rests on the private CA pinned in each client's bundle, not on the
//! name. Certificates keep rcgen's very long validity: the appliance has no
//! renewal channel to its clients, and revocation is how access ends.

use crate::fsutil::{
    ensure_dir, is_looser_than_private, mode_of, write_atomic, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE,
};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// The name the server certificate carries and every client asks for (SNI).
pub const SERVER_NAME: &str = "sync.appliance.invalid";
/// Common name of the appliance CA.
const CA_COMMON_NAME: &str = "appliance sync CA";
/// Longest client name. Names become directory names, bus subject tokens and
/// certificate common names; 63 keeps all three comfortable.
pub const MAX_CLIENT_NAME_LEN: usize = 63;
/// Version of the bundle file format.
pub const BUNDLE_VERSION: u32 = 1;

/// A validated client (device) name: 1 to [`MAX_CLIENT_NAME_LEN`] bytes of
/// `[a-z0-9_-]`, starting with a letter or digit. No dots, slashes or
/// upper case, so it is safe as a directory name and a bus subject token and
/// cannot collide case-insensitively.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientName(String);

/// Why a client name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientNameError {
    #[error("client name is empty")]
    Empty,
    #[error("client name is {len} bytes long; the limit is {MAX_CLIENT_NAME_LEN}")]
    TooLong { len: usize },
    #[error("client name {name:?} has character {ch:?}; use a-z, 0-9, '-' and '_'")]
    BadChar { name: String, ch: char },
    #[error("client name {name:?} must start with a letter or digit")]
    BadStart { name: String },
}

impl ClientName {
    /// Validates `name`.
    pub fn parse(name: &str) -> Result<Self, ClientNameError> {
        if name.is_empty() {
            return Err(ClientNameError::Empty);
        }
        if name.len() > MAX_CLIENT_NAME_LEN {
            return Err(ClientNameError::TooLong { len: name.len() });
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(ClientNameError::BadChar {
                name: name.escape_debug().to_string(),
                ch,
            });
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(ClientNameError::BadStart {
                name: name.to_owned(),
            });
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ClientName {
    type Error = ClientNameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ClientName> for String {
    fn from(value: ClientName) -> Self {
        value.0
    }
}

impl fmt::Display for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ClientName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientName({})", self.0)
    }
}

/// Failures of the identity store.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has mode {mode:04o}; a private key must be 0600. It may have been copied: check the file, then remove the identity directory to create a new CA and re-enroll the clients")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("{path} is not a valid PEM {what}")]
    BadPem { path: PathBuf, what: &'static str },
    #[error("{path} is corrupt: {detail}")]
    CorruptRegistry { path: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("client {name} is already enrolled; revoke it first to issue a new identity")]
    AlreadyEnrolled { name: ClientName },
    #[error("client {name} is not enrolled")]
    UnknownClient { name: ClientName },
    #[error("client {name} is already revoked")]
    AlreadyRevoked { name: ClientName },
    #[error(
        "identity directory is incomplete: {path} is missing while other identity files exist"
    )]
    Incomplete { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One enrolled client, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub name: ClientName,
    /// Byte quota for the client's documents, if any.
    pub quota: Option<u64>,
    /// BLAKE3 of the client certificate's DER, hex.
    pub fingerprint: String,
    /// Enrollment time, Unix seconds.
    pub enrolled_at: u64,
    /// Revocation time, Unix seconds, once revoked.
    pub revoked_at: Option<u64>,
}

impl ClientInfo {
    /// Whether the client may connect.
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// The persisted registry. Revoked certificates are kept forever (they are
/// small) so that re-enrolling a name never un-revokes the old certificate.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Registry {
    version: u32,
    clients: BTreeMap<ClientName, ClientInfo>,
    /// Fingerprints of every revoked certificate.
    revoked: BTreeMap<String, ClientName>,
}

/// Everything `appliance-sync` needs to connect: written by `enroll`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub version: u32,
    pub client: ClientName,
    /// `HOST:PORT` of the appliance, if known when enrolling.
    pub server: Option<String>,
    /// The TLS name to ask for (see [`SERVER_NAME`]).
    pub server_name: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Bundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bundle")
            .field("client", &self.client)
            .field("server", &self.server)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read identity bundle {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("identity bundle {path} is not valid: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "identity bundle {path} has version {version}; this client reads version {BUNDLE_VERSION}"
    )]
    Version { path: PathBuf, version: u32 },
}

impl Bundle {
    /// Reads and checks a bundle file.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let bytes = std::fs::read(path).map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bundle: Bundle = serde_json::from_slice(&bytes).map_err(|e| BundleError::Invalid {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        if bundle.version != BUNDLE_VERSION {
            return Err(BundleError::Version {
                path: path.to_path_buf(),
                version: bundle.version,
            });
        }
        // Parse the PEMs now so a damaged bundle is reported as such.
        bundle.ca_der().map_err(|detail| BundleError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        bundle.cert_der().map_err(|detail| BundleError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        bundle.key_der().map_err(|detail| BundleError::Invalid {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(bundle)
    }

    /// The CA certificate.
    pub fn ca_der(&self) -> Result<CertificateDer<'static>, String> {
        CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .map_err(|e| format!("CA certificate: {e}"))
    }

    /// The client certificate.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, String> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| format!("client certificate: {e}"))
    }

    /// The client key.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, String> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| format!("client key: {e}"))
    }

    /// Writes the bundle to `path`, mode 0600, atomically.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(path, &json, PRIVATE_FILE_MODE)
    }
}

/// BLAKE3 fingerprint (hex) of a certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    blake3::hash(cert).to_hex().to_string()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    // pathlen 0: the CA signs leaf certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf_params(common_name: &str, eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params
}

/// The CA, the server identity and the client registry. Shared (`Arc`)
/// between the QUIC server (verification) and the daemon's control socket
/// (enroll, list, revoke).
pub struct Authority {
    dir: PathBuf,
    ca_key: KeyPair,
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    server_cert_der: CertificateDer<'static>,
    server_key_pem: String,
    registry: Mutex<Registry>,
    revocations: broadcast::Sender<ClientName>,
    public_address: Mutex<Option<String>>,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

const CA_KEY: &str = "ca.key.pem";
const CA_CERT: &str = "ca.cert.pem";
const SERVER_KEY: &str = "server.key.pem";
const SERVER_CERT: &str = "server.cert.pem";
const REGISTRY: &str = "clients.json";

impl Authority {
    /// Opens the identity in `dir`, creating the CA and the server
    /// certificate on first start. See the module docs for modes.
    pub fn open(dir: &Path) -> Result<Arc<Self>, IdentityError> {
        ensure_dir(dir, PRIVATE_DIR_MODE).map_err(io_err(dir))?;
        let files = [CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT].map(|f| dir.join(f));
        let present = files.iter().filter(|p| p.exists()).count();
        if present == 0 {
            Self::create(dir)?;
        } else if let Some(missing) = files.iter().find(|p| !p.exists()) {
            return Err(IdentityError::Incomplete {
                path: missing.clone(),
            });
        }
        for key in [CA_KEY, SERVER_KEY] {
            let path = dir.join(key);
            let mode = mode_of(&path).map_err(io_err(&path))?;
            if is_looser_than_private(mode) {
                return Err(IdentityError::InsecureKeyFile { path, mode });
            }
        }
        for other in [CA_CERT, SERVER_CERT, REGISTRY] {
            let path = dir.join(other);
            if !path.exists() {
                continue;
            }
            let mode = mode_of(&path).map_err(io_err(&path))?;
            if mode != PRIVATE_FILE_MODE {
                tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "repairing identity file mode to 0600");
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(PRIVATE_FILE_MODE),
                )
                .map_err(io_err(&path))?;
            }
        }
        let read = |name: &str| -> Result<String, IdentityError> {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_err(&path))
        };
        let ca_key_pem = read(CA_KEY)?;
        let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|_| IdentityError::BadPem {
            path: dir.join(CA_KEY),
            what: "private key",
        })?;
        let ca_pem = read(CA_CERT)?;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|_| {
            IdentityError::BadPem {
                path: dir.join(CA_CERT),
                what: "certificate",
            }
        })?;
        let server_cert_pem = read(SERVER_CERT)?;
        let server_cert_der =
            CertificateDer::from_pem_slice(server_cert_pem.as_bytes()).map_err(|_| {
                IdentityError::BadPem {
                    path: dir.join(SERVER_CERT),
                    what: "certificate",
                }
            })?;
        let server_key_pem = read(SERVER_KEY)?;
        PrivateKeyDer::from_pem_slice(server_key_pem.as_bytes()).map_err(|_| {
            IdentityError::BadPem {
                path: dir.join(SERVER_KEY),
                what: "private key",
            }
        })?;
        let registry_path = dir.join(REGISTRY);
        let registry = if registry_path.exists() {
            let bytes = std::fs::read(&registry_path).map_err(io_err(&registry_path))?;
            serde_json::from_slice(&bytes).map_err(|e| IdentityError::CorruptRegistry {
                path: registry_path.clone(),
                detail: e.to_string(),
            })?
        } else {
            Registry {
                version: 1,
                ..Registry::default()
            }
        };
        let (revocations, _) = broadcast::channel(64);
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            ca_key,
            ca_pem,
            ca_der,
            server_cert_der,
            server_key_pem,
            registry: Mutex::new(registry),
            revocations,
            public_address: Mutex::new(None),
        }))
    }

    fn create(dir: &Path) -> Result<(), IdentityError> {
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params().self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params(), &ca_key);
        let server_key = KeyPair::generate()?;
        let mut server_params =
            leaf_params("appliance sync server", ExtendedKeyUsagePurpose::ServerAuth);
        server_params.subject_alt_names = vec![rcgen::SanType::DnsName(SERVER_NAME.try_into()?)];
        let server_cert = server_params.signed_by(&server_key, &issuer)?;
        // Keys first: if we crash half-way, `open` reports the directory as
        // incomplete instead of silently running with a CA whose key is gone.
        for (name, text) in [
            (CA_KEY, ca_key.serialize_pem()),
            (SERVER_KEY, server_key.serialize_pem()),
            (CA_CERT, ca_cert.pem()),
            (SERVER_CERT, server_cert.pem()),
        ] {
            let path = dir.join(name);
            write_atomic(&path, text.as_bytes(), PRIVATE_FILE_MODE).map_err(io_err(&path))?;
        }
        tracing::info!(dir = %dir.display(), "created the sync CA and server certificate");
        Ok(())
    }

    /// The identity directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM), as clients pin it.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The server certificate chain and key for TLS.
    pub fn server_identity(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
        let key = PrivateKeyDer::from_pem_slice(self.server_key_pem.as_bytes()).map_err(|_| {
            IdentityError::BadPem {
                path: self.dir.join(SERVER_KEY),
                what: "private key",
            }
        })?;
        Ok((vec![self.server_cert_der.clone()], key))
    }

    /// Sets the `HOST:PORT` written into new bundles (the daemon knows it
    /// from its configuration; `serve` sets the bound address if unset).
    pub fn set_public_address(&self, address: Option<String>) {
        *self.public_address.lock() = address;
    }

    /// The address new bundles carry.
    pub fn public_address(&self) -> Option<String> {
        self.public_address.lock().clone()
    }

    /// Enrolls a new client: creates its key and a certificate signed by the
    /// CA, records it (durably) and writes its bundle to `bundle_path` (0600).
    /// If writing the bundle fails the enrollment is rolled back.
    pub fn enroll(
        &self,
        name: &ClientName,
        quota: Option<u64>,
        bundle_path: &Path,
    ) -> Result<ClientInfo, IdentityError> {
        let mut registry = self.registry.lock();
        if registry
            .clients
            .get(name)
            .is_some_and(ClientInfo::is_active)
        {
            return Err(IdentityError::AlreadyEnrolled { name: name.clone() });
        }
        let key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params(), &self.ca_key);
        let cert = leaf_params(name.as_str(), ExtendedKeyUsagePurpose::ClientAuth)
            .signed_by(&key, &issuer)?;
        let info = ClientInfo {
            name: name.clone(),
            quota,
            fingerprint: fingerprint(cert.der()),
            enrolled_at: unix_now(),
            revoked_at: None,
        };
        let bundle = Bundle {
            version: BUNDLE_VERSION,
            client: name.clone(),
            server: self.public_address(),
            server_name: SERVER_NAME.to_owned(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        bundle.write(bundle_path).map_err(io_err(bundle_path))?;
        let mut next = registry.clone();
        next.clients.insert(name.clone(), info.clone());
        if let Err(e) = self.persist(&next) {
            let _ = std::fs::remove_file(bundle_path);
            return Err(e);
        }
        *registry = next;
        tracing::info!(client = %name, fingerprint = %info.fingerprint, "enrolled sync client");
        Ok(info)
    }

    /// Every client ever enrolled (revoked ones included), by name.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.registry.lock().clients.values().cloned().collect()
    }

    /// One client's record.
    pub fn client(&self, name: &ClientName) -> Option<ClientInfo> {
        self.registry.lock().clients.get(name).cloned()
    }

    /// Revokes a client: persisted first, then announced so live
    /// connections are closed. New handshakes are refused from the moment
    /// this returns.
    pub fn revoke(&self, name: &ClientName) -> Result<ClientInfo, IdentityError> {
        let mut registry = self.registry.lock();
        let Some(current) = registry.clients.get(name).cloned() else {
            return Err(IdentityError::UnknownClient { name: name.clone() });
        };
        if !current.is_active() {
            return Err(IdentityError::AlreadyRevoked { name: name.clone() });
        }
        let mut next = registry.clone();
        let mut info = current;
        info.revoked_at = Some(unix_now());
        next.revoked.insert(info.fingerprint.clone(), name.clone());
        next.clients.insert(name.clone(), info.clone());
        self.persist(&next)?;
        *registry = next;
        drop(registry);
        // No receiver (server not running) is fine.
        let _ = self.revocations.send(name.clone());
        tracing::info!(client = %name, "revoked sync client");
        Ok(info)
    }

    /// Changes a client's quota (`None` removes it).
    pub fn set_quota(
        &self,
        name: &ClientName,
        quota: Option<u64>,
    ) -> Result<ClientInfo, IdentityError> {
        let mut registry = self.registry.lock();
        let Some(mut info) = registry.clients.get(name).cloned() else {
            return Err(IdentityError::UnknownClient { name: name.clone() });
        };
        info.quota = quota;
        let mut next = registry.clone();
        next.clients.insert(name.clone(), info.clone());
        self.persist(&next)?;
        *registry = next;
        Ok(info)
    }

    /// The active client a certificate belongs to, or `None` if it is
    /// unknown or revoked. (Chain verification is done by the TLS verifier.)
    pub fn client_for_cert(&self, cert_der: &[u8]) -> Option<ClientName> {
        let fp = fingerprint(cert_der);
        let registry = self.registry.lock();
        if registry.revoked.contains_key(&fp) {
            return None;
        }
        registry
            .clients
            .values()
            .find(|c| c.is_active() && c.fingerprint == fp)
            .map(|c| c.name.clone())
    }

    /// Whether a certificate fingerprint has been revoked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        self.registry
            .lock()
            .revoked
            .contains_key(&fingerprint(cert_der))
    }

    /// The quota of an active client.
    pub fn quota(&self, name: &ClientName) -> Option<u64> {
        self.registry.lock().clients.get(name).and_then(|c| c.quota)
    }

    /// Revocation announcements (client names), for the server.
    pub fn subscribe_revocations(&self) -> broadcast::Receiver<ClientName> {
        self.revocations.subscribe()
    }

    fn persist(&self, registry: &Registry) -> Result<(), IdentityError> {
        let path = self.dir.join(REGISTRY);
        let json = serde_json::to_vec_pretty(registry).map_err(|e| IdentityError::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &json, PRIVATE_FILE_MODE).map_err(io_err(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn client_names() {
        for ok in ["alice", "laptop-2", "a", "x_y", "0day"] {
            assert!(ClientName::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(ClientName::parse(""), Err(ClientNameError::Empty));
        for bad in ["../x", "a/b", "A", ".hidden", "a.b", "a b", "é", "a\0"] {
            assert!(
                matches!(ClientName::parse(bad), Err(ClientNameError::BadChar { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ClientName::parse("-x"),
            Err(ClientNameError::BadStart { .. })
        ));
        assert!(matches!(
            ClientName::parse(&"a".repeat(64)),
            Err(ClientNameError::TooLong { len: 64 })
        ));
        let json = serde_json::to_string(&ClientName::parse("bob").unwrap()).unwrap();
        assert_eq!(json, "\"bob\"");
        assert!(serde_json::from_str::<ClientName>("\"../etc\"").is_err());
    }

    #[test]
    fn creates_identity_with_private_modes_and_reopens_it() {
        let dir = tempfile::tempdir().unwrap();
        let id_dir = dir.path().join("sync");
        let a = Authority::open(&id_dir).unwrap();
        for f in [CA_KEY, CA_CERT, SERVER_KEY, SERVER_CERT] {
            assert_eq!(mode_of(&id_dir.join(f)).unwrap(), 0o600, "{f}");
        }
        assert_eq!(mode_of(&id_dir).unwrap(), 0o700);
        let ca = a.ca_pem().to_owned();
        drop(a);
        let b = Authority::open(&id_dir).unwrap();
        assert_eq!(b.ca_pem(), ca, "the CA survives a restart");
    }

    #[test]
    fn refuses_loose_key_and_repairs_loose_cert() {
        let dir = tempfile::tempdir().unwrap();
        Authority::open(dir.path()).unwrap();
        let cert = dir.path().join(CA_CERT);
        std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).unwrap();
        Authority::open(dir.path()).unwrap();
        assert_eq!(mode_of(&cert).unwrap(), 0o600);

        let key = dir.path().join(CA_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Authority::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::InsecureKeyFile { mode: 0o640, .. }),
            "{err}"
        );
    }

    #[test]
    fn incomplete_identity_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        Authority::open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(SERVER_KEY)).unwrap();
        assert!(matches!(
            Authority::open(dir.path()),
            Err(IdentityError::Incomplete { .. })
        ));
    }

    #[test]
    fn enroll_list_revoke_persist() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::open(&dir.path().join("id")).unwrap();
        a.set_public_address(Some("box.example:7443".into()));
        let alice = ClientName::parse("alice").unwrap();
        let bundle_path = dir.path().join("alice.bundle");
        let info = a.enroll(&alice, Some(1 << 30), &bundle_path).unwrap();
        assert_eq!(mode_of(&bundle_path).unwrap(), 0o600);
        let bundle = Bundle::load(&bundle_path).unwrap();
        assert_eq!(bundle.client, alice);
        assert_eq!(bundle.server.as_deref(), Some("box.example:7443"));
        assert_eq!(bundle.ca_pem, a.ca_pem());
        let cert = bundle.cert_der().unwrap();
        assert_eq!(fingerprint(&cert), info.fingerprint);
        assert_eq!(a.client_for_cert(&cert), Some(alice.clone()));
        assert!(matches!(
            a.enroll(&alice, None, &dir.path().join("again")),
            Err(IdentityError::AlreadyEnrolled { .. })
        ));

        let mut revocations = a.subscribe_revocations();
        a.revoke(&alice).unwrap();
        assert_eq!(revocations.try_recv().unwrap(), alice);
        assert_eq!(a.client_for_cert(&cert), None);
        assert!(a.is_revoked(&cert));
        assert!(matches!(
            a.revoke(&alice),
            Err(IdentityError::AlreadyRevoked { .. })
        ));

        // Persisted: a reopened authority still refuses the old certificate,
        // and re-enrolling the name does not revive it.
        drop(a);
        let a = Authority::open(&dir.path().join("id")).unwrap();
        assert_eq!(a.client_for_cert(&cert), None);
        assert_eq!(a.list().len(), 1);
        assert!(!a.list()[0].is_active());
        a.enroll(&alice, None, &dir.path().join("alice2.bundle"))
            .unwrap();
        assert_eq!(a.client_for_cert(&cert), None);
        let new_cert = Bundle::load(&dir.path().join("alice2.bundle"))
            .unwrap()
            .cert_der()
            .unwrap();
        assert_eq!(a.client_for_cert(&new_cert), Some(alice));
        assert!(matches!(
            a.revoke(&ClientName::parse("nobody").unwrap()),
            Err(IdentityError::UnknownClient { .. })
        ));
    }
}
