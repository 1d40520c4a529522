//! Webhooks: the hub posts events from its event log ([`crate::events`]) to
//! operator endpoints, signed per the Standard Webhooks spec (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! id.timestamp.body>`, secrets `whsec_<base64>`).
//!
//! The event log is the outbox: an event exists once the change that caused
//! it committed, and each endpoint keeps a cursor into the log. One worker
//! per endpoint delivers its events one at a time, in log order (hence in
//! order per record key), and moves the cursor only past an event that was
//! delivered or given up on. A cursor write can be lost in a crash (it is
//! not fsynced on its own); the event is then delivered again, with the same
//! `webhook-id`: delivery is at least once, exactly once for a receiver that
//! deduplicates by id.
//!
//! Retries: attempt `n` (from 1) that fails waits `min(retry_max,
//! retry_initial × 2^(n-1))`, scaled by a random factor in [0.8, 1.2], before
//! attempt `n + 1`; after `max_attempts` failures the event is given up
//! (counted, logged with its id, listed in the deliveries, and re-sendable by
//! a replay) and the endpoint goes on. A 410 answer disables the endpoint.
//!
//! URLs: `https://` anywhere, `http://` to loopback only unless
//! `[webhooks] allow_http`; never to an address that is unspecified,
//! link-local (cloud metadata services live there), multicast or broadcast.
//! Names are resolved at every connection by a resolver that drops such
//! addresses, so a name that later resolves to one (DNS rebinding) is
//! refused too; redirects are not followed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use fieldsync_shared::hlc::system_now_ms;
use fieldsync_shared::tls::load_certs;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WebhookSettings;
use crate::events::{Event, EventFilter};
use crate::metrics::Metrics;
use crate::store::{HubStore, StoreError};

/// Events read from the log per store read.
const READ_AHEAD: usize = 256;
/// Longest error text kept for an attempt.
const MAX_ERROR_CHARS: usize = 200;
/// How often link events waiting for a durable commit are made durable, and
/// (every `TRIM_EVERY` of these) the log is trimmed.
const SYNC_EVERY: Duration = Duration::from_secs(1);
const TRIM_EVERY: u32 = 60;
/// Successful deliveries recorded together (a store write each would
/// bound the rate): at most this many, or this long after the first.
const SAVE_EVERY: usize = 64;
const SAVE_WITHIN: Duration = Duration::from_millis(100);
/// Most events dropped from the log per trim transaction.
const TRIM_BATCH: usize = 10_000;

/// A webhook endpoint and where its delivery stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub url: String,
    pub filter: EventFilter,
    /// `whsec_` and the base64 of the signing key.
    pub secret: String,
    pub created_ms: u64,
    /// Bumped by a replay: progress written for an older epoch is stale.
    pub epoch: u64,
    pub progress: Progress,
}

/// An endpoint's delivery state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Every event up to this seq was delivered, given up, or not wanted.
    pub cursor: u64,
    /// Failed attempts at the event after the cursor.
    pub failures: u32,
    /// No attempt before this wall time (ms).
    pub next_attempt_ms: u64,
    /// Why the endpoint is disabled, if it is.
    pub disabled: Option<String>,
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// 2xx: done.
    Delivered,
    /// Failed; it will be tried again.
    Retrying,
    /// Failed for the last allowed time; the endpoint moved on.
    GaveUp,
    /// 410 Gone: the endpoint is disabled.
    Disabled,
}

/// One delivery attempt, as `GET /v1/webhooks/{id}/deliveries` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub event_id: String,
    pub event_type: String,
    pub seq: u64,
    pub at_ms: u64,
    /// 1 for the first try of this event.
    pub attempt: u32,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
    pub outcome: Outcome,
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Invalid(String),
    #[error("the URL has a user name or password; put credentials in the receiver's own check of the signature instead")]
    Credentials,
    #[error("scheme {0:?} is not allowed: use https (or http to a loopback address)")]
    Scheme(String),
    #[error("http:// is allowed only to a loopback address (set [webhooks] allow_http to allow it elsewhere)")]
    PlainHttp,
    #[error("address {0} is not allowed (unspecified, link-local, multicast or broadcast)")]
    Forbidden(IpAddr),
}

