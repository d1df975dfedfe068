//! HTTPS for the REST API (`restapi.certfile`, `keyfile`, `keyfile_password`, `cafile`,
//! `verify_client`, `ciphers`) and for calls to members' APIs (`ctl.certfile`, `keyfile`,
//! `keyfile_password`, `cacert`, `insecure`, as Patroni's `request.py` uses them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use pgvigil_config::{CtlConfig, RestApiConfig, VerifyClient};
use pgvigil_tls::{ClientAuth, ClientSettings, ConfFile, Identity, ServerCheck, ServerSettings, TlsError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A TLS handshake that has not finished by then is dropped (it holds no request yet).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often at most the certificate files are looked at for changes.
const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The REST API's TLS set-up, following its files: when `certfile`, `keyfile` or `cafile`
/// change on disk (a renewed certificate), new connections get the new ones, so a rotation
/// needs neither a restart nor a reload. Files that cannot be used after a change are logged
/// and the previous set-up stays.
pub struct ServerTls {
    api: RestApiConfig,
    state: std::sync::Mutex<ServerTlsState>,
}

struct ServerTlsState {
    config: Arc<rustls::ServerConfig>,
    stamps: Vec<Option<(std::time::SystemTime, u64)>>,
    checked: std::time::Instant,
}

impl ServerTls {
    /// `None` when `restapi.certfile` is not set (plain HTTP).
    pub fn new(api: &RestApiConfig) -> Result<Option<Arc<ServerTls>>, TlsError> {
        let Some(config) = server_config(api)? else {
            return Ok(None);
        };
        Ok(Some(Arc::new(ServerTls {
            state: std::sync::Mutex::new(ServerTlsState {
                config,
                stamps: file_stamps(api),
                checked: std::time::Instant::now(),
            }),
            api: api.clone(),
        })))
    }

    /// The configuration for a new connection (the files are looked at once a second).
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= FILE_CHECK_INTERVAL {
            self.reload_if_changed(&mut state);
        }
        state.config.clone()
    }

    /// Looks at the files now; returns whether a new set-up is in use.
    pub fn refresh(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.reload_if_changed(&mut state)
    }

    fn reload_if_changed(&self, state: &mut ServerTlsState) -> bool {
        state.checked = std::time::Instant::now();
        let stamps = file_stamps(&self.api);
        if stamps == state.stamps {
            return false;
        }
        state.stamps = stamps;
        match server_config(&self.api) {
            Ok(Some(config)) => {
                tracing::info!("the REST API's certificate files changed: serving the new ones");
                state.config = config;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(
                    "the REST API's certificate files changed but cannot be used, keeping the previous ones: {e}"
                );
                false
            }
        }
    }
}

/// Modification time and size of `certfile`, `keyfile`, `cafile`.
fn file_stamps(api: &RestApiConfig) -> Vec<Option<(std::time::SystemTime, u64)>> {
    [&api.certfile, &api.keyfile, &api.cafile]
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(p.as_ref()?).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// The server side of `restapi`, or `None` when `certfile` is not set (plain HTTP).
pub fn server_config(api: &RestApiConfig) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    let Some(certfile) = &api.certfile else {
        return Ok(None);
    };
    let settings = ServerSettings {
        identity: Identity {
            cert: ConfFile::new("restapi.certfile", certfile),
            key: api
                .keyfile
                .as_deref()
                .map(|k| ConfFile::new("restapi.keyfile", k)),
            password: api
                .keyfile_password
                .as_deref()
                .map(|p| ("restapi.keyfile_password", p)),
        },
        client_ca: api.cafile.as_deref().map(|c| ConfFile::new("restapi.cafile", c)),
        client_auth: match api.verify_client {
            VerifyClient::None => ClientAuth::None,
            VerifyClient::Optional => ClientAuth::Optional,
            VerifyClient::Required => ClientAuth::Required,
        },
        ciphers: api.ciphers.as_deref().map(|c| ("restapi.ciphers", c)),
    };
    pgvigil_tls::server_config(&settings).map(|c| Some(Arc::new(c)))
}

/// The client side of `ctl`, as Patroni applies it to every call to a member's API: the CA from
/// `ctl.cacert` (else `restapi.cafile`, else the system bundle); with `ctl.certfile` the client
/// certificate is sent and `insecure` only skips the host name check; without it `insecure`
/// skips verification altogether. `insecure` is `ctl.insecure` or pgvigilctl's `-k`.
pub fn client_config(ctl: &CtlConfig, insecure: bool) -> Result<rustls::ClientConfig, TlsError> {
    let identity = ctl.certfile.as_deref().map(|cert| Identity {
        cert: ConfFile::new("ctl.certfile", cert),
        key: ctl.keyfile.as_deref().map(|k| ConfFile::new("ctl.keyfile", k)),
        password: ctl
            .keyfile_password
            .as_deref()
            .map(|p| ("ctl.keyfile_password", p)),
    });
    let check = match (identity.is_some(), insecure) {
        (_, false) => ServerCheck::ChainAndName,
        (true, true) => ServerCheck::Chain,
        (false, true) => ServerCheck::Nothing,
    };
    pgvigil_tls::client_config(&ClientSettings {
        ca: ctl.cacert.as_deref().map(|c| ConfFile::new("ctl.cacert", c)),
        crls: Vec::new(),
        identity,
        check: Some(check),
    })
}

/// An HTTP client using `tls` for `https://` URLs, never a proxy (cluster traffic goes straight
/// to the members).
pub fn http_client(tls: rustls::ClientConfig, connect_timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(connect_timeout)
        .use_preconfigured_tls(tls)
        .build()
        .unwrap_or_else(|e| {
            // Only a TLS back-end mismatch fails here: the workspace builds reqwest with rustls.
            panic!("cannot build the HTTP client: {e}")
        })
}

/// Who is calling: the address, and whether a verified client certificate was presented.
#[derive(Clone, Copy, Debug)]
pub struct RemotePeer {
    pub addr: SocketAddr,
    pub client_cert: bool,
}

impl Connected<IncomingStream<'_, TcpListener>> for RemotePeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        RemotePeer {
            addr: *stream.remote_addr(),
            client_cert: false,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for RemotePeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        *stream.remote_addr()
    }
}

/// A TCP listener that hands out connections once their TLS handshake is done. Handshakes run
/// in their own tasks, so a slow or silent client cannot hold up the others.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, RemotePeer)>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("REST API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let acceptor = TlsAcceptor::from(tls.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let client_cert =
                                tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                            let _ = tx.send((tls, RemotePeer { addr, client_cert })).await;
                        }
                        Ok(Err(e)) => tracing::debug!(peer = %addr, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            local,
            ready,
            accept_task,
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = RemotePeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ends only when dropped with us.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(RemotePeer {
            addr: self.local,
            client_cert: false,
        })
    }
}
