//! TLS for the room and its client, by rustls (crypto by ring) through
//! futures-rustls: server and client configurations from PEM files or the
//! system's roots, a self-signed certificate for development, and the
//! words for what goes wrong (a handshake that fails, a peer that speaks
//! TLS where we do not, or the other way round).
//!
//! chatpipe itself needs none of this: a `futures_rustls` stream is an
//! `AsyncRead + AsyncWrite` like any other.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};

pub use futures_rustls::client::TlsStream;
pub use futures_rustls::rustls;
pub use futures_rustls::{TlsAcceptor, TlsConnector};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The names a self-signed development certificate is for.
pub const LOCALHOST: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("cannot read {}: {source}", path.display())]
    File {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    /// The system has no trusted roots that could be loaded.
    #[error("no trusted root certificates found on this system ({0}); give one with --tls-ca")]
    NoSystemRoots(String),
    /// rustls refused the configuration (a key that does not match the
    /// certificate, say).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate could not be made.
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The crypto provider everything here uses: ring, named rather than left
/// to the process default, so no other provider can be picked by surprise.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file, in order (a chain: the leaf first).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |source| TlsError::File {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::File {
        path: path.to_owned(),
        source,
    })
}

/// A server configuration presenting `chain` (the leaf first) with `key`.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A server configuration from a PEM certificate chain and a PEM key file.
pub fn server_config_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    server_config(load_certs(cert)?, load_key(key)?)
}

/// A self-signed certificate and the server configuration that presents
/// it. The key lives only in the configuration, in memory.
pub struct SelfSigned {
    /// The certificate, for clients to trust (`--tls-ca`).
    pub cert: CertificateDer<'static>,
    /// The same, PEM-encoded: what to write to a file.
    pub cert_pem: String,
    /// The server's configuration, key included.
    pub config: Arc<ServerConfig>,
}

impl fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SelfSigned").finish_non_exhaustive()
    }
}

/// Makes a certificate for `names` (DNS names or IP addresses), signed by
/// its own new key, and a server configuration presenting it.
pub fn self_signed(names: &[&str]) -> Result<SelfSigned, TlsError> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let made = rcgen::generate_simple_self_signed(names)?;
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    let cert = made.cert.der().clone();
    let config = server_config(vec![cert.clone()], key.into())?;
    Ok(SelfSigned {
        cert_pem: made.cert.pem(),
        cert,
        config,
    })
}

/// What a client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system's trusted roots.
    System,
    /// The certificates of a PEM file: a CA, or a self-signed certificate.
    File(PathBuf),
    /// These certificates.
    Certs(Vec<CertificateDer<'static>>),
}

/// A client configuration that verifies servers against `trust`.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = match found.errors.first() {
                    Some(e) => e.to_string(),
                    None => "the store is empty".to_owned(),
                };
                return Err(TlsError::NoSystemRoots(why));
            }
        }
        Trust::File(path) => {
            for cert in load_certs(path)? {
                roots.add(cert)?;
            }
        }
        Trust::Certs(certs) => {
            for cert in certs {
                roots.add(cert.clone())?;
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name to check the server's certificate against: `name`, or else the
/// host part of `addr` (`host:port`, `[v6]:port`, `v4:port`).
pub fn server_name(addr: &str, name: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match name {
        Some(name) => name,
        None => {
            let host = match addr.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() => host,
                _ => addr,
            };
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(host.to_owned())
        .map_err(|_| format!("{host:?} is not a valid server name for TLS"))
}

/// Why a client's TLS handshake failed, in words a user can act on;
/// `name` is the name it checked.
pub fn explain_handshake(error: &io::Error, name: &ServerName<'_>) -> String {
    use rustls::CertificateError as C;
    let name = name.to_str();
    let inner = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
            "the server's certificate is not trusted: it is not signed by a CA we trust \
             (wrong --tls-ca? a self-signed certificate must be given with --tls-ca) [{error}]"
        ),
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => format!(
            "the server's certificate is not valid for the name {name:?} \
             (give the name it is for with --tls-server-name) [{error}]"
        ),
        Some(rustls::Error::InvalidCertificate(other)) => {
            format!("the server's certificate is not valid: {other:?}")
        }
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "the server does not speak TLS (it answered something else): try without --tls [{error}]"
        ),
        _ if matches!(
            error.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ) =>
        {
            format!(
                "the server closed the connection during the TLS handshake: \
                 does it speak TLS? try without --tls [{error}]"
            )
        }
        _ => error.to_string(),
    }
}