/// Whether the hub may post to `ip`: not unspecified, link-local (where
/// cloud metadata services answer), multicast or broadcast, in any of their
/// IPv4, IPv6 and IPv4-mapped forms.
pub fn address_allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4_allowed(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_allowed(v4);
            }
            let first = v6.segments()[0];
            let link_local = first & 0xffc0 == 0xfe80;
            // AWS's IPv6 metadata endpoint sits in unique-local space.
            let aws_metadata = v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
            !(v6.is_unspecified() || v6.is_multicast() || link_local || aws_metadata)
        }
    }
}

fn v4_allowed(ip: Ipv4Addr) -> bool {
    // Alibaba Cloud's metadata service is not link-local.
    let alibaba_metadata = ip == Ipv4Addr::new(100, 100, 100, 200);
    !(ip.is_unspecified()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || alibaba_metadata)
}

/// Checks a webhook URL before it is stored.
pub fn check_url(url: &str, allow_http: bool) -> Result<reqwest::Url, UrlError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    let host = parsed
        .host()
        .ok_or_else(|| UrlError::Invalid("the URL has no host".into()))?;
    let ip = match host {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = ip {
        if !address_allowed(ip) {
            return Err(UrlError::Forbidden(ip));
        }
    }
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let loopback = match host {
                url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
                _ => ip.is_some_and(|ip| ip.is_loopback()),
            };
            if !loopback && !allow_http {
                return Err(UrlError::PlainHttp);
            }
        }
        other => return Err(UrlError::Scheme(other.to_string())),
    }
    Ok(parsed)
}

/// A new endpoint secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let key: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// A new endpoint id.
pub fn new_id() -> String {
    let n: u64 = rand::random();
    format!("wh_{n:016x}")
}

/// The `webhook-signature` value for one message: `v1,` and the base64 of
/// HMAC-SHA256 over `id.timestamp.body` keyed by the secret's decoded bytes.
/// `None` for a secret that is not `whsec_<base64>`.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Option<String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_")?)
        .ok()?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    Some(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
    ))
}

/// The wait after the `failures`-th failed attempt (from 1), before jitter.
pub fn backoff(settings: &WebhookSettings, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    settings
        .retry_initial
        .saturating_mul(factor)
        .min(settings.retry_max)
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..=1.2))
}

/// Resolves names like the system does, minus the addresses the hub may not
/// post to.
struct GuardedResolver;

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| address_allowed(a.ip()))
                .collect();
            if allowed.is_empty() {
                let why: Box<dyn std::error::Error + Send + Sync> = if found.is_empty() {
                    format!("{host} does not resolve").into()
                } else {
                    format!("{host} resolves only to addresses webhooks may not reach").into()
                };
                return Err(why);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Why the webhook client cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("webhooks.ca {path}: {message}")]
    Ca { path: String, message: String },
    #[error("webhook HTTP client: {0}")]
    Build(String),
}

