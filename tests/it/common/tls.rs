//! TLS in front of the real servers: a private CA made in memory (rcgen),
//! and a proxy that terminates TLS with its server certificate and
//! forwards the plaintext to PostgreSQL or RabbitMQ, counting handshakes,
//! so a test can show that a client went through TLS and trusted the CA
//! (docs/deployment.md, "TLS").

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{Datelike, NaiveDate, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A private CA and a server certificate it signed for `localhost` and
/// 127.0.0.1 (ECDSA P-256, valid from yesterday for two days).
pub struct Pki {
    /// The CA certificate as PEM, for `SSL_CERT_FILE`.
    pub ca: PathBuf,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
}

impl Pki {
    /// Makes the CA and the server certificate, and writes the CA's
    /// certificate to `dir/ca.crt`.
    pub fn make(dir: &Path) -> Pki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "worker-iot-core test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut ca_params);
        let ca_key = KeyPair::generate().expect("CA key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        // `new` reads 127.0.0.1 as an IP address, `localhost` as a DNS name.
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server certificate parameters");
        params.distinguished_name.push(DnType::CommonName, "localhost");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params);
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");

        let ca = dir.join("ca.crt");
        std::fs::write(&ca, ca_cert.pem()).expect("write the CA certificate");
        Pki {
            ca,
            server_cert: cert.der().clone(),
            server_key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(self.server_key.clone_key());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .expect("server TLS config");
        Arc::new(config)
    }
}

/// From yesterday (a clock a little behind still accepts it) to two days
/// from today.
fn set_validity(params: &mut CertificateParams) {
    let today = Utc::now().date_naive();
    let day = |date: NaiveDate| {
        let (month, day) = (date.month() as u8, date.day() as u8);
        rcgen::date_time_ymd(date.year(), month, day)
    };
    params.not_before = day(today - chrono::Days::new(1));
    params.not_after = day(today + chrono::Days::new(2));
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// Terminates TLS on a local port and forwards the plaintext to `upstream`.
/// For PostgreSQL it first answers the client's SSLRequest with `S` (and
/// refuses a client that does not ask for TLS); AMQP over TLS starts with
/// the handshake. Stops listening when dropped.
pub struct TlsProxy {
    pub port: u16,
    handshakes: Arc<AtomicUsize>,
    stop: CancellationToken,
}

/// What the proxy speaks to its client before the TLS handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Postgres,
    Amqp,
}

impl TlsProxy {
    /// Listens on a free loopback port, with `pki`'s server certificate.
    pub async fn start(pki: &Pki, upstream: SocketAddr, protocol: Upstream) -> TlsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the TLS proxy");
        let port = listener.local_addr().expect("address").port();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let acceptor = TlsAcceptor::from(pki.server_config());
        let (counted, stopped) = (handshakes.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    () = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                // Every connection ends with its client (or the runtime).
                tokio::spawn(async move {
                    if let Err(e) = relay(client, &acceptor, upstream, protocol, &counted).await {
                        eprintln!("TLS proxy to {upstream}: {e}");
                    }
                });
            }
        });
        TlsProxy { port, handshakes, stop }
    }

    /// How many TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One client: the handshake, then the plaintext both ways until both
/// sides have closed (tokio-rustls sends `close_notify` when upstream ends).
async fn relay(
    mut client: TcpStream,
    acceptor: &TlsAcceptor,
    upstream: SocketAddr,
    protocol: Upstream,
    handshakes: &AtomicUsize,
) -> io::Result<()> {
    if protocol == Upstream::Postgres {
        let mut request = [0u8; 8];
        client.read_exact(&mut request).await?;
        if request != SSL_REQUEST {
            return Err(io::Error::other("the client did not ask for TLS"));
        }
        client.write_all(b"S").await?;
    }
    let mut tls = acceptor.accept(client).await?;
    handshakes.fetch_add(1, Ordering::SeqCst);
    let mut server = TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut server).await?;
    Ok(())
}