/// What a frame length that is really the start of a TLS record says: the
/// first 4 bytes of a TLS record read as a length are its content type
/// (22 for a handshake, 21 for an alert), then the version `03 0x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRecord {
    /// `16 03 0x`: a handshake record, from a client its ClientHello.
    Handshake,
    /// `15 03 0x`: an alert, what a TLS server answers plaintext with.
    Alert,
}

/// The TLS record a frame length (an over-long one, as a plaintext peer
/// reads it) starts, if it looks like one.
pub fn tls_record(len: u64) -> Option<TlsRecord> {
    let [_, _, _, _, kind, major, minor, _] = len.to_be_bytes();
    if major != 3 || minor > 4 {
        return None;
    }
    match kind {
        0x16 => Some(TlsRecord::Handshake),
        0x15 => Some(TlsRecord::Alert),
        _ => None,
    }
}

/// What a plaintext client should tell its user when its connection failed
/// with `error`: a hint if the server seems to speak TLS.
pub fn plaintext_hint(error: &chatpipe::Error) -> Option<&'static str> {
    match error {
        chatpipe::Error::FrameTooLarge { len, .. } if tls_record(*len).is_some() => {
            Some("the server speaks TLS? try --tls, or --tls-ca FILE")
        }
        _ => None,
    }
}

/// A stream that keeps the first bytes read from it: what a peer that
/// failed a TLS handshake sent instead, for the log.
#[derive(Debug)]
pub struct Sniff<S> {
    inner: S,
    first: [u8; 8],
    len: usize,
}

impl<S> Sniff<S> {
    pub fn new(inner: S) -> Self {
        Sniff {
            inner,
            first: [0; 8],
            len: 0,
        }
    }

    /// The first bytes read (up to 8).
    pub fn first(&self) -> &[u8] {
        &self.first[..self.len]
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let keep = n.min(this.first.len() - this.len);
        this.first[this.len..this.len + keep].copy_from_slice(&buf[..keep]);
        this.len += keep;
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths_that_are_tls_records() {
        // A ClientHello's record header, and a TLS 1.2/1.3 alert's.
        assert_eq!(tls_record(0x1603_0100), Some(TlsRecord::Handshake));
        assert_eq!(tls_record(0x1603_03ff), Some(TlsRecord::Handshake));
        assert_eq!(tls_record(0x1503_0300), Some(TlsRecord::Alert));
        assert_eq!(tls_record(0x0000_0010), None);
        assert_eq!(tls_record(0x1604_0100), None);
        assert_eq!(tls_record(0x1703_0300), None);
    }

    #[test]
    fn server_names_from_addresses() {
        let name = |addr, over| server_name(addr, over).unwrap().to_str().into_owned();
        assert_eq!(name("localhost:33333", None), "localhost");
        assert_eq!(name("127.0.0.1:1", None), "127.0.0.1");
        assert_eq!(name("[::1]:1", None), "::1");
        assert_eq!(name("127.0.0.1:1", Some("chat.example")), "chat.example");
        assert!(server_name("bad name:1", None).is_err());
    }

    #[test]
    fn a_self_signed_certificate_makes_both_configurations() {
        let made = self_signed(&LOCALHOST).unwrap();
        assert!(made.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!made.cert_pem.contains("PRIVATE KEY"));
        client_config(&Trust::Certs(vec![made.cert])).unwrap();
    }
}