/// The HTTP client: TLS by rustls with ring, the system's roots plus
/// `[webhooks] ca`, the guarded resolver, no redirects, the attempt timeout.
pub fn client(settings: &WebhookSettings) -> Result<reqwest::Client, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &settings.ca {
        let ca = |message: String| ClientError::Ca {
            path: path.display().to_string(),
            message,
        };
        for cert in load_certs(path).map_err(|e| ca(e.to_string()))? {
            roots.add(cert).map_err(|e| ca(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .dns_resolver(Arc::new(GuardedResolver))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .user_agent(concat!("fieldsync-hub/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| ClientError::Build(e.to_string()))
}

/// One endpoint's worker, as the dispatcher holds it.
struct Worker {
    poke: Arc<Notify>,
    cancel: CancellationToken,
}

/// Runs one delivery worker per endpoint and keeps the event log tidy.
pub struct Dispatcher<S: HubStore> {
    store: Arc<S>,
    settings: WebhookSettings,
    retention: Duration,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
    workers: Mutex<HashMap<String, Worker>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl<S: HubStore> Dispatcher<S> {
    pub fn new(
        store: Arc<S>,
        settings: WebhookSettings,
        retention: Duration,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, ClientError> {
        let client = client(&settings)?;
        Ok(Arc::new(Self {
            store,
            settings,
            retention,
            client,
            metrics,
            workers: Mutex::new(HashMap::new()),
            tasks,
            cancel,
        }))
    }

    /// Starts a worker for every stored endpoint, and the log's upkeep.
    pub fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        for endpoint in self.store.webhooks()? {
            self.changed(&endpoint.id);
        }
        let this = self.clone();
        self.tasks.spawn(async move { this.upkeep().await });
        Ok(())
    }

    /// An endpoint was created or rewound: (re)read it.
    pub fn changed(self: &Arc<Self>, id: &str) {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = workers.get(id) {
            w.poke.notify_one();
            return;
        }
        let worker = Worker {
            poke: Arc::new(Notify::new()),
            cancel: self.cancel.child_token(),
        };
        let (poke, cancel) = (worker.poke.clone(), worker.cancel.clone());
        workers.insert(id.to_owned(), worker);
        let this = self.clone();
        let id = id.to_owned();
        self.tasks.spawn(async move {
            if let Err(e) = this.deliver_all(&id, &poke, &cancel).await {
                tracing::error!(endpoint = %id, error = %e, "webhook worker stopped");
            }
            let mut workers = this.workers.lock().unwrap_or_else(|p| p.into_inner());
            workers.remove(&id);
        });
    }

    /// An endpoint was deleted.
    pub fn removed(&self, id: &str) {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = workers.remove(id) {
            w.cancel.cancel();
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Backend(Box::new(e)))?
    }

    /// Makes link events durable within about a second, and drops events
    /// past the retention that no enabled endpoint still needs.
    async fn upkeep(&self) {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.blocking(|s| s.sync_events()).await {
                tracing::warn!(error = %e, "cannot make events durable");
            }
            ticks += 1;
            if !ticks.is_multiple_of(TRIM_EVERY) {
                continue;
            }
            let retention = self.retention;
            let trimmed = self
                .blocking(move |s| {
                    let needed = s
                        .webhooks()?
                        .iter()
                        .filter(|e| e.progress.disabled.is_none())
                        .map(|e| e.progress.cursor)
                        .min()
                        .unwrap_or(u64::MAX);
                    let before = system_now_ms()
                        .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
                    s.trim_events(needed, before, TRIM_BATCH)
                })
                .await;
            match trimmed {
                Ok(0) => {}
                Ok(n) => {
                    Metrics::add(&self.metrics.events_trimmed, n as u64);
                    tracing::debug!(events = n, "trimmed the event log");
                }
                Err(e) => tracing::warn!(error = %e, "cannot trim the event log"),
            }
        }
    }

    /// Delivers endpoint `id`'s events until it is deleted or the hub stops.
    async fn deliver_all(
        &self,
        id: &str,
        poke: &Notify,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let mut head = self.store.watch_events();
        'reload: loop {
            let key = id.to_owned();
            let Some(mut endpoint) = self.blocking(move |s| s.webhook(&key)).await? else {
                return Ok(());
            };
            let mut buffer: std::collections::VecDeque<(u64, Event)> = Default::default();
            // Delivered but not yet recorded (the endpoint's progress moves
            // with them).
            let mut unsaved: Vec<Attempt> = Vec::new();
            let mut unsaved_since = std::time::Instant::now();
            loop {
                if endpoint.progress.disabled.is_some() {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = poke.notified() => continue 'reload,
                    }
                }
                let wait = endpoint
                    .progress
                    .next_attempt_ms
                    .saturating_sub(system_now_ms());
                if wait > 0 {
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = poke.notified() => continue 'reload,
                        _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                    }
                }
                // The next wanted event; events nobody wants move the cursor.
                let mut skipped_to = None;
                let next = loop {
                    if buffer.is_empty() {
                        // Seen before the read: a head that moves after it
                        // wakes the wait below.
                        head.borrow_and_update();
                        let from = skipped_to.unwrap_or(endpoint.progress.cursor);
                        let read = self
                            .blocking(move |s| s.events_after(from, READ_AHEAD))
                            .await?;
                        if read.is_empty() {
                            break None;
                        }
                        buffer.extend(read);
                    }
                    let Some((seq, event)) = buffer.pop_front() else {
                        break None;
                    };
                    if endpoint.filter.matches(&event) {
                        break Some((seq, event));
                    }
                    skipped_to = Some(seq);
                };
                let Some((seq, event)) = next else {
                    if let Some(to) = skipped_to {
                        endpoint.progress.cursor = to;
                    }
                    if (skipped_to.is_some() || !unsaved.is_empty())
                        && !self.save(&endpoint, std::mem::take(&mut unsaved)).await?
                    {
                        continue 'reload;
                    }
                    // Nothing to send: wait for the log to grow (past what
                    // the last read saw).
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = poke.notified() => continue 'reload,
                        changed = head.changed() => if changed.is_err() { return Ok(()) },
                    }
                    continue;
                };
                let attempt = tokio::select! {
                    _ = cancel.cancelled() => {
                        // What was delivered is recorded on the way out.
                        let _ = self.save(&endpoint, unsaved).await;
                        return Ok(());
                    }
                    a = self.attempt(&endpoint, seq, &event) => a,
                };
                let p = &mut endpoint.progress;
                match attempt.outcome {
                    Outcome::Delivered | Outcome::GaveUp => {
                        p.cursor = seq;
                        p.failures = 0;
                        p.next_attempt_ms = 0;
                    }
                    // Everything before `seq` since the cursor was unwanted.
                    Outcome::Disabled => {
                        p.cursor = seq - 1;
                        p.disabled = Some(format!(
                            "the endpoint answered 410 Gone at {}",
                            crate::events::format_ms(attempt.at_ms)
                        ));
                    }
                    Outcome::Retrying => {
                        p.cursor = seq - 1;
                        p.failures = attempt.attempt;
                        let wait = jittered(backoff(&self.settings, attempt.attempt));
                        p.next_attempt_ms =
                            system_now_ms() + u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                        // Tried again from the log, in order.
                        buffer.clear();
                    }
                }
                let delivered = attempt.outcome == Outcome::Delivered;
                if unsaved.is_empty() {
                    unsaved_since = std::time::Instant::now();
                }
                unsaved.push(attempt);
                let due = !delivered
                    || unsaved.len() >= SAVE_EVERY
                    || unsaved_since.elapsed() >= SAVE_WITHIN;
                if due && !self.save(&endpoint, std::mem::take(&mut unsaved)).await? {
                    continue 'reload;
                }
            }
        }
    }

    /// Stores an endpoint's progress and attempts; false if the endpoint was
    /// deleted or rewound meanwhile.
    async fn save(&self, endpoint: &Endpoint, attempts: Vec<Attempt>) -> Result<bool, StoreError> {
        let (id, epoch, progress) = (
            endpoint.id.clone(),
            endpoint.epoch,
            endpoint.progress.clone(),
        );
        self.blocking(move |s| s.webhook_progress(&id, epoch, &progress, &attempts))
            .await
    }

    /// One POST of one event.
    async fn attempt(&self, endpoint: &Endpoint, seq: u64, event: &Event) -> Attempt {
        let number = endpoint.progress.failures + 1;
        let event_id = event.id(seq);
        let body = match serde_json::to_vec(&event.to_json(seq)) {
            Ok(b) => b,
            Err(e) => {
                return self.ended(endpoint, seq, event, number, None, Some(e.to_string()), 0)
            }
        };
        let timestamp = system_now_ms() / 1000;
        let Some(signature) = sign(&endpoint.secret, &event_id, timestamp, &body) else {
            return self.ended(
                endpoint,
                seq,
                event,
                number,
                None,
                Some("the endpoint's secret is not whsec_<base64>".into()),
                0,
            );
        };
        let started = std::time::Instant::now();
        let sent = self
            .client
            .post(&endpoint.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let took = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match sent {
            Ok(response) => {
                let status = response.status();
                // Read (and drop) the body so the connection can be reused.
                let _ = response.bytes().await;
                let error = (!status.is_success()).then(|| format!("HTTP {status}"));
                self.ended(
                    endpoint,
                    seq,
                    event,
                    number,
                    Some(status.as_u16()),
                    error,
                    took,
                )
            }
            Err(e) => {
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    source = s.source();
                }
                self.ended(endpoint, seq, event, number, None, Some(text), took)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ended(
        &self,
        endpoint: &Endpoint,
        seq: u64,
        event: &Event,
        attempt: u32,
        status: Option<u16>,
        error: Option<String>,
        duration_ms: u64,
    ) -> Attempt {
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        let outcome = if ok {
            Metrics::inc(&self.metrics.webhook_deliveries);
            Outcome::Delivered
        } else if status == Some(410) {
            Metrics::inc(&self.metrics.webhook_endpoints_disabled);
            tracing::warn!(endpoint = %endpoint.id, "webhook endpoint answered 410 Gone; disabled");
            Outcome::Disabled
        } else if attempt >= self.settings.max_attempts {
            Metrics::inc(&self.metrics.webhook_failures);
            Metrics::inc(&self.metrics.webhook_events_given_up);
            tracing::warn!(
                endpoint = %endpoint.id,
                event = %event.id(seq),
                attempts = attempt,
                "gave up delivering a webhook event (a replay can send it again)"
            );
            Outcome::GaveUp
        } else {
            Metrics::inc(&self.metrics.webhook_failures);
            Outcome::Retrying
        };
        Attempt {
            event_id: event.id(seq),
            event_type: event.type_name().to_owned(),
            seq,
            at_ms: system_now_ms(),
            attempt,
            status,
            error: error.map(|e| e.chars().take(MAX_ERROR_CHARS).collect()),
            duration_ms,
            outcome,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector published with the Standard Webhooks spec.
    #[test]
    fn signature_matches_the_spec_test_vector() {
        let got = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            got.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("not-a-secret", "id", 1, b"{}"), None);
    }

    #[test]
    fn urls_are_checked() {
        for ok in [
            "https://example.com/hook",
            "https://10.0.0.5:8443/x",
            "http://127.0.0.1:9000/hook",
            "http://localhost/hook",
            "http://[::1]:9000/",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
        for (bad, want) in [
            ("http://example.com/hook", "http://"),
            ("ftp://example.com/", "scheme"),
            ("https://169.254.169.254/latest/meta-data", "not allowed"),
            ("https://[fe80::1]/", "not allowed"),
            ("https://[::ffff:169.254.169.254]/", "not allowed"),
            ("https://[fd00:ec2::254]/", "not allowed"),
            ("https://0.0.0.0/", "not allowed"),
            ("https://224.0.0.1/", "not allowed"),
            ("https://user:pw@example.com/", "password"),
            ("not a url", "not a URL"),
        ] {
            let err = check_url(bad, false).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        assert!(check_url("http://example.com/hook", true).is_ok());
        // allow_http does not open link-local addresses.
        assert!(check_url("http://169.254.169.254/", true).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = WebhookSettings {
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(60),
            ..WebhookSettings::default()
        };
        let waits: Vec<u64> = (1..=6).map(|n| backoff(&settings, n).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(&settings, 200).as_secs(), 60);
    }

    #[test]
    fn secrets_and_ids_are_fresh() {
        let a = new_secret();
        assert!(a.starts_with("whsec_"));
        assert!(sign(&a, "x", 1, b"").is_some());
        assert_ne!(a, new_secret());
        assert_ne!(new_id(), new_id());
    }
}
