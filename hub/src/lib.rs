//! fieldsync-hub: the cloud side of Fieldsync. Agents connect over mutually
//! authenticated TLS MQTT to the hub's own front door, which checks identities,
//! topics and budgets and hands agent traffic to the sync engine in-process
//! through the transport seam. The sync engine applies what agents send
//! (policy-checked, durable, then acknowledged) and feeds each agent its
//! durable downstream queue. The operator API reads fleet data and queues
//! writes down to agents. [`run`] starts it all; the `fieldsync-hub` binary is
//! a thin CLI around this library.

pub mod admission;
pub mod api;
pub mod client;
pub mod config;
pub mod engine;
pub mod events;
pub mod front_door;
pub mod health;
pub mod labels;
pub mod metrics;
pub mod pki;
pub mod store;
pub mod transport;
pub mod ui;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::serve::ListenerExt;
use fieldsync_shared::hlc::DEFAULT_MAX_DRIFT_MS;
use fieldsync_shared::session::SessionConfig;
use fieldsync_shared::tls::{server_config, TlsError};
use fieldsync_shared::{Hlc, Origin};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HubConfig;
use crate::engine::{Engine, EngineError};
use crate::front_door::{Connections, FrontDoorSettings};
use crate::metrics::Metrics;
use crate::store::{HubStore, RedbHubStore, StoreError};

/// The origin stamped on operator writes made through this hub.
pub const HUB_ORIGIN: &str = "hub";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("mqtt TLS (mqtt.ca / mqtt.cert / mqtt.key): {0}")]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("sync engine: {0}")]
    Engine(#[from] EngineError),
    #[error("operator API failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Webhooks(#[from] webhooks::ClientError),
}

/// Listeners the hub serves on; tests bind `127.0.0.1:0`.
pub struct Listeners {
    pub mqtt: TcpListener,
    pub api: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `config`.
    pub async fn bind(config: &HubConfig) -> Result<Self, RunError> {
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Listen { key, addr, source })
        };
        let mqtt = config.mqtt.listen;
        Ok(Self {
            mqtt: listen_with_backlog(mqtt, MQTT_BACKLOG).map_err(|source| RunError::Listen {
                key: "mqtt.listen",
                addr: mqtt,
                source,
            })?,
            api: bind("api.listen", config.api.listen).await?,
        })
    }
}

/// The MQTT listener's backlog: connections wait there while every pending
/// slot is held (a reconnect storm), so it is deeper than the usual 1,024
/// (the kernel caps it at `net.core.somaxconn`).
const MQTT_BACKLOG: u32 = 8192;

fn listen_with_backlog(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Binds the configured addresses and serves until `shutdown` completes.
/// Prints `fieldsync-hub: mqtt listening on ADDR` and
/// `fieldsync-hub: api listening on http://ADDR` to stdout once both accept.
pub async fn run(
    config: HubConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let listeners = Listeners::bind(&config).await?;
    serve(config, listeners, shutdown).await
}

/// Like [`run`], on listeners the caller bound, with the redb store in
/// `hub.data_dir`.
pub async fn serve(
    config: HubConfig,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let store = Arc::new(RedbHubStore::open(&config.data_dir)?);
    serve_with_store(config, listeners, store, shutdown).await
}

/// Like [`serve`], on any [`HubStore`]: the engine, the API and the front
/// door see only the trait.
pub async fn serve_with_store<S: HubStore>(
    config: HubConfig,
    listeners: Listeners,
    store: Arc<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tls = server_config(&config.mqtt.ca, &config.mqtt.cert, &config.mqtt.key)?;
    let hlc = Arc::new(Mutex::new(Hlc::restore(
        store.hlc_last()?,
        DEFAULT_MAX_DRIFT_MS,
    )));
    store.set_history_limits(fieldsync_shared::history::HistoryLimits::new(
        config.policy.clone(),
        config.history_max_bytes,
    ));
    let policy = Arc::new(config.policy.clone());
    let metrics = Arc::new(Metrics::default());
    let connections = Arc::new(Connections::default());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (inlet_tx, inlet) = transport::inlet(transport::INLET_EVENTS, transport::INLET_BYTES);
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();

    let origin = Origin::hub(HUB_ORIGIN).expect("a valid constant origin");
    let health = Arc::new(health::FleetHealth::new(config.stall_after_ms));
    let drop_upstream = std::env::var_os(engine::DROP_UPSTREAM_ENV).is_some();
    if drop_upstream {
        tracing::warn!(
            "{} is set: this hub drops every upstream batch (a test fault)",
            engine::DROP_UPSTREAM_ENV
        );
    }
    let engine = Engine {
        store: store.clone(),
        health: health.clone(),
        drop_upstream,
        policy: policy.clone(),
        hlc: hlc.clone(),
        metrics: metrics.clone(),
        session: SessionConfig {
            rules: policy.rules_fingerprint(),
            ..SessionConfig::default()
        },
        incarnation: store.incarnation()?,
        origin: origin.clone(),
    };
    let engine_task = tasks.spawn(engine.run(inlet, events_rx, cancel.clone()));

    let mqtt_addr = listeners.mqtt.local_addr().map_err(RunError::Serve)?;
    tasks.spawn(front_door::run(
        listeners.mqtt,
        FrontDoorSettings::new(tls, &config.mqtt),
        connections.clone(),
        inlet_tx,
        metrics.clone(),
        cancel.clone(),
        tasks.clone(),
    ));

    let webhooks = webhooks::Dispatcher::new(
        store.clone(),
        config.webhooks.clone(),
        config.event_retention,
        metrics.clone(),
        tasks.clone(),
        cancel.clone(),
    )?;
    webhooks.start()?;

    let history: metrics::HistoryReading = {
        let store = store.clone();
        Arc::new(move || store.history_stats().ok())
    };
    let prometheus = metrics::registry(
        metrics.clone(),
        connections.clone(),
        Some(health.clone()),
        Some(history),
    );
    let api_state = Arc::new(api::ApiState {
        store: store.clone(),
        policy,
        hlc,
        origin,
        connections,
        events: events_tx,
        metrics,
        prometheus,
        token: config.api.token.clone(),
        webhooks,
        webhook_allow_http: config.webhooks.allow_http,
        health,
    });
    let api_addr = listeners.api.local_addr().map_err(RunError::Serve)?;
    tracing::info!(mqtt = %mqtt_addr, api = %api_addr, "hub listening");
    println!("fieldsync-hub: mqtt listening on {mqtt_addr}");
    println!("fieldsync-hub: api listening on http://{api_addr}");

    let api_cancel = cancel.clone();
    // TCP_NODELAY, as on the agent's API (no delayed-ACK stalls).
    let api_listener = listeners.api.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served =
        axum::serve(api_listener, api::router(api_state)).with_graceful_shutdown(async move {
            tokio::select! {
                _ = shutdown => {}
                _ = api_cancel.cancelled() => {}
            }
        });
    let result = tokio::select! {
        r = served => r.map_err(RunError::Serve),
        r = engine_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Engine(e)),
            Err(join) => Err(RunError::Engine(EngineError::Join(join))),
        },
    };
    cancel.cancel();
    tasks.close();
    tasks.wait().await;
    result
}
