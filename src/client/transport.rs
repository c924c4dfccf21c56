//! One connection attempt: the URL and token, TCP, TLS for wss:// (rustls with the ring
//! provider, Mozilla's roots plus an optional extra CA), then the WebSocket handshake
//! (tokio-tungstenite's `client_async` over that stream).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::WebSocketStream;

use super::ConfigError;

/// The stream a client's WebSocket runs over.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub(crate) type Ws = WebSocketStream<Stream>;

/// Where and how to connect, checked once when the client is created.
pub(crate) struct Target {
    /// The URL requested, token included.
    request_url: String,
    /// The URL as given, for messages (never the token).
    pub(crate) shown_url: String,
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// Why an attempt failed; `fatal` when retrying cannot help (the server refused the upgrade
/// with a 4xx status other than 408 and 429: a bad token, a forbidden origin, a wrong path).
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) fatal: bool,
}

impl Failure {
    pub(crate) fn retry(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            fatal: false,
        }
    }
}

impl Target {
    pub(crate) fn new(
        url: &str,
        token: Option<&str>,
        extra_root_pem: Option<&[u8]>,
    ) -> Result<Target, ConfigError> {
        let invalid = |reason: &str| ConfigError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        // A fragment is never sent; drop it before parsing.
        let without_fragment = url.split('#').next().unwrap_or(url);
        let uri: Uri = without_fragment.parse().map_err(
            |e: tokio_tungstenite::tungstenite::http::uri::InvalidUri| invalid(&e.to_string()),
        )?;
        let secure = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("ws") => false,
            Some(s) if s.eq_ignore_ascii_case("wss") => true,
            _ => return Err(invalid("the scheme must be ws:// or wss://")),
        };
        let host = uri
            .host()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| invalid("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let authority = uri.authority().map_or("", |a| a.as_str());
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let path_and_query = if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        };
        let scheme = if secure { "wss" } else { "ws" };
        let mut request_url = format!("{scheme}://{authority}{path_and_query}");
        if let Some(token) = token {
            request_url.push(if uri.query().is_some() { '&' } else { '?' });
            request_url.push_str("token=");
            request_url.extend(form_urlencoded::byte_serialize(token.as_bytes()));
        }
        // Check once that tungstenite accepts the request, so attempts cannot fail on it.
        request_url
            .as_str()
            .into_client_request()
            .map_err(|e| invalid(&e.to_string()))?;
        let tls = if secure {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| invalid("the host is not a valid TLS server name"))?;
            Some((tls_connector(extra_root_pem)?, name))
        } else {
            None
        };
        Ok(Target {
            request_url,
            shown_url: without_fragment.to_owned(),
            host,
            port,
            tls,
        })
    }

    /// TCP, TLS when wss://, then the upgrade. The caller bounds it with a timeout.
    pub(crate) async fn connect(&self) -> Result<Ws, Failure> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| Failure::retry(format!("cannot connect to {}: {e}", self.shown_url)))?;
        // Small JSON messages: send each at once.
        let _ = tcp.set_nodelay(true);
        let stream = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| Failure::retry(format!("TLS with {}: {e}", self.shown_url)))?;
                Stream::Tls(Box::new(tls))
            }
        };
        let request = self
            .request_url
            .as_str()
            .into_client_request()
            .map_err(|e| Failure::retry(e.to_string()))?;
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, _response)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status();
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .map(|text| text.trim().chars().take(200).collect::<String>())
                    .filter(|text| !text.is_empty())
                    .map(|text| format!(": {text}"))
                    .unwrap_or_default();
                Err(Failure {
                    reason: format!(
                        "{} refused the upgrade with HTTP {status}{body}",
                        self.shown_url
                    ),
                    fatal: status.is_client_error() && status != 408 && status != 429,
                })
            }
            Err(e) => Err(Failure::retry(format!(
                "WebSocket handshake with {}: {e}",
                self.shown_url
            ))),
        }
    }
}

fn tls_connector(extra_root_pem: Option<&[u8]>) -> Result<TlsConnector, ConfigError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_root_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| ConfigError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ConfigError::Ca(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ConfigError::Ca("no certificate in the PEM".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, token: Option<&str>) -> Result<Target, ConfigError> {
        Target::new(url, token, None)
    }

    #[test]
    fn urls_and_tokens() {
        let t = target("ws://127.0.0.1:9000", None).unwrap();
        assert_eq!(t.request_url, "ws://127.0.0.1:9000/");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 9000));
        assert!(t.tls.is_none());

        let t = target("ws://example.com/rt?app=1", Some("a.b+c/d=")).unwrap();
        assert_eq!(
            t.request_url,
            "ws://example.com/rt?app=1&token=a.b%2Bc%2Fd%3D"
        );
        assert_eq!(t.port, 80);
        assert_eq!(
            t.shown_url, "ws://example.com/rt?app=1",
            "no token in messages"
        );

        let t = target("wss://example.com", Some("tok")).unwrap();
        assert_eq!(t.request_url, "wss://example.com/?token=tok");
        assert_eq!(t.port, 443);
        assert!(t.tls.is_some());

        let t = target("ws://[::1]:8080/#frag", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 8080));
        assert_eq!(t.request_url, "ws://[::1]:8080/");
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["http://example.com/", "example.com", "ws://", "ws:// x", ""] {
            assert!(
                matches!(target(url, None), Err(ConfigError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn a_bad_ca_pem_is_refused() {
        assert!(matches!(
            Target::new("wss://example.com/", None, Some(b"not a pem")),
            Err(ConfigError::Ca(_))
        ));
    }
}
