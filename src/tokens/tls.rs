//! TLS to the token database, with the rustls that reqwest uses. The URL
//! asks for it as libpq's do (`sslmode=require`, `verify-ca`, `verify-full`;
//! `sslrootcert=FILE`), and the server's certificate is always verified:
//! chain and host name, against `sslrootcert` or else the built-in roots. A
//! database that answers without a valid certificate gets no token lookups.

use std::{
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use tokio_rustls::rustls::{self, pki_types::ServerName};

/// What the URL asked for, read before tokio-postgres sees it (it knows
/// neither `verify-full` nor `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTls {
    /// The URL as tokio-postgres takes it.
    pub url: String,
    /// TLS wanted (any sslmode from `require` up).
    pub tls: bool,
    pub root_cert: Option<String>,
}

/// Splits the TLS parameters off a `postgresql://` URL. `prefer`, `allow`
/// and `disable` (and none) mean plain TCP: TLS is used when asked for, and
/// then never without a verified certificate.
pub fn read_url(url: &str) -> Result<UrlTls, String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok(UrlTls {
            url: url.to_owned(),
            tls: false,
            root_cert: None,
        });
    };
    let mut kept = Vec::new();
    let (mut mode, mut root_cert, mut system_roots) = (None, None, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        // tokio-postgres decodes keys too: `ssl%6Dode` must not slip past.
        match percent_decode(key)?.as_str() {
            "sslmode" => {
                mode = Some(match percent_decode(value)?.as_str() {
                    "disable" | "allow" | "prefer" => false,
                    "require" | "verify-ca" | "verify-full" => true,
                    other => {
                        return Err(format!(
                            "sslmode `{other}` is not disable, prefer, require or verify-full"
                        ))
                    }
                })
            }
            // libpq's `system`: the trusted roots, and TLS then required.
            "sslrootcert" if value == "system" => system_roots = true,
            "sslrootcert" if !value.is_empty() => root_cert = Some(percent_decode(value)?),
            "sslrootcert" => return Err("sslrootcert needs a file".into()),
            "password" | "passfile" => return Err("no password in the URL: put it in tokens.password_file".into()),
            k @ ("sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "options") => {
                return Err(format!("{k} is not supported"))
            }
            _ => kept.push(pair),
        }
    }
    // A CA named (or libpq's `system`) without a mode asks for TLS.
    let tls = mode.unwrap_or(root_cert.is_some() || system_roots);
    kept.push(if tls { "sslmode=require" } else { "sslmode=disable" });
    Ok(UrlTls {
        url: format!("{base}?{}", kept.join("&")),
        tls,
        root_cert,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    crate::address::percent_decode(s, true)
}

/// The verifying client configuration: the CAs of `root_cert` (PEM), or the
/// built-in roots.
pub fn client_config(root_cert: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<_, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("sslrootcert {}: no certificate in it", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// tokio-postgres's TLS hook on rustls.
#[derive(Clone)]
pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            config: self.0.clone(),
            name: ServerName::try_from(domain.to_owned())?,
        })
    }
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await?;
            Ok(Stream(tls))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    /// SCRAM without channel binding: the certificate check above is what
    /// ties the session to the server.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_read_off_the_url() {
        let plain = read_url("postgresql://imip@db/imip").unwrap();
        assert!(!plain.tls && plain.url == "postgresql://imip@db/imip");
        let t = read_url("postgresql://imip@db/imip?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5")
            .unwrap();
        assert!(t.tls);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.url, "postgresql://imip@db/imip?connect_timeout=5&sslmode=require");
        assert!(!read_url("postgresql://db/x?sslmode=prefer").unwrap().tls);
        assert!(read_url("postgresql://db/x?sslmode=bogus").is_err());
        assert!(read_url("postgresql://db/x?sslcert=/c.pem").is_err());
        assert!(read_url("postgresql://db/x?sslrootcert=%zz").is_err());
        // Encoded keys are keys all the same.
        let sneaky = read_url("postgresql://db/x?ssl%6Dode=require").unwrap();
        assert!(sneaky.tls && sneaky.url == "postgresql://db/x?sslmode=require");
        assert!(read_url("postgresql://db/x?sslmode=disable&pass%77ord=x").is_err());
        assert!(read_url("postgresql://db/x?password=x").is_err());
        let system = read_url("postgresql://db/x?sslrootcert=system").unwrap();
        assert!(system.tls && system.root_cert.is_none());
    }
}
