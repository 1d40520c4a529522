//! fieldsync-agent: the edge side of Fieldsync. It keeps every record in a local
//! redb store, queues the policy-permitted part of each write in a transactional
//! outbox, and serves a local HTTP API. [`run`] starts it; the `fieldsync-agent`
//! binary is a thin CLI around this library.

pub mod api;
pub mod cli;
pub mod config;
pub mod link;
pub mod metrics;
pub mod store;
pub mod writer;

use std::future::Future;
use std::sync::Arc;

use axum::serve::ListenerExt;
use fieldsync_shared::history::HistoryLimits;
use fieldsync_shared::session::SessionConfig;
use fieldsync_shared::Origin;
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::link::{LinkSetup, LinkStatus};
use crate::store::{Store, StoreError};
use crate::writer::{CorrectedClock, Writer, WriterSetup};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} (api.listen): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("local API failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Link(#[from] link::LinkError),
}

/// Opens the store, binds the local API and serves until `shutdown` completes.
/// Prints one line, `fieldsync-agent: api listening on http://ADDR`, to stdout
/// once the API accepts connections.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let listener = TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.api.listen,
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Like [`run`], on a listener the caller bound (tests bind `127.0.0.1:0`).
pub async fn serve(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tls = config.hub.as_ref().map(link::load_tls).transpose()?;
    let store = Store::open(&config.data_dir, &config.id)?.with_history(HistoryLimits::new(
        config.policy.clone(),
        config.history_max_bytes,
    ));
    let policy = Arc::new(config.policy.clone());
    let session = SessionConfig {
        rules: policy.rules_fingerprint(),
        ..SessionConfig::default()
    };
    let clock = CorrectedClock::new(writer::system_clock(), store.clock_offset()?);
    let (writer, committer) = Writer::start(WriterSetup {
        store: store.clone(),
        policy: policy.clone(),
        origin: Origin::agent(&config.id),
        clock: clock.clone(),
        max_drift_ms: session.max_drift_ms,
    })?;
    let status = Arc::new(LinkStatus::default());
    let cancel = CancellationToken::new();
    let link_task = match (&config.hub, tls) {
        (Some(hub), Some(tls)) => {
            let setup = LinkSetup {
                hub: hub.clone(),
                agent: config.id.clone(),
                store: store.clone(),
                writer: writer.clone(),
                policy: policy.clone(),
                clock: clock.clone(),
                status: status.clone(),
                session,
            };
            tracing::info!(host = %hub.host, port = hub.port, "syncing with the hub");
            Some(tokio::spawn(link::supervise(setup, tls, cancel.clone())))
        }
        _ => None,
    };
    let state = api::ApiState {
        agent_id: config.id.clone(),
        incarnation: store.incarnation()?,
        store,
        writer,
        link: status,
        clock,
        hub_configured: config.hub.is_some(),
        policy,
    };
    let app = api::router(state, config.api.max_body_bytes);
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    tracing::info!(%addr, agent = %config.id, "local API listening");
    if config.hub.is_none() {
        tracing::warn!("no [hub] section: running local-only, nothing will be synced");
    }
    println!("fieldsync-agent: api listening on http://{addr}");
    // TCP_NODELAY: a response split over two writes would otherwise wait for
    // the client's delayed ACK (40-200 ms).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(RunError::Serve);
    cancel.cancel();
    if let Some(task) = link_task {
        let _ = task.await;
    }
    // The router and the link (and with them every Writer clone) are gone: the
    // committer drains what is queued and stops.
    let _ = tokio::task::spawn_blocking(move || committer.join()).await;
    served
}
